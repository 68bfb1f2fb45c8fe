"""The OperatorService handler: a session per teleoperator (the web console, or a simulated operator).

The rules (who may move which robot, release after t_T, resets, e-stop) live in Fleet.operator_message.
"""

from __future__ import annotations

from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server.streams import SessionService


class OperatorService(SessionService, pb_grpc.OperatorServiceServicer):
    peer = "an operator"

    def callbacks(self) -> dict:
        fleet = self.fleet
        return dict(hello=fleet.operator_hello, handle=fleet.operator_message, left=fleet.operator_left)
