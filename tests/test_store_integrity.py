"""The episode store tells the truth: damaged files raise StoreCorruptError, never wrong values; concurrent
creators never lose a commit; overwrite deletes only episode stores; format-1 stores still read."""

import dataclasses
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from fleet.store import EpisodeStore, StoreCorruptError, StoreError, episode_store
from tests.store_crash_writer import race_episode, race_worker

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHUNK = 8  # low-dim chunk steps here, so that a few steps span several chunks
LENGTHS = (5, 9, 7, 6)  # 27 committed steps: low-dim chunks c/0 .. c/3 (c/3 partly committed)
COMMITTED = sum(LENGTHS)
LEFTOVER = 8  # uncommitted steps after them, as a writer killed mid-commit leaves (into chunk c/4)


def make_step(t: int) -> tuple[dict, np.ndarray]:
    obs = {"state": np.array([t, -t, t / 2], np.float32), "cam": np.full((2, 2, 3), (t + 1) % 256, np.uint8)}
    return obs, np.array([t, 1], np.float32) / 10


def record(store: EpisodeStore, index: int, first_step: int, length: int) -> None:
    episode = store.begin_episode(
        f"robot-{index}", "push", policy_version=f"v{index}", start_time=100.0 + index, extra={"i": index}
    )
    for t in range(first_step, first_step + length):
        obs, action = make_step(t)
        episode.append(
            obs,
            action,
            "demo" if index == 0 else "robot",
            signals={"uncertainty": t / 100},
            timestamp=float(t),
        )
    episode.commit(success=index % 2 == 0)


def read_everything(store: EpisodeStore) -> dict:
    return {
        "episodes": [store.episode(i) for i in range(store.num_episodes)],
        "meta": [dataclasses.asdict(store.episode_meta(i)) for i in range(store.num_episodes)],
        "columns": {name: store.meta_column(name).tolist() for name in episode_store.META_FIELDS},
        "labels": store.labels(),
        "ends": store.episode_ends,
    }


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(episode_store, "LOWDIM_CHUNK_STEPS", CHUNK)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store of 4 episodes plus the uncommitted tail of a killed writer, and everything it reads back."""
    path = tmp_path_factory.mktemp("pristine") / "s.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(episode_store, "LOWDIM_CHUNK_STEPS", CHUNK)
        with EpisodeStore.create(path) as store:
            for index, length in enumerate(LENGTHS):
                record(store, index, sum(LENGTHS[:index]), length)
        root = zarr.open_group(str(path), mode="r+")
        for key in root["data"].array_keys():
            array = root[f"data/{key}"]
            array.resize((COMMITTED + LEFTOVER, *array.shape[1:]))
            array[COMMITTED:] = np.full((LEFTOVER, *array.shape[1:]), 7, array.dtype)
        expected = read_everything(EpisodeStore.open(path))
    assert len(expected["episodes"]) == len(LENGTHS)
    return path, expected


# -- damage -------------------------------------------------------------------------------------------


def delete(rel):
    return lambda path: (path / rel).unlink()


def truncate(rel):
    return lambda path: (path / rel).write_bytes(
        (path / rel).read_bytes()[: (path / rel).stat().st_size // 2]
    )


def garble(rel):
    def damage(path):
        data = bytearray((path / rel).read_bytes())
        data[len(data) // 2] ^= 0x5A
        (path / rel).write_bytes(bytes(data))

    return damage


def zero_fill(rel):
    return lambda path: (path / rel).write_bytes(bytes((path / rel).stat().st_size))


def write(rel, content: bytes):
    return lambda path: (path / rel).write_bytes(content)


def make_folder(rel):
    def damage(path):
        (path / rel).unlink()
        (path / rel).mkdir()

    return damage


def edit_json(rel, change):
    def damage(path):
        document = json.loads((path / rel).read_text())
        change(document)
        (path / rel).write_text(json.dumps(document))

    return damage


def edit_store_attrs(change):
    return edit_json("zarr.json", lambda document: change(document["attributes"]["flotilla_store"]))


def setter(*keys_and_value):
    *keys, last, value = keys_and_value

    def change(document):
        for key in keys:
            document = document[key]
        if value is DROP:
            del document[last]
        else:
            document[last] = value

    return change


DROP = object()
STATE, CAM, LABEL = "data/state/c/{}/0", "data/cam/c/{}/0/0/0", "data/label/c/{}"
LAST = (COMMITTED - 1) // CHUNK  # the last committed low-dim chunk

# (damage, outcome, a name the error must give). Outcomes: "open": opening raises; "read": reading the
# damaged range raises; "tail": that too, and a writer refuses to open (the damage is in a chunk the next
# commit rewrites); "harmless": everything reads back exactly and a writer carries on.
DAMAGE = {
    "state_chunk_deleted": (delete(STATE.format(1)), "read", "data/state"),
    "state_chunk_truncated": (truncate(STATE.format(1)), "read", "data/state"),
    "state_chunk_garbled": (garble(STATE.format(1)), "read", "data/state"),
    "state_chunk_zero_filled": (zero_fill(STATE.format(0)), "read", "data/state"),
    "state_chunk_emptied": (write(STATE.format(2), b""), "read", "data/state"),
    "state_chunk_is_a_folder": (make_folder(STATE.format(1)), "read", "data/state"),
    "state_last_chunk_deleted": (delete(STATE.format(LAST)), "tail", "data/state"),
    "state_last_chunk_garbled": (garble(STATE.format(LAST)), "tail", "data/state"),
    "label_chunk_deleted": (delete(LABEL.format(0)), "read", "data/label"),  # used to read as 'demo'
    "label_last_chunk_truncated": (truncate(LABEL.format(LAST)), "tail", "data/label"),
    "timestamp_chunk_zero_filled": (zero_fill("data/timestamp/c/2"), "read", "data/timestamp"),
    "signal_chunk_deleted": (delete("data/signal_uncertainty/c/1"), "read", "data/signal_uncertainty"),
    "image_chunk_deleted": (delete(CAM.format(3)), "read", "data/cam"),
    "image_chunk_truncated": (truncate(CAM.format(10)), "read", "data/cam"),
    "image_chunk_garbled": (garble(CAM.format(5)), "read", "data/cam"),
    "image_chunk_zero_filled": (zero_fill(CAM.format(7)), "read", "data/cam"),
    "image_last_chunk_deleted": (delete(CAM.format(COMMITTED - 1)), "tail", "data/cam"),
    "vlen_meta_chunk_deleted": (delete("meta/robot_id/c/0"), "tail", "meta/robot_id"),
    "vlen_meta_chunk_garbled": (garble("meta/robot_id/c/0"), "tail", "meta/robot_id"),
    "vlen_meta_chunk_truncated": (truncate("meta/outcome/c/0"), "tail", "meta/outcome"),
    "json_meta_chunk_emptied": (write("meta/extra/c/0", b""), "tail", "meta/extra"),
    "bool_meta_chunk_zero_filled": (zero_fill("meta/success/c/0"), "tail", "meta/success"),
    "time_meta_chunk_deleted": (delete("meta/start_time/c/0"), "tail", "meta/start_time"),
    "episode_ends_chunk_deleted": (delete("meta/episode_ends/c/0"), "open", "meta/episode_ends"),
    "episode_ends_chunk_garbled": (garble("meta/episode_ends/c/0"), "open", "meta/episode_ends"),
    "episode_ends_chunk_truncated": (truncate("meta/episode_ends/c/0"), "open", "meta/episode_ends"),
    "episode_ends_chunk_zero_filled": (zero_fill("meta/episode_ends/c/0"), "open", "meta/episode_ends"),
    "array_json_deleted": (delete("data/state/zarr.json"), "open", "state"),
    "array_json_garbled": (write("data/state/zarr.json", b"{ trunc"), "open", "data/state"),
    "array_json_truncated": (truncate("data/action/zarr.json"), "open", "data/action"),
    "meta_array_json_garbled": (garble("meta/robot_id/zarr.json"), "open", "meta/robot_id"),
    "episode_ends_json_truncated": (truncate("meta/episode_ends/zarr.json"), "open", "meta/episode_ends"),
    "array_dtype_changed": (
        edit_json("data/state/zarr.json", setter("data_type", "int32")),
        "open",
        "data/state",
    ),
    "array_shape_shortened": (
        edit_json("data/state/zarr.json", setter("shape", 0, 20)),
        "open",
        "data/state",
    ),
    "array_step_shape_changed": (
        edit_json("data/state/zarr.json", setter("shape", 1, 2)),
        "open",
        "data/state",
    ),
    "array_chunks_changed": (
        edit_json("data/action/zarr.json", setter("chunk_grid", "configuration", "chunk_shape", [4, 2])),
        "open",
        "data/action",
    ),
    "array_byte_order_changed": (
        edit_json("data/state/zarr.json", setter("codecs", 0, "configuration", "endian", "big")),
        "open",
        "data/state",
    ),
    "array_checksum_removed": (
        edit_json("data/state/zarr.json", lambda d: d["codecs"].pop()),
        "open",
        "data/state",
    ),
    "array_transposed": (
        edit_json(
            "data/state/zarr.json",
            lambda d: d["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}}),
        ),
        "open",
        "data/state",
    ),
    "array_fill_value_changed": (
        edit_json("data/state/zarr.json", setter("fill_value", 1.0)),
        "open",
        "data/state",
    ),
    "array_chunk_key_separator_changed": (
        edit_json("data/state/zarr.json", setter("chunk_key_encoding", "configuration", "separator", ".")),
        "open",
        "data/state",
    ),
    "meta_array_shortened": (
        edit_json("meta/robot_id/zarr.json", setter("shape", 0, 2)),
        "open",
        "meta/robot_id",
    ),
    "episode_ends_lengthened": (
        edit_json("meta/episode_ends/zarr.json", setter("shape", 0, 5)),
        "open",
        "meta/episode_ends",
    ),
    "root_json_deleted": (delete("zarr.json"), "open", "zarr.json"),
    "root_json_garbled": (write("zarr.json", b"\x00garbage"), "open", "cannot read the episode store"),
    "root_json_truncated": (truncate("zarr.json"), "open", "cannot read the episode store"),
    "data_group_json_deleted": (delete("data/zarr.json"), "open", "data/"),
    "meta_group_json_deleted": (delete("meta/zarr.json"), "open", "meta/"),
    "meta_group_json_garbled": (write("meta/zarr.json", b"{"), "open", "cannot read the episode store"),
    "attrs_removed": (
        edit_json("zarr.json", setter("attributes", "flotilla_store", DROP)),
        "open",
        "not a Flotilla",
    ),
    "attrs_format_unknown": (edit_store_attrs(setter("format", 99)), "open", "format 99"),
    "attrs_format_removed": (edit_store_attrs(setter("format", DROP)), "open", "not a Flotilla"),
    "attrs_schema_dtype_changed": (
        edit_store_attrs(setter("schema", "state", "dtype", "<f8")),
        "open",
        "data/state",
    ),
    "attrs_schema_shape_changed": (
        edit_store_attrs(setter("schema", "state", "shape", [4])),
        "open",
        "data/state",
    ),
    "attrs_schema_key_removed": (
        edit_store_attrs(setter("schema", "signal_uncertainty", DROP)),
        "open",
        "signal_uncertainty",
    ),
    "attrs_schema_key_unsafe": (
        edit_store_attrs(lambda a: a["schema"].update({"../meta/episode_ends": a["schema"].pop("state")})),
        "open",
        "schema",
    ),
    "attrs_schema_label_not_uint8": (
        edit_store_attrs(setter("schema", "label", "dtype", "<i8")),
        "open",
        "label",
    ),
    "attrs_schema_not_a_mapping": (edit_store_attrs(setter("schema", "garbage")), "open", "cannot read"),
    "attrs_schema_dropped": (edit_store_attrs(setter("schema", None)), "open", "no schema"),
    # Past the committed range, or not data at all:
    "uncommitted_chunk_garbled": (garble(STATE.format(LAST + 1)), "harmless", ""),
    "uncommitted_image_chunk_deleted": (delete(CAM.format(COMMITTED + 3)), "harmless", ""),
    "uncommitted_image_chunk_truncated": (truncate(CAM.format(COMMITTED)), "harmless", ""),
    "array_shape_lengthened": (edit_json("data/state/zarr.json", setter("shape", 0, 40)), "harmless", ""),
    "array_attributes_added": (
        edit_json("data/cam/zarr.json", setter("attributes", "note", "x")),
        "harmless",
        "",
    ),
    "root_attribute_added": (edit_json("zarr.json", setter("attributes", "note", "x")), "harmless", ""),
    "stray_partial_file": (write("data/state/c/1/0.partial", b"half a chunk"), "harmless", ""),
    "stray_file": (write("notes.txt", b"hello"), "harmless", ""),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_raises_store_corrupt_error_or_reads_back_exactly(kind, pristine, tmp_path, small_chunks):
    source, expected = pristine
    path = tmp_path / "s.zarr"
    shutil.copytree(source, path)
    damage, outcome, name = DAMAGE[kind]
    damage(path)

    if outcome == "open":
        for mode in ("r", "a"):
            with pytest.raises(StoreCorruptError) as err:
                EpisodeStore.open(path, mode=mode)
            assert name in str(err.value)
        return
    store = EpisodeStore.open(path)
    if outcome in ("read", "tail"):
        with pytest.raises(StoreCorruptError) as err:
            read_everything(store)
        assert name in str(err.value) and ("steps [" in str(err.value) or "episodes [" in str(err.value))
        if outcome == "tail":
            with pytest.raises(StoreCorruptError, match=name):
                EpisodeStore.open(path, mode="a")
        return
    np.testing.assert_equal(read_everything(store), expected)
    with EpisodeStore.open(path, mode="a") as writer:  # trims the leftovers and carries on
        record(writer, len(LENGTHS), 1000, 3)
    got = read_everything(EpisodeStore.open(path))
    np.testing.assert_equal(got["episodes"][: len(LENGTHS)], expected["episodes"])
    np.testing.assert_allclose(got["episodes"][-1]["state"][:, 0], [1000, 1001, 1002])
    assert not list(path.rglob("*.partial"))


def test_every_chunk_is_written_even_one_of_fill_values(tmp_path):
    """zarr skips writing chunks equal to the fill value by default; then a deleted chunk would look legit."""
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        episode = store.begin_episode("r0", "push")  # policy_version "" (the fill value)
        for _ in range(3):
            episode.append({"state": np.zeros(2, np.float32)}, np.zeros(2, np.float32), "demo", timestamp=0.0)
        episode.commit(success=False)
    for chunk in (
        "data/state/c/0/0",
        "data/label/c/0",
        "data/timestamp/c/0",
        "meta/success/c/0",
        "meta/policy_version/c/0",
    ):
        assert (path / chunk).is_file(), chunk
    assert EpisodeStore.open(path).labels().tolist() == [0, 0, 0]


def test_a_damaged_last_chunk_fails_the_commit_that_would_rewrite_it(tmp_path):
    path = tmp_path / "s.zarr"
    writer = EpisodeStore.create(path)
    record(writer, 0, 0, 4)
    (path / "data/state/c/0/0").unlink()  # behind the open writer's back
    with pytest.raises(StoreCorruptError, match=r"data/state, steps \[0, 4\)"):
        record(writer, 1, 4, 4)
    assert writer.num_episodes == 1 and EpisodeStore.open(path).num_episodes == 1


# -- format 1 -----------------------------------------------------------------------------------------

# tests/fixtures/format1_store was written by the format-1 code (commit 6e99093): episode i has steps
# t = 0 .. length-1 with state = cam = 10 * i + t, action = t; lengths 3 and 2; labels demo, intervention.


def check_format1_episodes(store: EpisodeStore) -> None:
    np.testing.assert_array_equal(store.episode_ends[:2], [3, 5])
    for index, length in enumerate((3, 2)):
        steps = store.episode(index)
        values = 10 * index + np.arange(length)
        np.testing.assert_array_equal(
            steps["state"], np.repeat(values[:, None], 2, axis=1).astype(np.float32)
        )
        np.testing.assert_array_equal(
            steps["cam"], np.broadcast_to(values[:, None, None, None], (length, 2, 2, 3))
        )
        np.testing.assert_array_equal(steps["action"][:, 0], np.arange(length))
        meta = store.episode_meta(index)
        assert (meta.robot_id, meta.policy_version, meta.success, meta.start_time, meta.extra) == (
            f"r{index}",
            "v1",
            index == 0,
            100.0 + index,
            {"i": index},
        )
    np.testing.assert_array_equal(store.labels()[:5], [0, 0, 0, 3, 3])


def test_format1_store_still_reads_and_appends(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "format1_store", path)
    check_format1_episodes(EpisodeStore.open(path))
    with EpisodeStore.open(path, mode="a") as writer:
        episode = writer.begin_episode("r2", "push")
        episode.append({"state": np.full(2, 7), "cam": np.full((2, 2, 3), 7, np.uint8)}, np.zeros(2), "robot")
        assert episode.commit(success=True) == 2
    store = EpisodeStore.open(path)
    check_format1_episodes(store)
    assert store.episode(2)["state"].tolist() == [[7, 7]] and store.labels()[5] == 1
    assert json.loads((path / "zarr.json").read_text())["attributes"]["flotilla_store"]["format"] == 1


def test_format1_damage_is_reported_too(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "format1_store", path)
    truncate("data/state/c/0/0")(
        path
    )  # no checksum here: blosc itself notices, and used to raise RuntimeError
    with pytest.raises(StoreCorruptError, match=r"data/state, steps \[0, 3\)"):
        EpisodeStore.open(path).episode(0)
    with pytest.raises(StoreCorruptError, match="data/state"):
        EpisodeStore.open(path, mode="a")
    edit_json("data/cam/zarr.json", setter("data_type", "int8"))(path)
    with pytest.raises(StoreCorruptError, match="data/cam"):
        EpisodeStore.open(path)


# -- creating and overwriting ---------------------------------------------------------------------------

TRIALS = 60


@pytest.mark.slow
@pytest.mark.parametrize("how", ["append", "create"])
def test_processes_creating_the_same_store_at_once_never_lose_a_commit(tmp_path, how):
    context = multiprocessing.get_context("spawn")  # zarr's event loop thread does not survive fork
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=race_worker, args=(worker, str(tmp_path), TRIALS, how, barrier, results))
        for worker in (0, 1)
    ]
    for process in workers:
        process.start()
    outcomes = dict(results.get(timeout=600) for _ in workers)
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    both_wrote = 0
    for trial in range(TRIALS):
        commits = [outcomes[worker][trial][1] for worker in (0, 1)]
        assert not [outcomes[worker][trial][2] for worker in (0, 1) if outcomes[worker][trial][2]], (
            f"trial {trial}"
        )
        store = EpisodeStore.open(tmp_path / f"t{trial}")
        assert store.num_episodes == sum(commits) >= 3, f"trial {trial}: {commits}"
        both_wrote += min(commits) > 0
        seen = [0, 0]
        for index in range(store.num_episodes):
            meta = store.episode_meta(index)
            worker, k = int(meta.robot_id[1:]), int(meta.policy_version)
            steps = store.episode(index)
            for key, values in race_episode(worker, k).items():
                np.testing.assert_array_equal(steps[key], values, err_msg=f"trial {trial} episode {index}")
            seen[worker] += 1
        assert seen == commits, f"trial {trial}"
    assert how == "append" or both_wrote == 0  # create never appends to the other's store


def test_overwrite_deletes_only_an_episode_store(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreError, match="not an episode store.*refusing to delete"):
        EpisodeStore.create(folder, overwrite=True)
    assert (folder / "cat.jpg").read_bytes() == b"meow"

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(3,), dtype=np.int8)
    with pytest.raises(StoreError, match="refusing to delete"):
        EpisodeStore.create(foreign, overwrite=True)
    assert (foreign / "x" / "zarr.json").is_file()

    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path) as store:
        record(store, 0, 0, 3)
    with EpisodeStore.create(path, overwrite=True) as store:
        assert store.num_episodes == 0 and store.schema is None
    assert EpisodeStore.open(path).num_episodes == 0
    with EpisodeStore.create(tmp_path / "empty", overwrite=True):  # a missing folder is fine too
        pass


def test_readers_open_a_store_while_a_writer_commits(tmp_path):
    """Opening (or refreshing) a store during a live writer's commits always shows a consistent, exactly
    readable prefix: the commit point is read before anything it points at."""
    import subprocess
    import sys

    from tests.store_crash_writer import expected_episode

    path = tmp_path / "live.zarr"
    EpisodeStore.create(path).close()  # the writer's first commit (schema, data arrays) races readers too
    root = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.store_crash_writer", str(path)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        seen, opens = 0, 0
        # at least 40 commits and 20 opens among them, whichever of reader and writer a loaded machine slows
        while seen < 40 or opens < 20:
            with EpisodeStore.open(path) as store:  # raised StoreCorruptError mid-commit before the fix
                assert store.num_episodes >= seen
                seen, opens = store.num_episodes, opens + 1
                if seen:
                    last = store.episode(seen - 1, keys=["state", "action"])
                    expected = expected_episode(seen - 1)
                    np.testing.assert_array_equal(last["state"], expected["state"])
                    np.testing.assert_array_equal(last["action"], expected["action"])
    finally:
        writer.kill()
        writer.wait()
