"""The fleet server's client SDKs: RobotClient (for the robot agent), OperatorClient (for the teleop
console and simulated operators), and registry/admin helpers (trainer, deployment scripts). The package
imports nothing of the server (fleet/server/): a robot or a console needs only this, the protocol and
fleet.codec.

    fleet/client/_session.py   the reconnecting stream both SDKs share, TLS, metadata, heartbeats
    fleet/client/robot.py      RobotClient, RobotState
    fleet/client/operator.py   OperatorClient
    fleet/client/registry.py   publish_checkpoint, fetch_checkpoint, list_policies, fleet_status

The streaming clients run their network side on a private asyncio loop in a daemon thread, so every
public method returns at once: a robot's control loop never waits on the network. They reconnect with
exponential backoff, and send a heartbeat when they have sent nothing for `heartbeat_s` (the server
ends sessions that go silent). A status that retrying cannot fix (UNAUTHENTICATED, PERMISSION_DENIED,
INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ABORTED = replaced by a newer session of the same
client, ...) stops the client instead, with `error` saying why. ALREADY_EXISTS (another process holds
this id) is retried: it clears when that process's session ends or goes silent.

Robot, in a control loop:

    robot = RobotClient("127.0.0.1:50051", token, "arm-1", task="push", observation_spec={"state": ((7,), "float32")},
                        action_dim=7).start()
    robot.start_episode(1)
    for t in range(T):
        state = robot.state                    # the server's latest word: mode, estop, teleop action, ...
        if robot.take_reset(): ...             # a human reset was ordered
        robot.step(1, t, obs, action, label, signals={"uncertainty": u})
    robot.end_episode(1, success=True)
    robot.close()

Durability: every message (episode start, step, episode end) gets the next seq of one counter per
RobotClient (a robot process: `boot_id`). The client keeps every message until the server says it is
durable (Command.committed_seq: its episode is committed), not merely received (ack_seq), and after
any reconnect sends again everything after what the server reports it has (the first Command's
ack_seq). So a dropped connection, a refused step (writer queue full) or a server killed and
restarted on the same store loses nothing, and the server never logs a message twice. While holding,
keep stepping: the server counts steps for t_T and t_R.
"""

from fleet.client._session import FATAL_CODES, HEARTBEAT_S, ClientError
from fleet.client.operator import OperatorClient
from fleet.client.registry import (
    CheckpointError,
    fetch_checkpoint,
    fleet_status,
    list_policies,
    publish_checkpoint,
)
from fleet.client.robot import RobotClient, RobotState

__all__ = [
    "FATAL_CODES",
    "HEARTBEAT_S",
    "CheckpointError",
    "ClientError",
    "OperatorClient",
    "RobotClient",
    "RobotState",
    "fetch_checkpoint",
    "fleet_status",
    "list_policies",
    "publish_checkpoint",
]
