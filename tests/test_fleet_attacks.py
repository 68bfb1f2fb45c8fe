"""The fleet server attacked the way an outsider would (brief: "fuzzers and kill -9 against the server"):
streams opened and left silent, peers that never read what the server sends. Each test pins a defect
found by that attack; real gRPC on 127.0.0.1, a real zarr store in tmp_path."""

import contextlib
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import zarr

from fleet.client import OperatorClient, fetch_checkpoint, publish_checkpoint
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server import ServerThread
from fleet.server.ledger import MAX_NOTES
from fleet.store import EpisodeStore, StoreCorruptError
from tests.fleet_harness import TOKENS, ServeProcess, free_port, has_ipv6_loopback, serve_overrides
from tests.fleet_harness import robot_client as harness_robot
from tests.fleet_harness import wait_until as wait_for
from tests.test_fleet_server import (
    FAST,
    INTERVENTION,
    committed,
    hello,
    make_config,
    operator_client,
    raw_robot_session,
    robot_client,
    send,
    take_over,
    wait_until,
)

ROBOT_AUTH = [("authorization", "Bearer robot-token")]
ADMIN_AUTH = [("authorization", "Bearer admin-token")]


def status(server) -> pb.FleetStatus:
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=ADMIN_AUTH, timeout=10)


def a_good_robot_still_logs(server, clients, robot_id="good") -> None:
    robot = clients(robot_client(server, robot_id))
    robot.start_episode(1)
    send(robot, 1, range(3))
    robot.end_episode(1, success=True)
    assert committed(server, 1).num_episodes == 1


def test_a_session_opened_without_a_hello_is_ended(make_server, clients):
    # Before: a stream opened and left silent stayed open for as long as its connection (~30 kB each in
    # the server, never freed: 3000 of them took flotilla serve from 99 to 187 MB).
    server = make_server(hello_timeout_s=0.5)
    never = threading.Event()

    def silence():
        never.wait(30)
        yield from ()

    with grpc.insecure_channel(server.address) as channel:
        calls = [pb_grpc.RobotServiceStub(channel).Session(silence(), metadata=ROBOT_AUTH) for _ in range(5)]
        calls += [
            pb_grpc.OperatorServiceStub(channel).Session(
                silence(), metadata=[("authorization", "Bearer operator-token")]
            )
        ]
        try:
            for call in calls:
                assert call.code() == grpc.StatusCode.UNAVAILABLE, call.details()
                assert "no hello within 0.5 s" in call.details()
        finally:
            never.set()
    a_good_robot_still_logs(server, clients)


def test_a_robot_that_never_reads_its_commands_is_ended(make_server, clients):
    # Before: every message of a robot that reads no Command queued one more Command in the server for
    # as long as the stream lived (flow control stops the writes; the outbox grew ~0.5 MB/s per stream).
    server = make_server(stalled_reader_s=1.0)
    resends = 20_000
    sent = [0]
    stop = threading.Event()

    def requests():
        yield hello("deaf")
        resend = pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=1, seq=1))
        yield resend
        for _ in range(resends):  # a resent message: acked with a Command each time, nothing else
            sent[0] += 1
            yield resend
        stop.wait(60)

    # No BDP probing: the window stays at 64 kB, so the server's writes stall after a few thousand acks.
    with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = pb_grpc.RobotServiceStub(channel).Session(requests(), metadata=ROBOT_AUTH)
        try:
            wait_until(lambda: sent[0] == resends, timeout=60, what="the deaf robot's messages sent")
            time.sleep(3.0)  # the server's write has stalled for over stalled_reader_s by now
            received = 0
            try:
                for _ in call:  # only now does the robot read: what the server still had for it
                    received += 1
            except grpc.RpcError:
                pass
        finally:
            stop.set()
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (call.code(), call.details())
    assert "not read" in call.details()
    assert received < resends, received  # the rest was dropped in the server, not kept for it
    a_good_robot_still_logs(server, clients)


def test_a_stop_the_robot_was_told_of_survives_kill9_at_once(tmp_path):
    # Before: the stop was pushed to the robot first and saved in a thread after; flotilla serve killed
    # with SIGKILL the moment the robot saw it came back without it (10 kills of 10), robot AUTONOMOUS.
    overrides = serve_overrides(tmp_path / "fleet.zarr", tmp_path / "registry", free_port())
    server = ServeProcess(overrides).start()
    robot = harness_robot(server.address, 0).start()
    try:
        for target in ("r0", ""):  # the robot's own stop, then the whole fleet's
            operator = OperatorClient(server.address, "operator-token", f"op-{target}", backoff=FAST).start()
            wait_for(lambda: robot.state.mode == pb.MODE_AUTONOMOUS, 30, "the robot autonomous")
            operator.estop(target, engage=True)
            wait_for(lambda: robot.state.estop, 10, "the robot told it is stopped", interval=0.0005)
            server.kill9()
            operator.close(timeout=1)
            server = ServeProcess(overrides).start()
            # "hello": the restarted server's first command to the robot
            wait_for(lambda: robot.state.message == "hello", 30, "the robot back")
            assert robot.state.estop and robot.state.mode == pb.MODE_HOLD, (target, robot.state)
            admin = OperatorClient(server.address, "admin-token", "admin", backoff=FAST).start()
            admin.estop(target, engage=False)
            wait_for(lambda: not robot.state.estop, 10, "the stop released by the admin")
            admin.close(timeout=1)
    finally:
        robot.close(timeout=1)
        server.kill9()


def test_an_operators_notes_on_one_intervention_are_bounded(server, clients):
    # Before: every note was appended to the episode's metadata, without end: each rewrote the episode's
    # meta/extra chunk with all notes so far (a flood of 500-character notes: quadratic writes on the
    # writer's commit thread, and one episode's metadata growing by the megabyte).
    robot, operator = clients(robot_client(server)), clients(operator_client(server, "alice"))
    take_over(robot, operator)
    send(robot, 1, range(6, 9), label=INTERVENTION, operator_id="alice")
    robot.end_episode(1, success=True)
    wait_until(lambda: committed_count(server) == 1, what="the episode committed")
    flood = MAX_NOTES + 10
    for n in range(flood):
        operator.note("r1", f"note {n} " + "x" * 400)
    replies, deadline = [], time.monotonic() + 30
    while len(replies) < flood and time.monotonic() < deadline:
        update = operator.next_update(1)
        if update is not None and update.WhichOneof("kind") in ("notice", "error"):
            replies.append(update)
    refused = [u.error.message for u in replies if u.WhichOneof("kind") == "error"]
    assert len(refused) == 10 and all(f"at most {MAX_NOTES} notes" in m for m in refused), refused[:2]
    wait_until(lambda: len(notes_of(server)) == MAX_NOTES, what=f"{MAX_NOTES} notes in the store")
    time.sleep(0.5)  # nothing more arrives
    assert [note["text"].split()[1] for note in notes_of(server)] == [str(n) for n in range(MAX_NOTES)]


def committed_count(server) -> int:
    return server.server.writer.stats.episodes_committed


def notes_of(server) -> list:
    with EpisodeStore.open(server.config.store) as store:
        return store.episode_meta(0).extra.get("notes", [])


def test_fetches_that_never_read_are_ended_and_a_good_fetch_gets_through(make_server, tmp_path):
    # Before: a Fetch whose reader took nothing waited in its write for ever, holding megabytes: 400 of
    # them (a robot token is enough) took flotilla serve from 109 MB to 1.7 GB, and growing.
    server = make_server(max_concurrent_fetches=3, stalled_reader_s=1.0, registry_chunk_bytes=256 * 1024)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text('{"version": "v1"}')
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4 * 1024 * 1024))
    publish_checkpoint(server.address, "trainer-token", folder, "v1")
    with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        deaf = [
            pb_grpc.RegistryServiceStub(channel).Fetch(pb.FetchRequest(), metadata=ROBOT_AUTH)
            for _ in range(2)
        ]
        # The deaf ones hold two of the three turns (until their streams are gone): the third is free.
        fetched = fetch_checkpoint(server.address, "robot-token", tmp_path / "fetched")
        assert (fetched / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
        time.sleep(1.5)
        for call in deaf:
            chunks = 0
            with contextlib.suppress(grpc.RpcError):
                for _ in call:  # read only now: what the server still had in flight
                    chunks += 1
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (call.code(), call.details())
            assert "not read" in call.details() and chunks < 17


def test_a_damaged_last_chunk_leaves_the_server_serving_without_logging(tmp_path, clients):
    # Before: flotilla serve refused to start on a store whose last chunk of an array was damaged (the
    # chunk the next commit rewrites): no robot could be driven or stopped until someone repaired it.
    config = make_config(tmp_path)
    with ServerThread(config) as server:
        robot = clients(robot_client(server))
        for episode in (1, 2):
            robot.start_episode(episode)
            send(robot, episode, range(4))
            robot.end_episode(episode, success=True)
        assert committed(server, 2).num_episodes == 2
        robot.close()
    chunk = Path(config.store) / "data" / "state" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated

    with ServerThread(config) as server:
        fleet = status(server)
        assert not fleet.writer_healthy and "damaged" in fleet.writer_error, fleet.writer_error
        assert "data/state, steps [0, 8)" in fleet.writer_error, fleet.writer_error
        _, error = raw_robot_session(
            server, [hello("r2"), pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=1, seq=1))]
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "damaged" in error.details(), error.details()
        robot = clients(robot_client(server, "r3"))
        wait_until(lambda: robot.state.mode == pb.MODE_AUTONOMOUS, what="the server driving a robot")
        operator = clients(operator_client(server, "alice"))
        operator.estop("r3")
        wait_until(lambda: robot.state.estop, what="a stop reaching the robot")
    with EpisodeStore.open(config.store) as store:  # readers still open it; the damage is named
        assert store.num_episodes == 2
        with pytest.raises(StoreCorruptError, match="data/state"):
            store.episode(0)


def test_a_stop_on_a_robot_not_yet_connected_is_latched_for_it(make_server, clients):
    # Before: NOT_FOUND, and the robot (not back yet after a server restart, say) came back AUTONOMOUS.
    server = make_server()
    operator = clients(operator_client(server, "alice"))
    bob = clients(operator_client(server, "bob"))
    assert operator.next_update(5, kind="queue") is not None and bob.next_update(5, kind="queue") is not None
    operator.estop("r1")
    stops = Path(f"{server.config.store}.estop.json")  # where latched stops are kept
    wait_until(lambda: stops.exists() and '"r1"' in stops.read_text(), what="the stop latched on disk")
    bob.estop("r1", engage=False)  # not bob's stop to release
    error = bob.next_update(5, kind="error").error
    assert error.code == pb.ERROR_CODE_PERMISSION_DENIED and "stopped by ['alice']" in error.message
    robot = clients(robot_client(server, "r1"))
    wait_until(lambda: robot.state.message == "hello", what="the robot connected")
    assert robot.state.estop and robot.state.mode == pb.MODE_HOLD
    operator.estop("r1", engage=False)
    wait_until(lambda: not robot.state.estop, what="the stop released by alice")
    assert robot.state.mode == pb.MODE_AUTONOMOUS
    bob.estop("r7", engage=False)  # nothing latched there
    assert "no stop to release" in bob.next_update(5, kind="error").error.message


def test_an_episode_is_bounded_in_bytes_too(make_server, clients):
    # Before: only in steps (10,000): a hello may declare 16 MB steps, and an open episode is held in
    # memory until it ends (60 such steps took flotilla serve to 1.2 GB; 10,000 would be 160 GB).
    step_bytes = 3 * 4 + 8 * 8 * 3  # SPEC in tests/test_fleet_server.py: float32 state (3), uint8 rgb 8x8x3
    server = make_server(max_episode_bytes=5 * step_bytes)
    messages = []
    robot = clients(robot_client(server, on_command=lambda command, state: messages.append(command.message)))
    robot.start_episode(1)
    send(robot, 1, range(8))
    robot.end_episode(1, success=True)
    robot.start_episode(2)
    send(robot, 2, range(2))
    robot.end_episode(2, success=True)
    assert robot.wait_committed(timeout=10) and robot.error is None
    assert any(f"max_episode_bytes={5 * step_bytes}" in message for message in messages), messages
    store = committed(server, 2)
    assert [(store.episode_meta(i).outcome, store.episode_meta(i).length) for i in range(2)] == [
        ("too_long", 5),
        ("success", 2),
    ]


def test_all_open_episodes_together_are_bounded_in_bytes(make_server, clients):
    # Before: only each robot's (max_episode_bytes), and one robot token may use many ids: N ids held
    # N x max_episode_bytes in memory. Past max_open_episode_bytes the largest open episode is committed.
    step_bytes = 3 * 4 + 8 * 8 * 3  # SPEC in tests/test_fleet_server.py: float32 state (3), uint8 rgb 8x8x3
    server = make_server(max_open_episode_bytes=6 * step_bytes)
    messages = []
    big = clients(
        robot_client(server, "big", on_command=lambda command, state: messages.append(command.message))
    )
    small = clients(robot_client(server, "small"))
    big.start_episode(1)
    send(big, 1, range(4))
    small.start_episode(1)
    send(small, 1, range(3))  # 7 steps open together: the big one (4) is cut, the small one goes on
    wait_until(lambda: any("max_open_episode_bytes" in message for message in messages), what="big told")
    send(small, 1, range(3, 5))
    small.end_episode(1, success=True)
    big.end_episode(1, success=True)
    assert big.wait_committed(timeout=10) and small.wait_committed(timeout=10)
    store = committed(server, 2)
    outcomes = {store.episode_meta(i).robot_id: store.episode_meta(i) for i in range(2)}
    assert (outcomes["big"].outcome, outcomes["big"].length) == ("too_long", 4)
    assert (outcomes["small"].outcome, outcomes["small"].length) == ("success", 5)
    assert server.call(lambda: server.server.fleet.open_episode_bytes) == 0


def record_depth(store: EpisodeStore, first: int, length: int) -> None:
    episode = store.begin_episode("r1", "push")
    for t in range(first, first + length):
        episode.append({"depth": np.full((64, 64), t, np.float32)}, np.zeros(2, np.float32), "robot")
    episode.commit(success=True)


def test_large_low_dim_steps_get_chunks_of_bounded_bytes_and_old_stores_keep_theirs(tmp_path, monkeypatch):
    # Before: every non-image array was chunked 1024 steps long, so a float32 depth map (1.2 MB a step)
    # made 1.2 GB chunks, rewritten whole by every commit, and a hello declaring a 16 MB observation one
    # of 16 GB (zarr allocated it: a robot token could run the server out of memory).
    import fleet.store.episode_store as episode_store

    store = EpisodeStore.create(tmp_path / "new.zarr")
    record_depth(store, 0, 5)
    rows = zarr.open_array(str(tmp_path / "new.zarr" / "data" / "depth"), mode="r").chunks[0]
    assert rows == episode_store.LOWDIM_CHUNK_BYTES // (64 * 64 * 4) == 256  # 16 kB steps
    assert zarr.open_array(str(tmp_path / "new.zarr" / "data" / "action"), mode="r").chunks[0] == 1024
    store.close()
    # A store written before the byte bound keeps its 1024-row chunks: it opens, appends and reads back.
    monkeypatch.setattr(episode_store, "LOWDIM_CHUNK_BYTES", 1 << 40)
    old = EpisodeStore.create(tmp_path / "old.zarr")
    record_depth(old, 0, 2)
    old.close()
    monkeypatch.undo()
    with EpisodeStore.open(tmp_path / "old.zarr", mode="a") as old:
        record_depth(old, 2, 2)
    with EpisodeStore.open(tmp_path / "old.zarr") as old:
        assert zarr.open_array(str(tmp_path / "old.zarr" / "data" / "depth"), mode="r").chunks[0] == 1024
        assert [old.episode(i)["depth"][:, 0, 0].tolist() for i in range(2)] == [[0, 1], [2, 3]]


def test_idle_connections_are_closed(tmp_path):
    # Before: a connection stayed open as long as its peer pinged, calls or not (a file descriptor and
    # ~17 kB each; no token needed to open one): 2,000 held 2,000 descriptors, past a 1024 soft limit.
    overrides = serve_overrides(tmp_path / "fleet.zarr", tmp_path / "registry", free_port())
    server = ServeProcess([*overrides, "idle_connection_s=1"]).start()

    def descriptors() -> int:
        return len(list(Path(f"/proc/{server.pid}/fd").iterdir()))

    try:
        before = descriptors()
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(server.address, options=own_connection) for _ in range(30)]
        for channel in channels:
            pb_grpc.RegistryServiceStub(channel).List(pb.ListRequest(), metadata=ROBOT_AUTH, timeout=10)
        assert descriptors() >= before + 30
        wait_for(lambda: descriptors() <= before + 2, 15, "the idle connections closed")
        # A closed channel reconnects by itself at its next call.
        pb_grpc.RegistryServiceStub(channels[0]).List(pb.ListRequest(), metadata=ROBOT_AUTH, timeout=10)
        for channel in channels:
            channel.close()
    finally:
        server.kill9()


# A second robot token: the attacker's, so that its calls count apart from the good robot's.
ATTACKER_AUTH = [("authorization", "Bearer attacker-token")]
WITH_ATTACKER = {**TOKENS, "robot": ["robot-token", "attacker-token"]}


# A second address on this machine: ::1 beside 127.0.0.1 (the server listens on both as "localhost").
needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) for a second address")


def held_open(address: str, count: int, auth, never: threading.Event) -> list:
    """`count` robot sessions that never send anything (open until hello_timeout_s or `never`)."""

    def silence():
        never.wait(30)
        yield from ()

    channel = grpc.insecure_channel(address)
    return [pb_grpc.RobotServiceStub(channel).Session(silence(), metadata=auth) for _ in range(count)]


def test_one_token_holds_at_most_its_calls_while_others_keep_working(make_server, clients):
    # Before: no cap; a stalled stream is gone only when its peer reads or disconnects, so one token
    # holder could open them until the server ran out of memory (~30 kB each) or descriptors.
    server = make_server(tokens=WITH_ATTACKER, max_calls_per_token=3, hello_timeout_s=5.0)
    never = threading.Event()
    try:
        held = held_open(server.address, 3, ATTACKER_AUTH, never)
        wait_until(lambda: status(server) is not None, what="the server answering")
        time.sleep(0.5)  # the three are open in the server
        refused = held_open(server.address, 1, ATTACKER_AUTH, never)[0]
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (refused.code(), refused.details())
        assert "max_calls_per_token" in refused.details() and "3 calls open" in refused.details()
        robot = clients(robot_client(server, "good"))
        robot.start_episode(1)
        send(robot, 1, range(3))
        robot.end_episode(1, success=True)
        assert committed(server, 1).num_episodes == 1
        operator = clients(operator_client(server, "alice"))
        assert operator.next_update(5, kind="queue") is not None
        operator.estop("good")
        wait_until(
            lambda: robot.state.estop and robot.state.mode == pb.MODE_HOLD, what="the good robot stopped"
        )
        assert not any(call.done() for call in held)  # the attacker's three were served all along
    finally:
        never.set()


@needs_ipv6
def test_one_address_holds_at_most_its_calls_and_another_address_is_served(make_server):
    server = make_server(tokens=WITH_ATTACKER, max_calls_per_peer=2, hello_timeout_s=10.0, host="localhost")
    never = threading.Event()
    try:
        address_v4 = f"127.0.0.1:{server.port}"
        held = held_open(address_v4, 2, ATTACKER_AUTH, never)
        time.sleep(0.5)
        refused = held_open(address_v4, 1, ROBOT_AUTH, never)[0]  # another token, the same address
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (refused.code(), refused.details())
        assert "max_calls_per_peer" in refused.details() and "127.0.0.1" in refused.details()
        served = held_open(f"[::1]:{server.port}", 1, ROBOT_AUTH, never)  # another address
        time.sleep(1.0)
        assert not any(call.done() for call in held + served)
    finally:
        never.set()


def test_a_robot_reconnecting_replaces_its_session_within_the_cap(make_server):
    # The same robot id taking a new session replaces its old one, which then releases its call: a robot
    # reconnecting many times never reaches its cap (here 2: the old stream and the new one at once).
    server = make_server(max_calls_per_token=2, max_calls_per_peer=2, hello_timeout_s=10.0)
    never = threading.Event()

    def session():
        yield hello("arm")
        never.wait(30)

    channel = grpc.insecure_channel(server.address)
    try:
        calls = []
        for boot in range(5):
            calls.append(pb_grpc.RobotServiceStub(channel).Session(session(), metadata=ROBOT_AUTH))
            assert next(calls[-1]) is not None, f"session {boot} got no reply"  # taken, not refused
            if boot:
                previous = calls[-2]
                wait_until(previous.done, what=f"session {boot - 1} replaced")
                assert previous.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, previous.details()
        assert not calls[-1].done()
    finally:
        never.set()
        channel.close()


@needs_ipv6
def test_deaf_fetches_of_one_token_leave_turns_for_others(make_server, tmp_path):
    # Before: a token's fetches that never read took every turn of max_concurrent_fetches (each keeps its
    # turn until its stream is gone), so every other robot's fetch waited behind them.
    server = make_server(
        tokens=WITH_ATTACKER,
        max_concurrent_fetches=3,
        max_fetches_per_caller=2,
        max_calls_per_peer=100,
        stalled_reader_s=30.0,
        registry_chunk_bytes=256 * 1024,
        host="localhost",
    )
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text('{"version": "v1"}')
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4 * 1024 * 1024))
    publish_checkpoint(server.address, "trainer-token", folder, "v1")
    # The attacker fetches from ::1 without reading; the good robot from 127.0.0.1, its own token.
    with grpc.insecure_channel(f"[::1]:{server.port}", options=[("grpc.http2.bdp_probe", 0)]) as channel:
        deaf = [
            pb_grpc.RegistryServiceStub(channel).Fetch(pb.FetchRequest(), metadata=ATTACKER_AUTH)
            for _ in range(5)
        ]
        time.sleep(1.0)  # the deaf fetches have taken what turns they may
        fetched = []
        fetch = threading.Thread(
            target=lambda: fetched.append(
                fetch_checkpoint(f"127.0.0.1:{server.port}", "robot-token", tmp_path / "fetched")
            ),
            daemon=True,
        )
        fetch.start()
        fetch.join(20)  # not behind the deaf ones (they hold their turns for as long as they are open)
        assert fetched, "the good robot's fetch waited behind the deaf ones"
        assert (fetched[0] / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
        for call in deaf:
            call.cancel()
