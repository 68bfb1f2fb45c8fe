"""Token authentication: `authorization: Bearer <token>` metadata -> an Identity (role + the ids it may use).

One interceptor guards every RPC, so no handler can forget the check. A missing or unknown token is
UNAUTHENTICATED; a known token whose role may not call the method is PERMISSION_DENIED. Sessions then
check the robot or operator id in their hello against `Identity.may_use`, so a token bound to `arm-1`
cannot speak for `arm-2`.

The interceptor also parses every request itself: gRPC would answer bytes that are not a valid message
with INTERNAL and a traceback in the server log (any token holder could flood it); here they get
INVALID_ARGUMENT, logged at most once per peer per interval.
"""

from __future__ import annotations

import fnmatch
import hmac
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from fleet.server.streams import FleetError, Undecodable, check_decoded
from fleet.text import clip

ROLES = ("robot", "operator", "trainer", "admin")
ANY_ROLE = frozenset(ROLES)

# Which roles may call which method; a method missing here is refused for everyone. An admin may open an
# operator session (to release a fleet-wide protective stop, say).
METHOD_ROLES: dict[str, frozenset[str]] = {
    "/flotilla.v1.RobotService/Session": frozenset({"robot"}),
    "/flotilla.v1.OperatorService/Session": frozenset({"operator", "admin"}),
    "/flotilla.v1.RegistryService/Publish": frozenset({"trainer"}),
    "/flotilla.v1.RegistryService/Fetch": ANY_ROLE,
    "/flotilla.v1.RegistryService/List": ANY_ROLE,
    # Operators see the fleet's state (the console's fleet view); they change it only through their session.
    "/flotilla.v1.AdminService/Status": frozenset({"operator", "admin"}),
}

# Robot and operator ids: short, printable, safe in logs, metadata and file names.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 characters of letters, digits and . _ - (starting with a letter or digit)"


def check_id(value: str, what: str) -> str:
    """`value` if it is a valid robot/operator id, else INVALID_ARGUMENT naming the problem."""
    if not ID_PATTERN.fullmatch(value):
        raise FleetError(
            grpc.StatusCode.INVALID_ARGUMENT, f"hello: {what} {clip(value)!r} is not a valid id ({ID_RULE})"
        )
    return value


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for: its role and the ids (fnmatch patterns) it may use in a hello."""

    role: str
    ids: tuple[str, ...] = ("*",)

    def may_use(self, identity: str) -> bool:
        return any(fnmatch.fnmatchcase(identity, pattern) for pattern in self.ids)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def token_entries(tokens: Mapping[str, Sequence]) -> list[tuple[str, Identity]]:
    """(token, Identity) pairs from the config's role -> [token | {token, ids}] mapping, checked."""
    entries, seen = [], {}
    for role, role_tokens in tokens.items():
        if role not in ROLES:
            raise ValueError(f"tokens: unknown role {role!r}; roles are {list(ROLES)}")
        for entry in role_tokens:
            if isinstance(entry, Mapping):
                unknown = sorted(set(entry) - {"token", "ids"})
                if unknown:
                    raise ValueError(
                        f"tokens.{role}: unknown key(s) {unknown} in a token entry (use token, ids)"
                    )
                token, ids = entry.get("token"), entry.get("ids", ["*"])
                ids = [ids] if isinstance(ids, str) else list(ids or [])
            else:
                token, ids = entry, ["*"]
            if not isinstance(token, str) or not token:
                raise ValueError(f"tokens.{role}: an empty token")
            if not ids or not all(isinstance(pattern, str) and pattern for pattern in ids):
                raise ValueError(f"tokens.{role}: ids must be a non-empty list of id patterns")
            if token in seen:
                raise ValueError(
                    f"tokens: the same token is configured twice (roles {seen[token]!r} and {role!r})"
                )
            seen[token] = role
            entries.append((token, Identity(role, tuple(ids))))
    return entries


class TokenAuth:
    def __init__(self, tokens: Mapping[str, Sequence]):
        self._tokens = [(token.encode(), identity) for token, identity in token_entries(tokens)]

    def identity_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Identity | None:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        presented = header[len("Bearer ") :].strip().encode()
        found = None
        for token, identity in self._tokens:  # compare every token in constant time: no timing hints
            if hmac.compare_digest(presented, token):
                found = identity
        return found

    def role_of(self, metadata) -> str | None:
        identity = self.identity_of(metadata)
        return None if identity is None else identity.role


def _tolerant(deserializer):
    """A request deserializer that turns bytes that are not a valid message into an Undecodable."""

    def parse(data: bytes):
        try:
            return deserializer(data)
        except (
            DecodeError,
            ValueError,
            TypeError,
        ) as err:  # protobuf raises DecodeError, or others on odd input
            return Undecodable(len(data), str(err))

    return parse


def _parsing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler with a tolerant deserializer. Streamed requests are checked by their handlers
    (serve_session, Publish) with check_decoded, so the hot path has no extra layer; a unary request is
    checked here."""
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return make(handler.stream_stream or handler.stream_unary, **kwargs)

    async def checked(request, context) -> None:
        try:
            check_decoded(request, method, context)
        except FleetError as err:
            await context.abort(err.code, err.message)

    if handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream):

        async def unary_stream(request, context):
            await checked(request, context)
            async for response in handler.unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.response_streaming:  # a handler that writes its responses itself (context.write)

        async def unary_writing(request, context) -> None:
            await checked(request, context)
            await handler.unary_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_writing, **kwargs)

    async def unary_unary(request, context):
        await checked(request, context)
        return await handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth):
        self._auth = auth

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        role = self._auth.role_of(details.invocation_metadata)
        if role is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown token: send metadata 'authorization: Bearer <token>'",
            )
        allowed = METHOD_ROLES.get(details.method, frozenset())
        if role not in allowed:
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {role!r} may not call {details.method} (allowed: {sorted(allowed) or 'nobody'})",
            )
        return _parsing(handler, details.method.rsplit("/", 1)[-1])


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that only aborts with (code, message)."""
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.response_streaming:

        async def refuse_stream(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - makes this an async generator, as streaming handlers are

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(refuse_stream, **kwargs)

    async def refuse(request, context):
        await context.abort(code, message)

    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(refuse, **kwargs)
