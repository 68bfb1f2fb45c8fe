import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore, FieldSpec, StepError, StoreCorruptError, StoreError, check_schema
from tests.store_crash_writer import expected_episode

ROOT = Path(__file__).resolve().parents[1]


def make_obs(t: float, image: bool = True) -> dict:
    obs = {"joint_pos": np.full(7, t, np.float32), "goal": np.array([0.1, -0.2], np.float32)}
    if image:
        obs["front_rgb"] = np.full((16, 16, 3), int(t) % 256, np.uint8)
    return obs


def record(store: EpisodeStore, length: int, label="robot", robot="r0", success=True, offset=0.0):
    episode = store.begin_episode(robot, "push", policy_version="v3", extra={"seed": 7})
    for t in range(length):
        episode.append(
            make_obs(offset + t),
            np.full(4, offset + t, np.float32) / 100,
            label,
            signals={"uncertainty": 0.5},
            timestamp=1000.0 + t,
        )
    return episode.commit(success=success)


def test_round_trip_data_meta_and_windows(tmp_path):
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        assert record(store, 5, success=True) == 0
        assert record(store, 8, label="intervention", robot="r1", success=False, offset=100) == 1

    store = EpisodeStore.open(path)
    assert store.num_episodes == 2 and store.num_steps == 13
    np.testing.assert_array_equal(store.episode_ends, [5, 13])
    ep1 = store.episode(1)
    np.testing.assert_allclose(ep1["joint_pos"][:, 0], np.arange(100, 108))
    np.testing.assert_array_equal(ep1["front_rgb"][3], np.full((16, 16, 3), 103, np.uint8))
    np.testing.assert_array_equal(ep1["label"], [ControlLabel.INTERVENTION] * 8)
    np.testing.assert_allclose(ep1["timestamp"], 1000.0 + np.arange(8))
    np.testing.assert_allclose(ep1["signal_uncertainty"], 0.5)
    np.testing.assert_allclose(ep1["goal"], [[0.1, -0.2]] * 8)

    meta = store.episode_meta(1)
    assert (meta.robot_id, meta.task, meta.policy_version, meta.success, meta.outcome, meta.length) == (
        "r1",
        "push",
        "v3",
        False,
        "failure",
        8,
    )
    assert meta.extra == {"seed": 7} and meta.end_time >= meta.start_time
    assert store.schema["front_rgb"] == FieldSpec((16, 16, 3), np.dtype(np.uint8))

    window = store.read_window(1, 2, 3, keys=["action"])
    np.testing.assert_allclose(window["action"][:, 0], np.array([102, 103, 104]) / 100)
    windows = store.random_windows(50, 6, np.random.default_rng(0), keys=["joint_pos"])
    # Only episode 1 has 6 steps; every window is a contiguous run inside it.
    for w in windows:
        column = w["joint_pos"][:, 0]
        assert column[0] >= 100 and np.all(np.diff(column) == 1)
    with pytest.raises(IndexError, match="outside episode"):
        store.read_window(0, 3, 3)
    with pytest.raises(IndexError, match="out of range"):
        store.episode(2)


def test_layout_is_a_diffusion_policy_replay_buffer(tmp_path):
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        record(store, 4)
        record(store, 6)
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["meta/episode_ends"][:], [4, 10])
    assert root["data/action"].shape == (10, 4)
    assert root["data/front_rgb"].chunks == (1, 16, 16, 3)  # one frame per chunk
    assert root["data/joint_pos"].chunks[0] > 1  # low-dim chunked along time
    assert root["data/front_rgb"].compressors  # images compressed


def test_bad_steps_name_the_problem_and_leave_the_episode_unchanged(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr")
    episode = store.begin_episode("r0", "push")
    episode.append(make_obs(0), np.zeros(4, np.float32), "robot")
    bad_steps = {
        "missing key(s) ['front_rgb']": (
            {k: v for k, v in make_obs(1).items() if k != "front_rgb"},
            np.zeros(4),
        ),
        "unexpected key(s) ['extra']": ({**make_obs(1), "extra": np.zeros(1)}, np.zeros(4)),
        "'joint_pos': shape (6,)": ({**make_obs(1), "joint_pos": np.zeros(6, np.float32)}, np.zeros(4)),
        "'front_rgb': dtype float64 cannot be stored as uint8": (
            {**make_obs(1), "front_rgb": np.zeros((16, 16, 3))},
            np.zeros(4),
        ),
        "'action' contains NaN": (make_obs(1), np.array([0, np.nan, 0, 0], np.float32)),
        "'joint_pos' contains NaN or infinity": (
            {**make_obs(1), "joint_pos": np.full(7, np.inf, np.float32)},
            np.zeros(4),
        ),
        "'action': shape (3,)": (make_obs(1), np.zeros(3, np.float32)),
    }
    for message, (obs, action) in bad_steps.items():
        with pytest.raises(
            StepError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ):
            episode.append(obs, action, "robot")
    with pytest.raises(StepError, match="unknown control label 'pilot'"):
        episode.append(make_obs(1), np.zeros(4, np.float32), "pilot")
    assert len(episode) == 1
    episode.append(make_obs(1), np.ones(4, np.float32), "robot")
    episode.commit(success=True)
    np.testing.assert_allclose(store.episode(0)["action"][:, 0], [0, 1])


def test_abort_relabel_and_misuse(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    aborted = store.begin_episode("r0", "push")
    aborted.append(make_obs(0), np.zeros(4, np.float32), "robot")
    aborted.abort()
    assert store.num_episodes == 0
    with pytest.raises(StoreError, match="already committed or aborted"):
        aborted.append(make_obs(0), np.zeros(4, np.float32), "robot")
    with pytest.raises(StoreError, match="empty episode"):
        store.begin_episode("r0", "push").commit(success=False)

    episode = store.begin_episode("r0", "push")
    for t in range(20):
        episode.append(make_obs(t), np.zeros(4, np.float32), "demo" if t < 3 else "robot")
    # A takeover after step 20: the robot's last 15 steps become pre_intervention (Sirius's N=15).
    assert episode.relabel_last(15, ControlLabel.PRE_INTERVENTION) == 15
    episode.append(make_obs(20), np.zeros(4, np.float32), ControlLabel.INTERVENTION)
    episode.commit(success=True)
    expected = [0] * 3 + [1] * 2 + [2] * 15 + [3]
    np.testing.assert_array_equal(store.labels(), expected)

    with pytest.raises(StoreError, match="already open for writing"):
        EpisodeStore.open(path, mode="a")
    reader = EpisodeStore.open(path)
    with pytest.raises(StoreError, match="read-only"):
        reader.begin_episode("r0", "push")
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(path)


def test_reader_sees_only_committed_episodes_after_refresh(tmp_path):
    path = tmp_path / "s.zarr"
    writer = EpisodeStore.create(path)
    record(writer, 3)
    reader = EpisodeStore.open(path)
    open_episode = writer.begin_episode("r1", "push")
    open_episode.append(make_obs(0), np.zeros(4, np.float32), "robot", signals={"uncertainty": 0.1})
    record(writer, 4)
    assert reader.num_episodes == 1
    reader.refresh()
    assert reader.num_episodes == 2 and reader.num_steps == 7


def test_declared_schema_is_enforced_from_the_first_step(tmp_path):
    schema = {
        "state": FieldSpec((3,), np.dtype(np.float32)),
        "action": FieldSpec((2,), np.dtype(np.float32)),
        "label": FieldSpec((), np.dtype(np.uint8)),
        "timestamp": FieldSpec((), np.dtype(np.float64)),
    }
    store = EpisodeStore.create(tmp_path / "s.zarr", schema=schema)
    episode = store.begin_episode("r0", "reach")
    with pytest.raises(StepError, match="'state': shape \\(4,\\)"):
        episode.append({"state": np.zeros(4)}, np.zeros(2), "robot")
    episode.append({"state": np.zeros(3)}, np.zeros(2), "robot")  # float64 -> float32 is allowed
    episode.commit(success=True)
    assert EpisodeStore.open(tmp_path / "s.zarr").episode(0)["state"].dtype == np.float32


F4, U1 = np.dtype(np.float32), np.dtype(np.uint8)
GOOD = {"state": FieldSpec((3,), F4), "action": FieldSpec((2,), F4), "label": FieldSpec((), U1)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"zarr.json": FieldSpec((1,), F4)}, "'zarr.json': a key must match"),
        ({".": FieldSpec((1,), F4)}, "must match"),
        ({"..": FieldSpec((1,), F4)}, "must match"),
        ({"a/../b": FieldSpec((1,), F4)}, "must match"),
        ({"_hidden": FieldSpec((1,), F4)}, "must match"),
        ({"x" * 65: FieldSpec((1,), F4)}, "must match"),
        ({"wide": FieldSpec((1,), np.longdouble)}, "dtype <f16 .* cannot be stored"),
        ({"z": FieldSpec((1,), np.complex64)}, "cannot be stored"),
        ({"name": FieldSpec((), "U8")}, "cannot be stored"),
        ({"thing": FieldSpec((), object)}, "cannot be stored"),
        ({"pair": FieldSpec((), [("a", "<f4"), ("b", "<f4")])}, "cannot be stored"),
        ({"when": FieldSpec((), "datetime64[ns]")}, "cannot be stored"),
        ({"big": FieldSpec((3,), ">f4")}, "cannot be stored"),
        ({"voxels": FieldSpec((2, 2, 2, 2, 2), F4)}, "at most 4 dimensions"),
        ({"empty": FieldSpec((0,), F4)}, "each at least 1"),
        ({"huge": FieldSpec((4096, 4096, 2), F4)}, "over 67108864 bytes per step"),
        ({"action": None}, "needs 'action' and 'label'"),
        ({"label": FieldSpec((), np.int64)}, "'label' must be a uint8 scalar"),
    ],
)
def test_check_schema_names_the_problem(change, message):
    schema = {key: spec for key, spec in {**GOOD, **change}.items() if spec is not None}
    with pytest.raises(StepError, match=message):
        check_schema(schema)


def test_check_schema_accepts_the_plain_numeric_dtypes():
    check_schema(
        {
            **GOOD,
            "depth": FieldSpec((4, 4, 1, 2), "<f2"),
            "flags": FieldSpec((2,), np.bool_),
            "count": FieldSpec((), "<u8"),
            "px": FieldSpec((64, 64, 3), U1),
            "t": FieldSpec((), "=f8"),
        }
    )
    with pytest.raises(StepError, match="'a.b': a key must match"):
        EpisodeStore.create("/nonexistent/never/made", schema={**GOOD, "a.b": FieldSpec((1,), F4)})
    assert not Path("/nonexistent").exists()


def test_the_first_commit_fixes_the_schema_and_appending_writes_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    reader = EpisodeStore.open(path)
    on_disk = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    a, b = store.begin_episode("a", "push"), store.begin_episode("b", "push")
    a.append({"state": np.zeros(3, np.float32)}, np.zeros(2, np.float32), "robot")
    b.append({"state": np.zeros(4, np.float32)}, np.zeros(2, np.float32), "robot")
    with pytest.raises(StepError, match=r"'state': shape \(4,\), but the schema says \(3,\)"):
        a.append({"state": np.zeros(4, np.float32)}, np.zeros(2, np.float32), "robot")  # a keeps its own
    with pytest.raises(StepError, match="a key must match"):
        store.begin_episode("c", "push").append({"a.b": np.zeros(1)}, np.zeros(2), "robot")
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == on_disk and store.schema is None
    assert store.schema_mismatch(a) == store.schema_mismatch(b) == ""

    with pytest.raises(StepError, match="nothing was committed"):  # one batch, two schemas
        store.commit_many([(a, True, ""), (b, True, "")])
    assert store.schema is None and not (path / "data" / "state").exists() and not a.closed

    assert b.commit(success=True) == 0
    assert store.schema["state"] == FieldSpec((4,), F4)
    assert store.schema_mismatch(a) == (
        "the episode's schema differs from the store's: 'state' is (3,) float32, not (4,) float32"
    )
    c = store.begin_episode("c", "push")
    c.append({"state": np.ones(4)}, np.zeros(2), "robot")  # the store's schema now: float64 is cast
    with pytest.raises(StepError, match="episode of robot 'a' does not fit the store's schema"):
        store.commit_many([(c, True, ""), (a, True, "")])
    assert store.num_episodes == 1 and not c.closed and len(a) == 1
    assert store.commit_many([(c, True, "")]) == [1]
    assert store.schema_mismatch(c) == "the episode is already committed or aborted"
    assert store.schema_mismatch(store.begin_episode("d", "push")) == "the episode has no steps"
    reader.refresh()
    assert reader.schema == store.schema and reader.episode(1)["state"].tolist() == [[1, 1, 1, 1]]


def test_an_interrupted_first_commit_leaves_no_trace(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path).close()
    # A first commit killed after creating its data arrays, before saving the schema:
    zarr.open_group(str(path / "data"), mode="r+").create_array("state", shape=(5, 3), dtype=np.float32)
    assert EpisodeStore.open(path).schema is None
    with EpisodeStore.open(path, mode="a") as store:
        assert not (path / "data" / "state").exists()
        record(store, 2)
    assert EpisodeStore.open(path).num_steps == 2


def test_corrupt_or_foreign_stores_get_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="not an episode store"):
        EpisodeStore.open(tmp_path)
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w")
    with pytest.raises(StoreCorruptError, match="not a Flotilla episode store"):
        EpisodeStore.open(foreign)

    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        record(store, 3)
    (path / "meta" / "episode_ends" / "zarr.json").write_text("{ truncated")
    with pytest.raises(StoreCorruptError, match="cannot read the episode store"):
        EpisodeStore.open(path)

    broken = tmp_path / "broken.zarr"
    with EpisodeStore.create(broken) as store:
        record(store, 3)
    (broken / "zarr.json").write_bytes(b"\x00garbage")
    with pytest.raises(StoreCorruptError):
        EpisodeStore.open(broken)


def test_info_job_summarizes_a_store(tmp_path):
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        record(store, 5, label="demo", success=True)
        record(store, 3, label="intervention", success=False)
    out = subprocess.run(
        [sys.executable, "-m", "flotilla.cli", "info", str(path), "json=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = json.loads(out)
    assert summary["episodes"] == 2 and summary["steps"] == 8
    assert summary["labels"] == {"demo": 5, "robot": 0, "pre_intervention": 0, "intervention": 3}
    assert summary["success_rate"] == 0.5
    assert summary["keys"]["front_rgb"] == {"shape": [16, 16, 3], "dtype": "uint8", "image": True}
    table = subprocess.run(
        [sys.executable, "-m", "flotilla.cli", "info", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "episodes         2" in table and "intervention" in table


MIN_MID_COMMIT_KILLS = 5


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_committed_episode(tmp_path):
    path = tmp_path / "crash.zarr"
    rng = np.random.default_rng(1234)
    reported = -1
    kills = mid_commit_kills = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # At least 40 kills, and more until enough landed inside a commit (~3 in 4 on an idle machine, as few as
    # 1 in 10 on a loaded one, where the writer spends more of its time outside commits), up to 160.
    while kills < 40 or (mid_commit_kills < MIN_MID_COMMIT_KILLS and kills < 160):
        kills += 1
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.store_crash_writer", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout.readline().strip() == "ready"
        # Kill while the writer commits steadily: on a loaded machine its start alone can take 0.25 s.
        first = child.stdout.readline().split()
        assert first[0] == "committed"
        reported = max(reported, int(first[1]))
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        for line in out.splitlines():
            if line.startswith("committed"):
                reported = max(reported, int(line.split()[1]))

        store = EpisodeStore.open(path)  # a reader, right after the crash, before any repair
        raw = zarr.open_group(str(path), mode="r")
        mid_commit_kills += bool(
            raw["data/state"].shape[0] > store.num_steps
            or list(path.rglob("*.partial"))
            or raw["meta/success"].shape[0] > store.num_episodes
        )
        assert store.num_episodes >= reported + 1
        for index in range(store.num_episodes):
            expected = expected_episode(index)
            got = store.episode(index)
            for key, values in expected.items():
                np.testing.assert_array_equal(got[key], values, err_msg=f"episode {index} key {key}")
            assert store.episode_meta(index).policy_version == str(index)
    assert reported >= 20, "the writer should have committed many episodes across the kills"
    # The test is only worth something if kills landed inside a commit.
    assert mid_commit_kills >= MIN_MID_COMMIT_KILLS, f"only {mid_commit_kills} of {kills} kills hit a commit"
    # The next writer trims what the killed ones left past the commit point and carries on.
    with EpisodeStore.open(path, mode="a") as store:
        count = store.num_episodes
        record_count = store.num_steps
    assert not list(path.rglob("*.partial"))
    assert zarr.open_group(str(path), mode="r")["data/action"].shape[0] == record_count
    assert count == EpisodeStore.open(path).num_episodes


def test_append_checked_takes_its_schema_from_the_first_step_and_commit_still_checks_it(tmp_path):
    """The fleet writer's fast append (its steps were decoded against the robot's spec) skips the per-key
    checks, but a step with other keys is refused and an episode that does not fit is never committed."""

    store = EpisodeStore.create(tmp_path / "s.zarr")

    def step(width: int) -> dict:
        return {"state": np.zeros(width, np.float32), "action": np.zeros(2, np.float32), "label": np.uint8(1)}

    first = store.begin_episode("r", "push")
    first.append_checked(step(3))
    with pytest.raises(StepError, match="differ from the episode's"):
        first.append_checked({"action": np.zeros(2, np.float32), "label": np.uint8(1)})
    first.commit(success=True)
    other = store.begin_episode("r", "push")
    other.append_checked(step(5))  # another spec: its own schema, refused at commit
    assert "state" in store.schema_mismatch(other)
    with pytest.raises(StepError):
        other.commit(success=True)
    assert store.num_episodes == 1 and store.episode(0)["state"].shape == (1, 3)
