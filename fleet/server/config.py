"""The fleet server's settings (configs/serve.yaml is the hydra form of this dataclass)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ROLES = ("robot", "operator", "trainer", "admin")


@dataclasses.dataclass
class AllocationConfig:
    """The allocation tick; every setting but tick_hz goes to fleet.allocation.make_allocator."""

    policy: str = "flotilla"  # "flotilla", "cur" or "random" (fleet/allocation.py)
    tick_hz: float = 10.0  # the allocator counts time in ticks: set it to the robots' control rate
    t_T: int = 20  # minimum ticks an operator keeps a robot it took over
    t_R: int = 10  # ticks a human reset of a blocked robot takes
    uncertainty_threshold: float | None = None  # None: calibrated to the request rate options.alpha
    risk_threshold: float | None = None
    options: dict = dataclasses.field(default_factory=dict)  # other AllocatorConfig settings (alpha, window, ...)

    def allocator_settings(self) -> dict:
        return dict(t_T=self.t_T, t_R=self.t_R, uncertainty_threshold=self.uncertainty_threshold,
                    risk_threshold=self.risk_threshold, **self.options)


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: the OS picks a free port (FleetServer.port tells which)
    metrics_port: int | None = 9100  # Prometheus text on http://host:metrics_port/metrics; None: off
    # role -> accepted tokens (callers send `authorization: Bearer <token>`).
    tokens: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tls_cert: str = ""  # PEM paths; both set: TLS, both empty: insecure (keep host on 127.0.0.1 then)
    tls_key: str = ""
    store: str = "data/fleet.zarr"
    writer_queue_size: int = 1024  # steps waiting for the episode writer before robots are refused
    writer_batch_episodes: int = 16  # most episodes committed in one commit_many
    registry_dir: str = "data/registry"
    registry_chunk_bytes: int = 1024 * 1024
    max_checkpoint_bytes: int = 4 * 1024 ** 3
    allocation: AllocationConfig = dataclasses.field(default_factory=AllocationConfig)
    pre_intervention_steps: int = 15
    max_frame_bytes: int = 1024 * 1024  # a robot's camera frame (JPEG) larger than this is refused
    max_message_bytes: int = 32 * 1024 * 1024
    frame_hz: float = 10.0  # most RobotFrames per second per robot sent to its operator
    robot_ids: list[str] = dataclasses.field(default_factory=list)  # allowed robot ids; empty: any
    resume_grace_s: float = 30.0  # a disconnected robot's open episode waits this long for it to resume
    shutdown_grace_s: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.allocation, Mapping):
            self.allocation = _build(AllocationConfig, self.allocation, "allocation")
        self.tokens = {role: [tokens] if isinstance(tokens, str) else list(tokens or [])
                       for role, tokens in dict(self.tokens).items()}
        unknown = sorted(set(self.tokens) - set(ROLES))
        if unknown:
            raise ValueError(f"tokens: unknown role(s) {unknown}; roles are {list(ROLES)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together (or both left empty for insecure)")
        if self.writer_queue_size < 1 or self.registry_chunk_bytes < 1 or self.allocation.tick_hz <= 0:
            raise ValueError("writer_queue_size, registry_chunk_bytes and allocation.tick_hz must be positive")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ServerConfig:
        """From a plain mapping (e.g. OmegaConf.to_container of the hydra config); unknown keys are errors."""
        return _build(cls, values, "serve")


def _build(cls, values: Mapping[str, Any], where: str):
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(values))
