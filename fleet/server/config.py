"""The fleet server's settings (configs/serve.yaml is the hydra form of this dataclass)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from fleet.allocation.core import AllocatorConfig, check_number
from fleet.server.auth import token_entries

# The tokens configs/serve.yaml falls back to when no FLOTILLA_*_TOKEN variable is set: fine on
# loopback for a developer, refused beyond it (see ServerConfig.check_exposure).
DEV_TOKENS = frozenset({"dev-robot-token", "dev-operator-token", "dev-trainer-token", "dev-admin-token"})
MIN_TOKEN_CHARS = 16


@dataclasses.dataclass(frozen=True)
class AllocationConfig(AllocatorConfig):
    """configs/serve.yaml's ``allocation`` block: the allocator's settings (fleet.allocation.AllocatorConfig:
    rule, t_T, t_R, thresholds, one block per rule) plus how often the server ticks it."""

    tick_hz: float = 10.0  # the allocator counts time in ticks: set it to the robots' control rate
    # Fix the uncertainty and risk thresholds from each published policy's own calibration (its
    # safety.json, written by `flotilla safety`) while it is the latest; a policy without one, or false
    # here: the thresholds above (fleet/server/policy_thresholds.py).
    policy_thresholds: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("allocation.tick_hz", self.tick_hz)
        if not self.tick_hz > 0:
            raise ValueError(f"allocation.tick_hz must be positive, got {self.tick_hz!r}")


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: the OS picks a free port (FleetServer.port tells which)
    metrics_port: int | None = 9100  # Prometheus text on http://metrics_host:metrics_port/metrics; None: off
    metrics_host: str = "127.0.0.1"  # metrics carry fleet state: loopback unless configured
    # role -> accepted tokens (callers send `authorization: Bearer <token>`). An entry is a token (it may
    # use any robot/operator id) or {token: ..., ids: [patterns]} binding it to the ids it may use.
    tokens: dict[str, list] = dataclasses.field(default_factory=dict)
    tls_cert: str = ""  # PEM paths; both set: TLS, both empty: insecure (only on loopback, see insecure)
    tls_key: str = ""
    # Beyond loopback the server refuses to start without TLS and real tokens; insecure=true overrides
    # that (loudly), for a closed lab network only.
    insecure: bool = False
    store: str = "data/fleet.zarr"
    writer_queue_size: int = 1024  # steps waiting for the episode writer before robots are refused
    writer_batch_episodes: int = 16  # most episodes committed in one commit_many
    registry_dir: str = "data/registry"
    registry_chunk_bytes: int = 1024 * 1024
    max_concurrent_fetches: int = 16  # checkpoint fetches sending at once; more wait their turn
    # ... of which at most this many go to one token, and to one address: a caller's fetches that never
    # read (each keeps its turn until its stream is gone) cannot take every turn.
    max_fetches_per_caller: int = 4
    # Open calls (robot and operator sessions, fetches) one token, and one address, may hold at once;
    # beyond: RESOURCE_EXHAUSTED. A stalled stream is gone only when its peer reads or disconnects, so
    # this bounds what one token holder's stalled streams cost. A fleet sharing one token (or simulated
    # robots on one host) needs one per robot plus one for its reconnect: raise these for larger fleets.
    max_calls_per_token: int = 2048
    max_calls_per_peer: int = 2048
    max_checkpoint_bytes: int = 4 * 1024**3
    allocation: AllocationConfig = dataclasses.field(default_factory=AllocationConfig)
    pre_intervention_steps: int = 15
    max_frame_bytes: int = 1024 * 1024  # a robot's camera frame (JPEG) larger than this is refused
    max_message_bytes: int = 32 * 1024 * 1024
    frame_hz: float = 10.0  # most RobotFrames per second per robot sent to its operator
    robot_ids: list[str] = dataclasses.field(default_factory=list)  # allowed robot ids; empty: any
    resume_grace_s: float = 30.0  # a disconnected robot's open episode waits this long for it to resume
    shutdown_grace_s: float = 2.0
    max_episode_steps: int = 10_000  # an episode this long is committed with outcome "too_long"
    # ... and one holding this many observation bytes (an open episode is kept in memory until it ends)
    max_episode_bytes: int = 1024**3
    # ... and all robots' open episodes together (one token may use many robot ids): past it, the largest
    # open episode is committed as "too_long"
    max_open_episode_bytes: int = 4 * 1024**3
    max_step_bytes: int = 16 * 1024 * 1024  # most bytes of observation a hello may declare per step
    # Liveness: a session that sends nothing (clients heartbeat when idle) for this long is ended; its
    # robot holds and goes back to the queue, or its operator is freed.
    robot_silence_s: float = 1.0
    operator_silence_s: float = 1.0
    # A session whose first message (its hello) does not come within this is ended: an opened, silent
    # stream holds server memory (~30 kB) for as long as its connection lives.
    hello_timeout_s: float = 10.0
    # A session that reads none of the server's replies for this long (gRPC's flow control holds the
    # write) is ended with RESOURCE_EXHAUSTED: its replies would pile up in the server for ever.
    stalled_reader_s: float = 10.0
    idle_connection_s: float = 300.0  # a connection with no call open this long is closed (clients reconnect)
    # The teleop watchdog: a robot under an operator holds when no fresh action came for this long (the
    # console sends 25 per second while the deadman is held), so it holds within this + one control tick
    # of the operator's input stopping, however the page or its network failed.
    teleop_watchdog_s: float = 0.12
    forget_robot_after_s: float = 300.0  # a departed robot's record (idle, not stopped) is dropped after this
    max_robots: int = 10_000  # robot records kept at once (connected or recently departed)
    # A step labelled intervention is logged as one only if that operator controls the robot, or did
    # until at most this long ago (steps in flight when control changed).
    label_grace_s: float = 1.0
    # Protective stops survive a restart of the server: they are kept in this file ("" = beside the store).
    estop_file: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.allocation, Mapping):
            self.allocation = AllocationConfig.from_dict(self.allocation)
        elif not isinstance(self.allocation, AllocationConfig):
            raise ValueError(f"allocation must be a mapping or an AllocationConfig, got {self.allocation!r}")
        self.tokens = {
            role: [tokens] if isinstance(tokens, str | Mapping) else list(tokens or [])
            for role, tokens in dict(self.tokens).items()
        }
        token_entries(self.tokens)  # checks roles, duplicates and entry shapes
        check_scalar_types(self)
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0-65535, got {port!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together (or both left empty for insecure)")
        for name in (
            "writer_queue_size",
            "registry_chunk_bytes",
            "max_concurrent_fetches",
            "max_fetches_per_caller",
            "max_calls_per_token",
            "max_calls_per_peer",
            "max_episode_steps",
            "max_episode_bytes",
            "max_open_episode_bytes",
            "max_step_bytes",
            "max_robots",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in (
            "robot_silence_s",
            "operator_silence_s",
            "forget_robot_after_s",
            "label_grace_s",
            "teleop_watchdog_s",
            "hello_timeout_s",
            "stalled_reader_s",
            "idle_connection_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def exposure_problems(self) -> list[str]:
        """Why serving this config beyond loopback would be unsafe ([] when it is fine or loopback-only)."""
        problems = []
        if not is_loopback(self.host):
            if not self.tls_cert:
                problems.append(f"host {self.host} is not loopback and TLS is off (set tls_cert and tls_key)")
            weak = sorted(
                {
                    role
                    for role, token in self.token_pairs()
                    if token in DEV_TOKENS or len(token) < MIN_TOKEN_CHARS
                }
            )
            if weak:
                problems.append(
                    f"role(s) {weak} use a development token or one shorter than {MIN_TOKEN_CHARS} "
                    "characters (set FLOTILLA_*_TOKEN)"
                )
        if self.metrics_port is not None and not is_loopback(self.metrics_host) and not self.tls_cert:
            problems.append(
                f"metrics_host {self.metrics_host} is not loopback (metrics have no TLS or tokens)"
            )
        return problems

    def token_pairs(self) -> list[tuple[str, str]]:
        return [(identity.role, token) for token, identity in token_entries(self.tokens)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ServerConfig:
        """From a plain mapping (e.g. OmegaConf.to_container of the hydra config); unknown keys are errors."""
        return _build(cls, values, "serve")


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_scalar_types(config) -> None:
    """Every scalar field (int, float, str, bool, optionally None) holds its type: a value from the command
    line like port=abc is refused here, naming the key, rather than deep inside gRPC."""
    for field in dataclasses.fields(config):
        kinds = [kind.strip() for kind in str(field.type).split("|")]
        if not all(kind in _SCALARS or kind == "None" for kind in kinds):
            continue  # containers and nested configs check themselves
        value = getattr(config, field.name)
        allowed = tuple(t for kind in kinds if kind != "None" for t in _SCALARS[kind])
        ok = (value is None and "None" in kinds) or (
            isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        )
        if not ok:
            raise ValueError(f"{field.name} must be {field.type}, got {value!r}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _build(cls, values: Mapping[str, Any], where: str):
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(values))
