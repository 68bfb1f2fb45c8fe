"""The OperatorService handler: a session per teleoperator (the web console, or a simulated operator).

The rules (who may move which robot, release after t_T, resets, e-stop) live in Fleet.operator_message.
"""

from __future__ import annotations

from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server.streams import serve_session


class OperatorService(pb_grpc.OperatorServiceServicer):
    def __init__(self, fleet, auth):
        self.fleet = fleet
        self.auth = auth

    async def Session(self, requests, context):  # noqa: N802 - the generated servicer's name
        fleet = self.fleet
        identity = self.auth.identity_of(context.invocation_metadata())
        async for update in serve_session(
            requests,
            context,
            "an operator",
            identity,
            hello=fleet.operator_hello,
            handle=fleet.operator_message,
            left=fleet.operator_left,
            spawn=fleet.spawn,
        ):
            yield update
