"""The fleet server under faults and attacks (issue: protocol v1): each test pins a behaviour that did not
hold before. Real gRPC on 127.0.0.1, a real zarr store in tmp_path, the SDK clients and raw stubs."""

import logging
import threading
import time

import grpc
import numpy as np
import pytest

from fleet.client import OperatorClient, RobotClient, fleet_status
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server import FleetServer, ServerConfig, ServerThread
from fleet.store import EpisodeStore
from tests.test_fleet_server import (
    FAST,
    INTERVENTION,
    ROBOT,
    committed,
    hello,
    make_config,
    operator_client,
    raw_robot_session,
    robot_client,
    send,
    step_message,
    wait_until,
)


def start_message(seq, episode=1):
    return pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=episode, seq=seq))


def raw_call(server, method: str, payload: bytes, token: str, streaming: bool):
    """Send raw bytes as the request of `method`; returns the RpcError (or None)."""
    with grpc.insecure_channel(server.address) as channel:
        metadata = [("authorization", f"Bearer {token}")]
        try:
            if streaming:
                call = channel.stream_stream(
                    method, request_serializer=lambda b: b, response_deserializer=lambda b: b
                )
                list(call(iter([payload]), metadata=metadata, timeout=5))
            else:
                call = channel.unary_unary(
                    method, request_serializer=lambda b: b, response_deserializer=lambda b: b
                )
                call(payload, metadata=metadata, timeout=5)
        except grpc.RpcError as err:
            return err
    return None


# ------------------------------------------------------------------------------ the writer survives any input


@pytest.mark.parametrize(
    "key, dtype, text",
    [
        ("zarr.json", "float32", "zarr.json"),
        (".", "float32", "'.'"),
        ("..", "float32", "'..'"),
        ("a/../b", "float32", "a/../b"),
        ("state", "float128", "float128"),
        ("state", "complex64", "complex64"),
    ],
)
def test_hello_refuses_keys_and_dtypes_the_store_cannot_hold(server, clients, key, dtype, text):
    message = hello("first")
    del message.hello.observation_spec["state"]
    message.hello.observation_spec[key].CopyFrom(pb.TensorSpec(shape=[3], dtype=dtype))
    _, error = raw_robot_session(server, [message, start_message(1), step_message(2)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details(), error.details()
    # The writer is alive: a good robot's episode is committed (before the fix: acked, never committed).
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(3))
    robot.end_episode(1, success=True)
    assert robot.wait_committed(timeout=10)
    assert committed(server, 1).episode(0)["state"][:, 0].tolist() == [0, 1, 2]


def test_hello_bounds_the_bytes_a_step_may_declare(make_server):
    server = make_server(max_step_bytes=1000)
    message = hello("big")
    message.hello.observation_spec["rgb"].shape[:] = [64, 64, 3]
    _, error = raw_robot_session(server, [message])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_step_bytes=1000" in error.details()


def test_a_first_robot_with_another_spec_does_not_lock_out_the_fleet(server, clients):
    odd = hello("odd")
    odd.hello.observation_spec["state"].shape[:] = [5]
    commands, error = raw_robot_session(server, [odd])  # connects, logs nothing, leaves
    assert error is None and commands
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(2))
    robot.end_episode(1, success=True)
    assert robot.wait_committed(timeout=10) and robot.error is None


def test_until_the_first_commit_two_specs_may_log_and_the_loser_is_told(server, clients):
    first = clients(robot_client(server, "first"))
    other = clients(
        RobotClient(
            server.address, "robot-token", "other", "push", {"state": ((5,), "float32")}, 2, backoff=FAST
        )
    )
    first.start_episode(1)
    other.start_episode(1)
    send(first, 1, range(3))
    for t in range(3):
        other.step(1, t, {"state": np.zeros(5, np.float32)}, np.zeros(2, np.float32))
    assert first.wait_acked() and other.wait_acked()
    first.end_episode(1, success=True)
    assert first.wait_committed(timeout=10)  # the first commit fixes the store's schema
    other.end_episode(1, success=True)
    error = other.wait_stopped(10)
    assert (
        error.code == grpc.StatusCode.FAILED_PRECONDITION
        and "does not fit the episode store" in error.details
    )
    assert committed(server, 1).num_episodes == 1 and first.error is None


def test_a_step_with_a_bad_timestamp_is_refused_and_the_good_steps_before_it_are_kept(tmp_path):
    with ServerThread(make_config(tmp_path)) as server:
        bad = step_message(4, t=2)
        bad.step.timestamp = float("nan")
        messages = [hello("r1"), start_message(1), step_message(2, t=0), step_message(3, t=1), bad]
        _, error = raw_robot_session(server, messages)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "timestamp nan" in error.details()
        assert server.server.metrics.counters["steps_refused"] == 1  # invalid steps count as refused
    with EpisodeStore.open(tmp_path / "fleet.zarr") as store:  # the stop committed what was open
        assert store.num_episodes == 1 and store.episode(0)["state"][:, 0].tolist() == [0, 1]


def test_a_store_that_cannot_be_written_refuses_steps_and_loses_nothing(server, clients, monkeypatch):
    store = server.server.writer.store
    real_commit, failing = store.commit_many, threading.Event()
    failing.set()

    def flaky_commit(finished):
        if failing.is_set():
            raise OSError(28, "No space left on device")
        return real_commit(finished)

    monkeypatch.setattr(store, "commit_many", flaky_commit)
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(3))
    robot.end_episode(1, success=True)
    wait_until(
        lambda: not fleet_status(server.address, "admin-token").writer_healthy, what="the writer to fail"
    )
    status = fleet_status(server.address, "admin-token")
    assert "No space left on device" in status.writer_error
    robot.start_episode(2)
    send(robot, 2, range(2))
    wait_until(
        lambda: any(
            e.code == grpc.StatusCode.UNAVAILABLE and "cannot be written" in e.details
            for e in robot.recent_errors
        ),
        what="the refusal",
    )
    assert robot.state.committed_seq == 0 and robot.error is None  # nothing durable, the robot keeps it all
    assert server.server.metrics.counters["steps_refused_store"] >= 1
    failing.clear()  # space is freed: the retried commit goes through, the robot resends what was refused
    robot.end_episode(2, success=True)
    assert robot.wait_committed(timeout=20) and robot.error is None
    store = committed(server, 2)
    assert [store.episode(i)["state"][:, 0].tolist() for i in range(2)] == [[0, 1, 2], [0, 1]]
    assert fleet_status(server.address, "admin-token").writer_healthy


def test_an_exception_in_the_writer_fails_one_episode_not_the_writer(server, clients, monkeypatch):
    from fleet.store.episode_store import OpenEpisode

    real_append = OpenEpisode.append_checked

    def append(self, step):
        if self.robot_id == "doomed":
            raise RuntimeError("zarr said no")
        return real_append(self, step)

    monkeypatch.setattr(OpenEpisode, "append_checked", append)
    doomed, good = clients(robot_client(server, "doomed")), clients(robot_client(server, "good"))
    for robot in (doomed, good):
        robot.start_episode(1)
        send(robot, 1, range(2))
        robot.end_episode(1, success=True)
    error = doomed.wait_stopped(10)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "zarr said no" in error.details
    assert good.wait_committed(timeout=10)
    assert committed(server, 1).episode_meta(0).robot_id == "good"


# ---------------------------------------------------------------------------------- identity and authority

BOUND_TOKENS = {
    "robot": [{"token": "token-arm-a", "ids": ["arm-a"]}, {"token": "token-arms", "ids": ["sim-*"]}],
    "operator": [{"token": "token-alice", "ids": ["alice"]}, {"token": "token-bob", "ids": ["bob"]}],
    "trainer": ["trainer-token"],
    "admin": ["admin-token"],
}


def test_tokens_are_bound_to_the_ids_they_may_use(make_server, clients):
    server = make_server(tokens=BOUND_TOKENS)
    _, error = raw_robot_session(server, [hello("arm-b")], token="token-arm-a")
    assert (
        error.code() == grpc.StatusCode.PERMISSION_DENIED
        and "may not speak for robot 'arm-b'" in error.details()
    )
    _, error = raw_robot_session(server, [hello("arm-a")], token="token-arms")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    commands, error = raw_robot_session(server, [hello("sim-7")], token="token-arms")
    assert error is None and commands
    impostor = clients(OperatorClient(server.address, "token-bob", "alice", backoff=FAST))
    assert impostor.wait_stopped(5).code == grpc.StatusCode.PERMISSION_DENIED
    alice = clients(OperatorClient(server.address, "token-alice", "alice", backoff=FAST))
    wait_until(lambda: alice.connected, what="alice")


def test_an_impostor_cannot_take_a_connected_robot_or_write_into_its_episode(server, clients):
    victim = clients(robot_client(server, "r1"))
    victim.start_episode(1)
    send(victim, 1, range(2))
    assert victim.wait_acked()
    forged = [hello("r1"), start_message(10, episode=1), step_message(11, t=5)]
    forged[0].hello.boot_id = "impostor"
    _, error = raw_robot_session(server, forged)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "another process" in error.details()
    send(victim, 1, [2])
    victim.end_episode(1, success=True)
    assert victim.wait_committed() and victim.error is None
    assert committed(server, 1).episode(0)["state"][:, 0].tolist() == [0, 1, 2]


def test_an_operator_impostor_is_refused_while_the_operator_is_connected(server, clients):
    alice = clients(operator_client(server, "alice"))
    wait_until(lambda: alice.connected, what="alice")
    impostor = clients(operator_client(server, "alice"))
    wait_until(
        lambda: any(e.code == grpc.StatusCode.ALREADY_EXISTS for e in impostor.recent_errors),
        what="the refusal",
    )
    time.sleep(0.3)
    assert alice.connected and alice.error is None


@pytest.mark.parametrize(
    "label, text",
    [
        (pb.CONTROL_LABEL_UNSPECIFIED, "CONTROL_LABEL_UNSPECIFIED"),
        (pb.CONTROL_LABEL_DEMO, "not demo"),
        (pb.CONTROL_LABEL_PRE_INTERVENTION, "not pre_intervention"),
        (17, "unknown value 17"),
    ],
)
def test_robots_cannot_claim_labels_the_server_sets(server, label, text):
    step = step_message(2)
    step.step.label = label
    _, error = raw_robot_session(server, [hello("r1"), start_message(1), step])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details(), error.details()


def test_protective_stops_survive_a_server_restart(tmp_path, clients):
    config = make_config(tmp_path)
    with ServerThread(config) as server:
        robot = clients(robot_client(server))
        alice = clients(operator_client(server, "alice"))
        wait_until(lambda: robot.connected and alice.connected, what="sessions")
        alice.estop("r1")
        alice.estop("")
        wait_until(lambda: robot.state.estop, what="the stop")
        robot.close()
        alice.close()
    with ServerThread(config) as server:
        robot = clients(robot_client(server))
        wait_until(lambda: robot.connected, what="the robot again")
        assert robot.state.estop and robot.state.mode == pb.MODE_HOLD
        status = fleet_status(server.address, "admin-token")
        assert status.fleet_estop and status.robots[0].estop


def test_beyond_loopback_the_server_needs_tls_and_real_tokens(tmp_path):
    import asyncio

    config = make_config(tmp_path, host="0.0.0.0", tokens={"robot": ["dev-robot-token"], "admin": ["short"]})
    problems = config.exposure_problems()
    assert any("TLS is off" in p for p in problems) and any("development token" in p for p in problems)
    with pytest.raises(ValueError, match="refusing to listen beyond loopback"):
        asyncio.run(FleetServer(config).start())
    assert not (tmp_path / "fleet.zarr").exists()  # refused before touching anything
    assert ServerConfig().metrics_host == "127.0.0.1" and ServerConfig().host == "127.0.0.1"
    assert make_config(tmp_path, metrics_host="0.0.0.0").exposure_problems()  # metrics have no auth


def test_flotilla_serve_beyond_loopback_with_defaults_is_one_line_refusal(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flotilla.cli",
            "serve",
            "host=0.0.0.0",
            "metrics_port=null",
            f"store={tmp_path / 'fleet.zarr'}",
            f"registry_dir={tmp_path / 'registry'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "refusing to listen beyond loopback" in result.stderr and "Traceback" not in result.stderr
    assert "dev" in result.stderr and "TLS is off" in result.stderr


def test_insecure_true_serves_beyond_loopback_with_a_warning(tmp_path, caplog):
    config = make_config(tmp_path, host="0.0.0.0", insecure=True)
    with caplog.at_level(logging.WARNING), ServerThread(config) as server:
        assert server.port > 0
    assert any("INSECURE" in record.message for record in caplog.records)


# ------------------------------------------------------------------------------------------ bounded, live


@pytest.mark.parametrize(
    "method, streaming",
    [
        ("/flotilla.v1.RobotService/Session", True),
        ("/flotilla.v1.AdminService/Status", False),
        ("/flotilla.v1.RegistryService/List", False),
        ("/flotilla.v1.RegistryService/Publish", True),
        ("/flotilla.v1.RegistryService/Fetch", False),
    ],
)
def test_undecodable_bytes_get_invalid_argument_and_one_log_line(server, caplog, method, streaming):
    service = method.split("/")[1].removeprefix("flotilla.v1.")
    token = {
        "RobotService": "robot-token",
        "AdminService": "admin-token",
        "RegistryService": "trainer-token",
    }[service]
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            error = raw_call(server, method, b"\xff\xff\xff\xff garbage", token, streaming)
            assert (
                error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in error.details()
            )
    assert len([r for r in caplog.records if "undecodable" in r.message]) <= 1
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks
    assert fleet_status(server.address, "admin-token") is not None


def test_a_hole_in_a_robots_seqs_is_counted(server):
    commands, error = raw_robot_session(
        server, [hello("r1"), start_message(1), step_message(2), step_message(5, t=1)]
    )
    assert error is None and commands[-1].ack_seq == 5
    assert server.server.metrics.counters["seq_gaps"] == 1


def test_ids_are_bounded_and_errors_never_echo_them_whole(server):
    _, error = raw_robot_session(server, [hello("x" * 20_000)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    for bad in ("a/b", "../etc", "a b", "-lead"):
        _, error = raw_robot_session(server, [hello(bad)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid id" in error.details(), bad


def test_departed_robots_are_forgotten(make_server):
    server = make_server(forget_robot_after_s=0.2)
    for i in range(50):  # drive-by hellos
        raw_robot_session(server, [hello(f"visitor{i}")])
    wait_until(lambda: len(server.server.fleet.robots) == 0, what="the records to be dropped")
    assert len(fleet_status(server.address, "admin-token").robots) == 0


def test_a_full_fleet_makes_room_by_forgetting_the_longest_departed(make_server):
    server = make_server(max_robots=3)
    for i in range(5):
        commands, error = raw_robot_session(server, [hello(f"visitor{i}")])
        assert error is None, error
    assert sorted(server.server.fleet.robots) == ["visitor2", "visitor3", "visitor4"]


def test_an_episode_past_max_episode_steps_is_committed_as_too_long(make_server, clients):
    server = make_server(max_episode_steps=5)
    messages = []
    robot = clients(robot_client(server, on_command=lambda command, state: messages.append(command.message)))
    robot.start_episode(1)
    send(robot, 1, range(8))
    wait_until(lambda: any("max_episode_steps=5" in message for message in messages), what="the notice")
    robot.end_episode(1, success=True)
    robot.start_episode(2)
    send(robot, 2, range(2))
    robot.end_episode(2, success=True)
    assert robot.wait_committed(timeout=10) and robot.error is None
    store = committed(server, 2)
    assert [(store.episode_meta(i).outcome, store.episode_meta(i).length) for i in range(2)] == [
        ("too_long", 5),
        ("success", 2),
    ]


class FrozenPeer:
    """A raw session that sends `messages` and then goes silent with its stream still open (SIGSTOP-like)."""

    def __init__(self, server, stub, messages, token):
        self.release = threading.Event()
        self.updates: list = []

        def requests():
            yield from messages
            self.release.wait(30)

        def run():
            with grpc.insecure_channel(server.address) as channel:
                try:
                    for update in stub(channel).Session(
                        requests(), metadata=[("authorization", f"Bearer {token}")]
                    ):
                        self.updates.append(update)
                except grpc.RpcError as err:
                    self.error = err

        self.error = None
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.thread.join(10)


def test_a_frozen_robot_frees_its_operator_within_about_a_second(server, clients):
    alice = clients(operator_client(server, "alice"))
    assert alice.next_update(5, kind="queue") is not None
    steps = [step_message(i + 2, t=i) for i in range(3)]
    for step in steps:
        step.step.signals.uncertainty = 0.9
    robot = FrozenPeer(
        server, pb_grpc.RobotServiceStub, [hello("r1"), start_message(1), *steps], "robot-token"
    )
    try:
        assert alice.next_update(5, kind="assignment").assignment.robot_id == "r1"
        assigned_at = time.monotonic()
        released = alice.next_update(5, kind="released").released
        waited = time.monotonic() - assigned_at
        assert released.reason == pb.RELEASE_REASON_ROBOT_DISCONNECTED and waited < 2.5, waited
    finally:
        robot.close()


def test_a_frozen_operator_loses_its_robot_to_a_live_one(server, clients):
    frozen = FrozenPeer(
        server,
        pb_grpc.OperatorServiceStub,
        [pb.OperatorMessage(hello=pb.OperatorHello(operator_id="frozen", boot_id="b1"))],
        "operator-token",
    )
    try:
        wait_until(lambda: "frozen" in server.server.fleet.operators, what="the operator")
        robot = clients(robot_client(server))
        robot.start_episode(1)
        send(robot, 1, range(3), uncertainty=0.9)
        wait_until(
            lambda: robot.state.operator_id == "frozen", timeout=5, what="the frozen operator's takeover"
        )
        # The silent operator is dropped: the robot holds and goes back to the queue, where a live one takes it.
        wait_until(lambda: robot.state.mode == pb.MODE_HOLD, timeout=3, what="HOLD")
        bob = clients(operator_client(server, "bob"))
        assert bob.next_update(5, kind="assignment").assignment.robot_id == "r1"
        wait_until(lambda: robot.state.operator_id == "bob", what="bob's teleop")
    finally:
        frozen.close()


def test_heartbeats_keep_a_quiet_robot_connected(make_server, clients):
    server = make_server(robot_silence_s=0.5)
    robot = clients(robot_client(server))
    wait_until(lambda: robot.connected, what="connected")
    time.sleep(1.5)  # no episode, no steps: only heartbeats
    assert robot.connected and robot.last_error is None
    assert fleet_status(server.address, "admin-token").robots[0].connected


def test_intervention_labels_are_logged_only_for_the_assigned_operator(server, clients):
    alice = clients(operator_client(server, "alice"))
    assert alice.next_update(5, kind="queue") is not None
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, range(6), uncertainty=0.1)
    send(robot, 1, [6], uncertainty=0.9)
    alice.next_update(5, kind="assignment")
    wait_until(lambda: robot.state.mode == pb.MODE_TELEOP, what="TELEOP")
    send(robot, 1, [7], label=INTERVENTION, operator_id="alice")
    send(robot, 1, [8], label=INTERVENTION, operator_id="bob")  # bob is not in control
    robot.end_episode(1, success=False)
    assert robot.wait_committed(timeout=10)
    labels = committed(server, 1).episode(0)["label"].tolist()
    assert labels[-2:] == [INTERVENTION, ROBOT]
