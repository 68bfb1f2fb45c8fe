"""The fleet capacity benchmark's machinery (benchmarks/fleet_capacity.py) on a tiny fleet: a real server
process, synthetic robots in a client process, the store read back. Behaviour only, no timing thresholds."""

import numpy as np

from benchmarks.fleet_capacity import run_fleet
from fleet.labels import ControlLabel
from fleet.store import EpisodeStore

ROBOTS, SECONDS, EPISODE_STEPS = 4, 2.0, 8


def test_every_step_sent_is_committed_and_timed(tmp_path):
    result = run_fleet(ROBOTS, SECONDS, tmp_path, clients=1, episode_steps=EPISODE_STEPS)

    assert result.errors == []
    # Steps go out on fixed 10 Hz slots, so the count does not depend on how busy the machine is.
    assert [log.sent for log in result.logs] == [int(SECONDS * 10)] * ROBOTS
    assert result.sent == result.acked == result.committed == ROBOTS * int(SECONDS * 10)
    assert (result.lost, result.extra) == (0, 0)
    for log in result.logs:
        assert len(log.latencies_ms) == log.sent  # one step->command latency per step
        assert all(np.isfinite(log.latencies_ms)) and min(log.latencies_ms) >= 0

    with EpisodeStore.open(result.store) as store:
        committed = {}
        for index in range(store.num_episodes):
            meta = store.episode_meta(index)
            committed[(meta.robot_id, meta.extra["robot_episode_id"])] = (meta, store.episode(index))
    sent = {
        (log.robot_id, episode): stamps for log in result.logs for episode, stamps in log.episodes.items()
    }
    assert set(committed) == set(sent)
    first_lengths = sorted({len(log.episodes[1]) for log in result.logs})
    assert len(first_lengths) > 1  # the first episodes are staggered, so episode ends spread out
    for log in result.logs:
        last = max(log.episodes)
        for episode, stamps in log.episodes.items():
            meta, steps = committed[(log.robot_id, episode)]
            # The very steps the robot sent, in order, labelled as sent (ROBOT: no operator took over).
            assert steps["timestamp"].tolist() == stamps
            assert steps["label"].tolist() == [int(ControlLabel.ROBOT)] * len(stamps)
            assert steps["action"].shape == (len(stamps), 4) and steps["goal"].shape == (len(stamps), 2)
            assert (meta.task, meta.policy_version) == ("push", "bench")
            if episode != last:
                assert (meta.outcome, meta.success) == ("success", True)
                assert len(stamps) == (EPISODE_STEPS if episode > 1 else len(log.episodes[1]))
            else:  # cut by the end of the run, unless it happened to end on time
                assert meta.outcome in ("success", "benchmark_end")


def test_fast_step_path_agrees_with_the_full_checks():
    """decode_step's fast path (fleet/server/robots.py, there for capacity) must accept, refuse and
    produce exactly what the full checks do."""
    from fleet import codec
    from fleet.proto import flotilla_pb2 as pb
    from fleet.server.robots import RobotSpec, _decode_checked, decode_step, step_time
    from fleet.server.streams import FleetError

    hello = pb.RobotHello(robot_id="r", action_dim=4, goal_dim=2)
    for key, (shape, dtype) in {
        "state": ((3,), "float32"),
        "rgb": ((2, 2, 3), "uint8"),
        "q": ((2,), "float64"),
    }.items():
        hello.observation_spec[key].CopyFrom(pb.TensorSpec(shape=shape, dtype=dtype))
    spec = RobotSpec.from_hello(hello, max_step_bytes=1 << 20)

    def step(**changes) -> pb.Step:
        message = pb.Step(
            seq=3,
            timestamp=5.0,
            label=pb.CONTROL_LABEL_ROBOT,
            action=codec.to_tensor(np.ones(4, np.float32)),
            goal=codec.to_tensor(np.ones(2, np.float32)),
            signals=pb.Signals(uncertainty=0.5),
        )
        for key, value in {
            "state": np.arange(3, dtype=np.float32),
            "rgb": np.zeros((2, 2, 3), np.uint8),
            "q": np.zeros(2),
        }.items():
            message.observation[key].CopyFrom(codec.to_tensor(changes.pop(key, value)))
        for name, value in changes.items():
            if name == "no":
                message.ClearField(value)
            elif isinstance(value, np.ndarray | pb.Signals | pb.Image):
                getattr(message, name).CopyFrom(
                    codec.to_tensor(value) if isinstance(value, np.ndarray) else value
                )
            else:
                setattr(message, name, value)
        return message

    label = np.uint8(ControlLabel.ROBOT)  # the server's decision, passed in (fleet.server.fleet)

    def checked(message, spec, goal, max_frame_bytes, label):
        return {
            **_decode_checked(message, spec, goal, max_frame_bytes),
            "label": label,
            "timestamp": step_time(message.timestamp, f"step seq {message.seq}"),
        }

    def outcome(flatten, message, goal):
        try:
            return [
                (key, np.asarray(value).dtype.str, np.asarray(value).tolist())
                for key, value in sorted(flatten(message, spec, goal, 50, label).items())
            ]
        except FleetError as err:
            return err.code, err.message

    nan = float("nan")
    cases = [
        step(),
        step(state=np.array([1, nan, 2], np.float32)),
        step(q=np.array([1, np.inf])),
        step(state=np.arange(4, dtype=np.float32)),
        step(state=np.arange(3, dtype=np.float64)),
        step(action=np.ones(4)),
        step(action=np.array([0, 0, 0, nan], np.float32)),
        step(goal=np.ones((1, 2), np.float32)),
        step(goal=np.array([np.inf, 0], np.float32)),
        step(no="goal"),
        step(no="action"),
        step(timestamp=float("nan")),
        step(timestamp=-1.0),
        step(signals=pb.Signals(risk=nan)),
        step(signals=pb.Signals(constraint_violation=True)),
        step(camera=pb.Image(encoding="jpeg", data=b"x" * 10)),
        step(camera=pb.Image(encoding="jpeg", data=b"x" * 100)),
    ]
    aliased = step()
    aliased.observation["state"].dtype = "<f4"  # valid, but not the plain spelling: the full checks take it
    missing = step()
    del missing.observation["q"]
    for message in [*cases, aliased, missing]:
        for goal in (None, np.array([3, 4], np.float32)):
            assert outcome(decode_step, message, goal) == outcome(checked, message, goal)
