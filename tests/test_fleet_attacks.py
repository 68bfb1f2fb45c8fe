"""The fleet server attacked the way an outsider would (brief: "fuzzers and kill -9 against the server"):
streams opened and left silent, peers that never read what the server sends. Each test pins a defect
found by that attack; real gRPC on 127.0.0.1, a real zarr store in tmp_path."""

import threading
import time

import grpc

from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from tests.test_fleet_server import committed, hello, robot_client, send, wait_until

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
