"""Token authentication: `authorization: Bearer <token>` metadata -> a role, checked per method.

One interceptor guards every RPC, so no handler can forget the check. A missing or unknown token is
UNAUTHENTICATED; a known token whose role may not call the method is PERMISSION_DENIED.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

import grpc

ANY_ROLE = frozenset({"robot", "operator", "trainer", "admin"})

# Which roles may call which method; a method missing here is refused for everyone.
METHOD_ROLES: dict[str, frozenset[str]] = {
    "/flotilla.v1.RobotService/Session": frozenset({"robot"}),
    "/flotilla.v1.OperatorService/Session": frozenset({"operator"}),
    "/flotilla.v1.RegistryService/Publish": frozenset({"trainer"}),
    "/flotilla.v1.RegistryService/Fetch": ANY_ROLE,
    "/flotilla.v1.RegistryService/List": ANY_ROLE,
    "/flotilla.v1.AdminService/Status": frozenset({"admin"}),
}


class TokenAuth:
    def __init__(self, tokens: Mapping[str, Sequence[str]]):
        self._tokens: list[tuple[bytes, str]] = []
        seen: dict[str, str] = {}
        for role, role_tokens in tokens.items():
            for token in role_tokens:
                if not token:
                    raise ValueError(f"tokens: an empty token for role {role!r}")
                if token in seen and seen[token] != role:
                    raise ValueError(f"tokens: the same token is configured for roles {seen[token]!r} and {role!r}")
                seen[token] = role
                self._tokens.append((token.encode(), role))

    def role_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        presented = header[len("Bearer "):].strip().encode()
        role = None
        for token, token_role in self._tokens:  # compare every token in constant time: no timing hints
            if hmac.compare_digest(presented, token):
                role = token_role
        return role


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth):
        self._auth = auth

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        role = self._auth.role_of(details.invocation_metadata)
        if role is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown token: send metadata 'authorization: Bearer <token>'")
        allowed = METHOD_ROLES.get(details.method, frozenset())
        if role not in allowed:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"role {role!r} may not call {details.method} (allowed: {sorted(allowed) or 'nobody'})")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that only aborts with (code, message)."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        async def refuse_stream(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - makes this an async generator, as streaming handlers are

        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(refuse_stream, **kwargs)

    async def refuse(request, context):
        await context.abort(code, message)

    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(refuse, **kwargs)
