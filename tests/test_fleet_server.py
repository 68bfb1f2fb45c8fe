"""The fleet server end to end: a real gRPC server on a 127.0.0.1 port, a real zarr store in tmp_path,
real clients (the fleet.client SDKs, and raw stubs for malformed input)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from fleet import codec
from fleet.allocation import make_allocator
from fleet.client import (
    OperatorClient,
    RobotClient,
    fetch_checkpoint,
    fleet_status,
    list_policies,
    publish_checkpoint,
)
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server import AllocationConfig, ServerConfig, ServerThread
from fleet.store import EpisodeStore
from tests.fleet_harness import TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = {"state": ((3,), "float32"), "rgb": ((8, 8, 3), "uint8")}
FAST = (0.05, 0.2)  # client reconnect backoff in tests
ROBOT, PRE, INTERVENTION = (
    int(ControlLabel.ROBOT),
    int(ControlLabel.PRE_INTERVENTION),
    int(ControlLabel.INTERVENTION),
)


def make_config(tmp_path, t_T=3, **overrides) -> ServerConfig:
    """C.U.R. allocation with fixed thresholds (0.5), so a step's signals decide at the next tick."""
    values = dict(
        port=0,
        metrics_port=0,
        tokens=TOKENS,
        store=str(tmp_path / "fleet.zarr"),
        registry_dir=str(tmp_path / "registry"),
        pre_intervention_steps=3,
        shutdown_grace_s=0.5,
        allocation=AllocationConfig(
            rule="cur", tick_hz=20, t_T=t_T, t_R=2, uncertainty_threshold=0.5, risk_threshold=0.5
        ),
    )
    values.update(overrides)
    return ServerConfig(**values)


def robot_client(server, robot_id="r1", **kwargs) -> RobotClient:
    return RobotClient(
        server.address, "robot-token", robot_id, "push", SPEC, action_dim=2, backoff=FAST, **kwargs
    )


def operator_client(server, operator_id, **kwargs) -> OperatorClient:
    return OperatorClient(server.address, "operator-token", operator_id, backoff=FAST, **kwargs)


def obs(t: int) -> dict:
    return {"state": np.full(3, t, np.float32), "rgb": np.full((8, 8, 3), t % 256, np.uint8)}


def send(robot: RobotClient, episode: int, ts, label=ROBOT, operator_id="", **signals) -> None:
    for t in ts:
        robot.step(
            episode,
            t,
            obs(t),
            np.array([t, -t], np.float32),
            label,
            signals=signals or None,
            operator_id=operator_id,
        )


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def committed(server, count: int) -> EpisodeStore:
    writer = server.server.writer
    wait_until(lambda: writer.stats.episodes_committed >= count, what=f"{count} committed episodes")
    return EpisodeStore.open(server.config.store)


def take_over(
    robot: RobotClient, operator: OperatorClient, episode: int = 1, steps: int = 5
) -> pb.Assignment:
    """Connect, stream `steps` calm steps and one uncertain one: the allocator hands it to `operator`."""
    assert operator.next_update(5, kind="queue") is not None  # the operator is connected
    robot.start_episode(episode)
    send(robot, episode, range(steps), uncertainty=0.1)
    send(robot, episode, [steps], uncertainty=0.9)
    update = operator.next_update(5, kind="assignment")
    assert update is not None, "no assignment"
    wait_until(lambda: robot.state.mode == pb.MODE_TELEOP, what="TELEOP")
    return update.assignment


def raw_robot_session(server, messages, token="robot-token"):
    """Send `messages` on one RobotService.Session; returns (commands, error or None)."""
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.RobotServiceStub(channel).Session(
            iter(messages), metadata=[("authorization", f"Bearer {token}")]
        )
        commands = []
        try:
            for command in call:
                commands.append(command)
        except grpc.RpcError as err:
            return commands, err
        return commands, None


def hello(robot_id="bad", **overrides) -> pb.RobotMessage:
    message = pb.RobotHello(robot_id=robot_id, task="push", action_dim=2, boot_id=f"boot-{robot_id}")
    for key, (shape, dtype) in SPEC.items():
        message.observation_spec[key].CopyFrom(pb.TensorSpec(shape=shape, dtype=dtype))
    for key, value in overrides.items():
        setattr(message, key, value)
    return pb.RobotMessage(hello=message)


def step_message(seq, episode=1, t=0, action=(0.0, 0.0), observation=None, camera=None) -> pb.RobotMessage:
    step = pb.Step(
        seq=seq,
        episode_id=episode,
        t=t,
        action=codec.to_tensor(np.array(action, np.float32)),
        label=pb.CONTROL_LABEL_ROBOT,
    )
    for key, value in (observation or obs(t)).items():
        step.observation[key].CopyFrom(codec.to_tensor(value))
    if camera is not None:
        step.camera.CopyFrom(camera)
    return pb.RobotMessage(step=step)


# ------------------------------------------------------------------------------------------- codec


def test_codec_round_trip_and_rejections():
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert np.array_equal(codec.from_tensor(codec.to_tensor(array)), array)
    with pytest.raises(ValueError, match="not allowed"):
        codec.to_tensor(np.array(["a"], dtype=object))
    with pytest.raises(ValueError, match="not allowed"):
        codec.from_tensor(pb.Tensor(shape=[1], dtype="object", data=b"x" * 8))
    with pytest.raises(ValueError, match="needs 12 bytes, got 8"):
        codec.from_tensor(pb.Tensor(shape=[3], dtype="float32", data=b"x" * 8))
    with pytest.raises(ValueError, match="over the limit"):
        codec.from_tensor(pb.Tensor(shape=[1 << 40, 1 << 20], dtype="float64", data=b""))
    image = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    message = codec.encode_image(image, "png")
    assert (message.width, message.height) == (32, 24)
    assert np.array_equal(codec.decode_image(message), image)  # png is lossless
    assert codec.decode_image(codec.encode_image(image)).shape == image.shape
    with pytest.raises(ValueError, match="not a valid jpeg"):
        codec.decode_image(pb.Image(encoding="jpeg", data=b"nope", width=2, height=2))


# -------------------------------------------------------------------------------------- robot path


def test_episode_is_committed_with_labels_signals_and_metadata(server, clients):
    robot = clients(robot_client(server))
    robot.start_episode(7)
    send(robot, 7, range(4), uncertainty=0.25, risk=0.1)
    send(robot, 7, range(4, 6), label=INTERVENTION, operator_id="mallory")  # nobody assigned mallory
    robot.end_episode(7, success=True, outcome="success")
    assert robot.wait_acked(timeout=10)
    assert robot.state.mode == pb.MODE_AUTONOMOUS and robot.state.acked_seq == 8  # start, 6 steps, end

    store = committed(server, 1)
    assert store.num_episodes == 1
    episode = store.episode(0)
    # The server decides labels: an intervention it did not assign is logged as the robot's own step.
    assert episode["label"].tolist() == [ROBOT] * 6
    assert server.server.metrics.counters["labels_corrected"] == 2
    assert np.array_equal(episode["state"][:, 0], np.arange(6, dtype=np.float32))
    assert episode["rgb"].shape == (6, 8, 8, 3) and episode["action"].dtype == np.float32
    assert np.allclose(episode["signal_uncertainty"][:4], 0.25)
    assert {"signal_risk", "signal_density", "signal_constraint_violation", "timestamp"} <= set(episode)
    meta = store.episode_meta(0)
    assert (meta.robot_id, meta.task, meta.success, meta.outcome) == ("r1", "push", True, "success")
    assert meta.extra == {"robot_episode_id": 7, "boot_id": robot.boot_id}
    assert robot.wait_committed(timeout=10) and robot.unacked == 0  # durable: the robot forgot it
    status = fleet_status(server.address, "admin-token")
    assert status.robots[0].robot_id == "r1" and status.robots[0].steps == 6 and status.robots[0].connected


def test_safety_signals_are_logged_and_a_store_from_before_them_keeps_its_columns(
    make_server, clients, tmp_path
):
    # A store whose first episode an earlier server committed, before the safety signals existed.
    legacy = ("uncertainty", "risk", "density", "constraint_violation")
    store = EpisodeStore.create(tmp_path / "fleet.zarr")
    episode = store.begin_episode("r0", "push")
    signals = {name: 0.0 for name in legacy}
    episode.append(obs(0), np.zeros(2, np.float32), ROBOT, signals=signals, timestamp=1.0)
    episode.commit(True, "success")
    store.close()
    server = make_server()
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(3), novelty=2.5, ldm=4.0, safety_filter=pb.SAFETY_FILTER_DECISION_HOLD, risk=1.0)
    robot.end_episode(1, success=False, outcome="timeout")
    assert robot.wait_committed(timeout=10)
    logged = committed(server, 1).episode(1)
    assert {key for key in logged if key.startswith("signal_")} == {f"signal_{name}" for name in legacy}
    assert np.allclose(logged["signal_risk"], 1.0)
    server.stop()

    # A new store logs every signal, the filter's decision as its SafetyFilterDecision code.
    shutil.rmtree(tmp_path / "fleet.zarr")
    server = make_server()
    robot = clients(robot_client(server, "r2"))
    robot.start_episode(1)
    send(
        robot,
        1,
        range(3),
        novelty=2.5,
        rnd=0.5,
        ldm=4.0,
        agree=-1.5,
        safety_filter=pb.SAFETY_FILTER_DECISION_HOLD,
    )
    robot.end_episode(1, success=False, outcome="timeout")
    assert robot.wait_committed(timeout=10)
    logged = committed(server, 1).episode(0)
    assert logged["signal_safety_filter"].tolist() == [pb.SAFETY_FILTER_DECISION_HOLD] * 3
    assert np.allclose(logged["signal_ldm"], 4.0) and np.allclose(logged["signal_agree"], -1.5)
    assert np.allclose(logged["signal_novelty"], 2.5) and np.allclose(logged["signal_rnd"], 0.5)


def test_takeover_relabels_pre_intervention_and_teleop_reaches_the_robot(server, clients):
    operator = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    assignment = take_over(robot, operator)
    assert (assignment.robot_id, assignment.reason, assignment.min_steps) == (
        "r1",
        pb.ASSIGNMENT_REASON_UNCERTAINTY,
        3,
    )
    assert robot.state.operator_id == "alice" and operator.assigned == {"r1"}

    operator.act("r1", [0.5, -0.5])
    wait_until(lambda: robot.state.action is not None, what="the teleop action")
    assert robot.state.action.tolist() == [0.5, -0.5]
    robot.step(
        1, 6, obs(6), [0.5, -0.5], INTERVENTION, camera=np.zeros((16, 16, 3), np.uint8), operator_id="alice"
    )
    frame = operator.next_update(5, kind="frame").frame  # the live view of the robot it controls
    assert frame.robot_id == "r1" and "state" in frame.observation and "rgb" not in frame.observation
    assert codec.decode_image(frame.camera).shape == (16, 16, 3)
    send(robot, 1, [7, 8], label=INTERVENTION, operator_id="alice")  # calm: once released, it stays released
    assert robot.wait_acked()
    operator.release("r1")  # honoured once t_T ticks are served
    released = operator.next_update(5, kind="released").released
    assert (released.robot_id, released.reason) == ("r1", pb.RELEASE_REASON_OPERATOR_RELEASE)
    wait_until(lambda: robot.state.mode == pb.MODE_AUTONOMOUS, what="AUTONOMOUS after release")
    send(robot, 1, [9], uncertainty=0.1)
    robot.end_episode(1, success=True)

    labels = committed(server, 1).episode(0)["label"].tolist()
    # 6 robot steps before the takeover; the last 3 (pre_intervention_steps) became pre_intervention.
    assert labels == [ROBOT] * 3 + [PRE] * 3 + [INTERVENTION] * 3 + [ROBOT]


def test_operators_are_told_the_allocators_t_T_not_a_copy_of_it(tmp_path, clients):
    # The allocator passed in has its own t_T (5); config.allocation's (3) must not leak into assignments,
    # including the one re-sent to an operator client that reconnects.
    allocator = make_allocator("cur", t_T=5, t_R=2, uncertainty_threshold=0.5, risk_threshold=0.5)
    server = ServerThread(make_config(tmp_path), allocator).start()
    try:
        operator = clients(operator_client(server, "alice"))
        robot = clients(robot_client(server))
        assert take_over(robot, operator).min_steps == 5
        again = operator_client(server, "alice")
        again.boot_id = operator.boot_id  # the same client process, reconnected: it keeps its robot
        clients(again)
        update = again.next_update(5, kind="assignment")
        assert update is not None and (update.assignment.robot_id, update.assignment.min_steps) == ("r1", 5)
        for client in (again, robot, operator):
            client.close(timeout=2)
    finally:
        server.stop()


def test_only_the_assigned_operator_moves_a_robot(server, clients):
    received = []
    alice = clients(operator_client(server, "alice"))
    robot = clients(
        robot_client(server, on_command=lambda c, s: received.append(c) if c.HasField("action") else None)
    )
    take_over(robot, alice)
    bob = clients(operator_client(server, "bob"))
    bob.act("r1", [9.0, 9.0])
    error = bob.next_update(5, kind="error").error
    assert "not assigned to operator 'bob'" in error.message and "alice" in error.message
    assert (error.code, error.robot_id, error.request) == (pb.ERROR_CODE_PERMISSION_DENIED, "r1", "action")
    bob.act("nobody", [1.0, 1.0])
    error = bob.next_update(5, kind="error").error
    assert "unknown robot 'nobody'" in error.message and error.code == pb.ERROR_CODE_NOT_FOUND
    alice.act("r1", [0.25, 0.25])
    wait_until(lambda: received, what="alice's action")
    time.sleep(0.1)
    assert [codec.from_tensor(c.action).tolist() for c in received] == [[0.25, 0.25]]
    assert all(c.operator_id == "alice" for c in received)


def test_estop_wins_over_teleop_and_the_whole_fleet_stops(make_server, clients):
    # A long t_T: the allocator keeps alice on the (idle, e-stopped) robot for the whole test.
    server = make_server(t_T=10_000)
    alice = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    other = clients(robot_client(server, "r2"))
    other.start_episode(1)
    send(other, 1, [0], uncertainty=0.0)
    take_over(robot, alice)

    alice.estop("r1")
    wait_until(lambda: robot.state.estop and robot.state.mode == pb.MODE_HOLD, what="e-stop on r1")
    alice.act("r1", [1.0, 1.0])
    assert "MODE_HOLD (stopped" in alice.next_update(5, kind="error").error.message
    time.sleep(0.1)
    assert robot.state.action is None and other.state.mode == pb.MODE_AUTONOMOUS
    bob = clients(operator_client(server, "bob"))
    bob.estop("r1", engage=False)  # only whoever engaged a robot's stop (or an admin) releases it
    error = bob.next_update(5, kind="error").error
    assert error.code == pb.ERROR_CODE_PERMISSION_DENIED and "only they or an admin" in error.message
    assert robot.state.estop
    alice.estop("r1", engage=False)
    wait_until(lambda: robot.state.mode == pb.MODE_TELEOP and not robot.state.estop, what="teleop again")

    bob.estop("")  # any operator may stop the whole fleet
    wait_until(
        lambda: robot.state.estop and other.state.estop and other.state.mode == pb.MODE_HOLD,
        what="fleet e-stop",
    )
    alice.act("r1", [1.0, 1.0])
    assert "MODE_HOLD (stopped" in alice.next_update(5, kind="error").error.message
    bob.estop("", engage=False)  # ... but only an admin may release it
    assert "needs an admin" in bob.next_update(5, kind="error").error.message
    time.sleep(0.1)
    assert other.state.estop
    admin = clients(OperatorClient(server.address, "admin-token", "root", backoff=FAST))
    admin.estop("", engage=False)
    wait_until(
        lambda: other.state.mode == pb.MODE_AUTONOMOUS and robot.state.mode == pb.MODE_TELEOP,
        what="fleet release",
    )


def test_operator_disconnect_holds_the_robot_and_requeues_it(server, clients):
    alice = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    take_over(robot, alice)
    alice.close()
    wait_until(lambda: robot.state.mode == pb.MODE_HOLD and not robot.state.estop, what="HOLD")
    assert "alice disconnected" in robot.state.message
    bob = clients(operator_client(server, "bob"))
    assignment = bob.next_update(5, kind="assignment").assignment
    assert (assignment.robot_id, assignment.reason) == ("r1", pb.ASSIGNMENT_REASON_UNCERTAINTY)
    wait_until(
        lambda: robot.state.mode == pb.MODE_TELEOP and robot.state.operator_id == "bob", what="bob's teleop"
    )


def test_robot_disconnect_mid_intervention_frees_the_operator(make_server, clients):
    server = make_server(resume_grace_s=0.3)
    alice = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    take_over(robot, alice)
    robot.close()
    released = alice.next_update(5, kind="released").released
    assert (released.robot_id, released.reason) == ("r1", pb.RELEASE_REASON_ROBOT_DISCONNECTED)
    assert alice.assigned == set()
    status = fleet_status(server.address, "admin-token")
    assert [(r.robot_id, r.connected, r.operator_id) for r in status.robots] == [("r1", False, "")]
    # It did not come back within resume_grace_s: its open episode is committed, marked as cut short.
    meta = committed(server, 1).episode_meta(0)
    assert (meta.outcome, meta.success, meta.length) == ("disconnected", False, 6)


def test_blocked_robot_holds_until_a_human_reset_of_t_R_steps(server, clients):
    alice = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, [0], constraint_violation=True)
    wait_until(lambda: robot.state.mode == pb.MODE_HOLD, what="HOLD while blocked")
    assignment = alice.next_update(5, kind="assignment").assignment
    assert assignment.needs_reset and assignment.reset_steps == 2
    assert assignment.reason == pb.ASSIGNMENT_REASON_CONSTRAINT_VIOLATION
    assert robot.state.mode == pb.MODE_HOLD  # the human is resetting it: it does not act
    alice.reset("r1")  # already under way: nothing more happens until t_R is served
    released = alice.next_update(5, kind="released").released
    assert (released.robot_id, released.reason) == ("r1", pb.RELEASE_REASON_RESET_DONE)
    wait_until(robot.take_reset, what="the reset order")
    assert not robot.take_reset()  # exactly one reset
    send(robot, 1, [1], constraint_violation=True)  # a stale step from before the reset: not blocked again
    robot.end_episode(1, success=False, outcome="violation")
    robot.start_episode(2)
    send(robot, 2, [0])
    assert robot.wait_acked()
    time.sleep(0.2)
    assert robot.state.mode == pb.MODE_AUTONOMOUS


def test_robot_ids_outside_the_fleet_are_refused(make_server):
    server = make_server(robot_ids=["r1"])
    _, error = raw_robot_session(server, [hello("intruder")])
    assert (
        error.code() == grpc.StatusCode.PERMISSION_DENIED
        and "'intruder' is not in this fleet" in error.details()
    )


def test_a_second_process_cannot_take_a_connected_robots_session(server, clients):
    first = clients(robot_client(server))
    wait_until(lambda: first.connected, what="first session")
    impostor = clients(robot_client(server))  # the same id and token, another process (boot)
    wait_until(
        lambda: any(e.code == grpc.StatusCode.ALREADY_EXISTS for e in impostor.recent_errors),
        what="the refusal",
    )
    assert "connected from another process" in impostor.last_error.details and not impostor.connected
    first.start_episode(1)
    send(first, 1, range(3))
    assert first.wait_acked() and first.error is None and first.connected


# --------------------------------------------------------------------------------------- bad input


def test_tokens_and_roles(server, clients):
    wrong = clients(RobotClient(server.address, "nope", "r1", "push", SPEC, 2, backoff=FAST))
    assert wrong.wait_stopped(5).code == grpc.StatusCode.UNAUTHENTICATED
    _, error = raw_robot_session(server, [hello()], token="operator-token")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "RobotService" in error.details()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as missing:
            pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest())
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as denied:
        fleet_status(server.address, "robot-token")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list_policies(server.address, "robot-token").latest == ""  # any role may list


def test_malformed_messages_get_clear_statuses_while_another_robot_streams(server, clients):
    good = clients(robot_client(server, "good"))
    good.start_episode(1)
    stop = threading.Event()

    def stream_good():
        t = 0
        while not stop.is_set():
            send(good, 1, [t])
            t += 1
            time.sleep(0.005)

    streamer = threading.Thread(target=stream_good)
    streamer.start()
    try:
        start = pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=1, seq=1))
        nan = step_message(2, action=(float("nan"), 0.0))
        wide = step_message(2, observation={"state": np.zeros(4, np.float32), "rgb": obs(0)["rgb"]})
        wrong_dtype = step_message(2, observation={"state": np.zeros(3, np.float64), "rgb": obs(0)["rgb"]})
        big_frame = step_message(2, camera=pb.Image(encoding="jpeg", data=b"\0" * (2 * 1024 * 1024)))
        cases = [
            ([start], grpc.StatusCode.FAILED_PRECONDITION, "must be hello"),
            ([hello(), start, wide], grpc.StatusCode.INVALID_ARGUMENT, "observation 'state' has shape (4,)"),
            ([hello(), start, wrong_dtype], grpc.StatusCode.INVALID_ARGUMENT, "dtype float64"),
            ([hello(), start, nan], grpc.StatusCode.INVALID_ARGUMENT, "action contains NaN"),
            ([hello(), start, big_frame], grpc.StatusCode.RESOURCE_EXHAUSTED, "max_frame_bytes"),
            ([hello(), step_message(1)], grpc.StatusCode.FAILED_PRECONDITION, "no episode is open"),
            ([hello(action_dim=0)], grpc.StatusCode.INVALID_ARGUMENT, "action_dim"),
            ([hello(robot_id="")], grpc.StatusCode.INVALID_ARGUMENT, "robot_id '' is not a valid id"),
            ([hello(), pb.RobotMessage()], grpc.StatusCode.INVALID_ARGUMENT, "empty RobotMessage"),
        ]
        for i, (messages, code, text) in enumerate(cases):
            if messages[0].hello.robot_id == "bad":
                messages[
                    0
                ].hello.robot_id = f"bad{i}"  # a fresh robot each (an id's open episode outlives a session)
            _, error = raw_robot_session(server, messages)
            assert error is not None and error.code() == code and text in error.details(), (text, error)
    finally:
        stop.set()
        streamer.join()
    assert good.wait_acked(timeout=10) and good.error is None and good.connected
    good.end_episode(1, success=True)
    store = committed(server, 1)
    assert (
        store.episode_meta(0).robot_id == "good" and store.num_steps == good.state.acked_seq - 2
    )  # all but start and end
    # The store's schema is fixed by what is committed: a robot whose steps would not fit is refused at hello.
    odd = hello("odd")
    odd.hello.observation_spec["state"].shape[:] = [5]
    _, error = raw_robot_session(server, [odd])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "would not fit" in error.details()


def test_full_writer_queue_refuses_steps_and_loses_nothing(tmp_path, clients):
    with ServerThread(make_config(tmp_path, writer_queue_size=3)) as server:
        robot = clients(robot_client(server))
        with server.server.writer.paused():
            robot.start_episode(1)
            send(robot, 1, range(6))
            # (Any error, then the refusal itself: grpc.aio may mask a status as INTERNAL, see RobotClient.)
            wait_until(
                lambda: any(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in robot.recent_errors),
                what="the refusal",
            )
            refusal = next(e for e in robot.recent_errors if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "writer queue is full" in refusal.details and "NOT logged" in refusal.details
            assert robot.state.acked_seq == 4  # the episode start and three queued steps, nothing beyond
        assert robot.wait_acked(timeout=10)  # it reconnected and resent the refused steps
        robot.end_episode(1, success=True)
        store = committed(server, 1)
        assert store.episode(0)["state"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]
        assert server.server.metrics.counters["steps_refused_queue_full"] >= 1
        # Every resend continued where the server stopped: no message went missing in between (a sender of a
        # finished connection once took a message meant for the next one, under load).
        assert server.server.metrics.counters["seq_gaps"] == 0


def test_graceful_shutdown_commits_and_leaves_the_store_readable(tmp_path, clients):
    server = ServerThread(make_config(tmp_path)).start()
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(3))
    robot.end_episode(1, success=True)
    robot.start_episode(2)
    send(robot, 2, range(2))
    assert robot.wait_acked()
    server.stop()
    with EpisodeStore.open(tmp_path / "fleet.zarr") as store:
        assert store.num_episodes == 2
        assert [store.episode_meta(i).outcome for i in range(2)] == ["success", "shutdown"]
        assert not store.episode_meta(1).success and store.episode(1)["label"].tolist() == [ROBOT] * 2
    EpisodeStore.open(tmp_path / "fleet.zarr", mode="a").close()  # the writer lock was released


# --------------------------------------------------------------------------------- registry, metrics


def test_a_published_policy_brings_its_own_calibrated_request_thresholds(make_server, tmp_path):
    import dataclasses
    import json

    from policies.safety.calibration import ConformalThreshold

    def publish(server, version, safety=None):
        folder = tmp_path / "checkpoints" / version
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        if safety is not None:
            (folder / "safety.json").write_text(safety if isinstance(safety, str) else json.dumps(safety))
        publish_checkpoint(server.address, "trainer-token", folder, version)  # returns after new-latest

    # What `flotilla safety` saves: the risk threshold over the episode (calm early, higher at contact).
    risk = ConformalThreshold([0.3, 0.8], 0.05, "episode", 10, 40)
    calibrated = {"format": 1, "thresholds": {"risk": risk.to_dict(), "novelty": risk.to_dict()}}
    server = make_server()  # thresholds configured at 0.5
    allocator = server.server.fleet.allocator
    publish(server, "v1", calibrated)
    assert allocator.risk.schedule.thresholds == [0.3, 0.8] and allocator.uncertainty.fixed == 0.5
    publish(server, "v2")  # no safety models: back to the configured thresholds
    assert allocator.risk.schedule is None and allocator.risk.fixed == 0.5
    publish(server, "v3", calibrated)
    for version, bad in (
        ("v4", "{not json"),
        ("v5", {"thresholds": {"risk": {**risk.to_dict(), "thresholds": [float("nan")]}}}),
    ):
        publish(server, version, bad)  # still served, with the configured thresholds (and a warning)
        assert allocator.risk.schedule is None and allocator.risk.fixed == 0.5
        assert list_policies(server.address, "robot-token").latest == version
    publish(server, "v6", calibrated)
    server.stop()
    # A restarted server takes them from the latest version in its registry; with the setting off, never.
    restarted = make_server()
    assert restarted.server.fleet.allocator.risk.schedule.thresholds == [0.3, 0.8]
    restarted.stop()
    off = dataclasses.replace(make_config(tmp_path).allocation, policy_thresholds=False)
    assert make_server(allocation=off).server.fleet.allocator.risk.schedule is None


def test_registry_publish_fetch_list_and_new_latest_reaches_robots(tmp_path, clients):
    with ServerThread(make_config(tmp_path, registry_chunk_bytes=64 * 1024)) as server:
        robot = clients(robot_client(server))
        wait_until(lambda: robot.connected, what="robot")
        folder = tmp_path / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_text('{"version": "v2"}')
        (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(300_000))
        (folder / "empty.yaml").write_bytes(b"")
        result = publish_checkpoint(server.address, "trainer-token", folder, "v2", chunk_bytes=100_000)
        assert (result.version, result.bytes) == ("v2", 300_000 + len('{"version": "v2"}'))
        wait_until(lambda: robot.state.policy_version == "v2", what="the new version at the robot")
        assert "new policy version v2" in robot.state.message

        fetched = fetch_checkpoint(server.address, "robot-token", tmp_path / "fetched")
        assert fetched.name == "v2"
        for name in ("config.json", "model.safetensors", "empty.yaml"):
            assert (fetched / name).read_bytes() == (folder / name).read_bytes()
        assert list(list_policies(server.address, "operator-token").versions) == ["v2"]

        def publish_raw(*chunks):
            with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
                pb_grpc.RegistryServiceStub(channel).Publish(
                    iter(chunks), metadata=[("authorization", "Bearer trainer-token")]
                )
            return err.value

        error = publish_raw(
            pb.CheckpointChunk(version="v3", filename="../escape.json", data=b"{}", last=True)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no folders or '..'" in error.details()
        error = publish_raw(pb.CheckpointChunk(version="v3", filename="run.py", data=b"", last=True))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "only .json" in error.details()
        error = publish_raw(pb.CheckpointChunk(version="../v3", filename="a.json", last=True))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad version" in error.details()
        error = publish_raw(pb.CheckpointChunk(version="v2", filename="a.json", last=True))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as denied:
            publish_checkpoint(server.address, "robot-token", folder, "v4")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as missing:
            fetch_checkpoint(server.address, "robot-token", tmp_path / "fetched", version="v9")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (tmp_path / "escape.json").exists() and not (tmp_path / "registry" / "v3").exists()
        assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["LATEST", "v2"]


def test_metrics_endpoint_serves_prometheus_text(server, clients):
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(5))
    robot.end_episode(1, success=True)
    assert robot.wait_acked()
    committed(server, 1)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    lines = set(text.splitlines())
    for line in (
        "flotilla_robots_connected 1",
        "flotilla_operators_connected 0",
        "flotilla_steps_received_total 5",
        "flotilla_episodes_committed_total 1",
        "flotilla_steps_logged_total 5",
        "flotilla_writer_queue_depth 0",
        "flotilla_steps_refused_total 0",
        'flotilla_step_command_latency_seconds_bucket{le="+Inf"} 5',
        "flotilla_step_command_latency_seconds_count 5",
        "# TYPE flotilla_step_command_latency_seconds histogram",
    ):
        assert line in lines, line
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)
    assert missing.value.code == 404


# ------------------------------------------------------------------------------------ TLS, `serve`


def self_signed_certificate(tmp_path) -> tuple:
    """(cert, key) PEM files of a one-day certificate for 127.0.0.1 and localhost (the openssl command)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


NEEDS_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@NEEDS_OPENSSL
def test_tls_is_one_setting_away(make_server, clients, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    robot = clients(robot_client(server, root_certificates=cert))
    wait_until(lambda: robot.connected, what="a TLS session")
    plain = clients(robot_client(server, "plain"))  # a client without TLS never gets in
    time.sleep(0.3)
    assert not plain.connected and plain.last_error.code == grpc.StatusCode.UNAVAILABLE


def test_serve_entry_point_runs_until_sigterm_and_stops_gracefully(tmp_path):
    overrides = [
        "port=0",
        "metrics_port=null",
        f"store={tmp_path / 'fleet.zarr'}",
        f"registry_dir={tmp_path / 'registry'}",
        "tokens.robot=[robot-token]",
    ]
    code = (
        "import sys, hydra; from fleet.server.app import run; sys.argv = ['serve', *sys.argv[1:]]; "
        f"hydra.main(config_path={os.path.join(ROOT, 'configs')!r}, config_name='serve', version_base='1.3')(run)()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        while "flotilla serve: fleet server on" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the server exited early"
        address = line.split("fleet server on ")[1].split(",")[0]
        robot = RobotClient(address, "robot-token", "r1", "push", SPEC, action_dim=2, backoff=FAST).start()
        robot.start_episode(1)
        send(robot, 1, range(3))
        assert robot.wait_acked()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        robot.close(timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
    with EpisodeStore.open(tmp_path / "fleet.zarr") as store:
        assert store.num_episodes == 1 and store.episode_meta(0).outcome == "shutdown"
