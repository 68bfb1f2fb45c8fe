"""The fleet server: wiring (gRPC services, auth, episode writer, registry, metrics, allocation tick),
start/stop, and `run(cfg)`, the entry of `flotilla serve` (configs/serve.yaml).

    server = FleetServer(ServerConfig(...))      # or FleetServer(config, allocator=allocation.Allocator(...))
    await server.start()                         # binds; server.port / server.metrics_port say where
    ...
    await server.stop()                          # graceful, see below

`ServerThread` runs one on its own event loop in a background thread (tests, simulated fleets).

Graceful stop: new sessions and steps are refused, every open stream is finished normally, the gRPC
server stops, the episode writer drains its queue and commits what ended; episodes still open are
committed with outcome "shutdown" (success false), so nothing that was acked is lost; the store is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
from pathlib import Path

import grpc

from fleet.allocation import Allocator
from fleet.open_files import raise_open_files_limit
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server.auth import AuthInterceptor, TokenAuth
from fleet.server.config import ServerConfig
from fleet.server.fleet import Fleet
from fleet.server.metrics import Metrics, MetricsHttpServer
from fleet.server.operators import OperatorService
from fleet.server.policy_thresholds import published_thresholds
from fleet.server.registry import PolicyRegistry, RegistryService
from fleet.server.robots import RobotService
from fleet.server.streams import CallLimits
from fleet.server.writer import EpisodeWriter
from fleet.store import EpisodeStore, StoreCorruptError, StoreError

log = logging.getLogger(__name__)

# HTTP/2 pings find peers that vanished without closing (a cut cable, a frozen host); the fleet's own
# silence timeouts (robot_silence_s, operator_silence_s) find frozen processes faster. Clients ping no
# more often than the server permits (fleet/client/_session.py uses the same numbers).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
]
WRITER_CLOSE_TIMEOUT_S = 60.0  # a store that cannot be written must not hang a stop forever


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    async def Status(self, request, context):  # noqa: N802 - the generated servicer's name
        return self.fleet.status()


class FleetServer:
    def __init__(self, config: ServerConfig, allocator: Allocator | None = None):
        self.config = config
        # The one place the allocation rule plugs in (fleet/allocation/); Fleet.tick calls it, and t_T and
        # t_R are read from allocator.config (a given allocator's own, not config.allocation's).
        self.allocator = allocator or Allocator(config.allocation)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.fleet: Fleet | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: MetricsHttpServer | None = None
        self._tick: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        raise_open_files_limit()
        loop = asyncio.get_running_loop()
        if not config.tokens:
            raise ValueError("serve: no tokens configured; every call would be refused")
        problems = config.exposure_problems()
        if problems and not config.insecure:
            raise ValueError(
                "refusing to listen beyond loopback insecurely: "
                + "; ".join(problems)
                + " (or set insecure=true on a closed network)"
            )
        for problem in problems:
            log.warning("INSECURE (insecure=true): %s", problem)
        try:
            store, damage = EpisodeStore.open(config.store, mode="a"), ""
        except StoreCorruptError as err:
            # Damage where the next commit would write (an array's last chunk): appending would build on
            # it. Serve without logging rather than not at all: robots, operators and stops work, every
            # step is refused with this message (robots keep them), readers still read the rest.
            store, damage = EpisodeStore.open(config.store), f"the episode store is damaged: {err}"
            log.error("%s; serving WITHOUT logging episodes until the store is repaired", damage)
        writer = EpisodeWriter(
            store,
            config.writer_queue_size,
            config.writer_batch_episodes,
            on_error=lambda key, message: loop.call_soon_threadsafe(self.fleet.writer_failed, key, message),
            on_commit=lambda keys: loop.call_soon_threadsafe(self.fleet.episodes_committed, keys),
        )
        writer.error = damage
        registry = PolicyRegistry(config.registry_dir, config.max_checkpoint_bytes)
        self.metrics = Metrics(gauges=self._gauges(writer))
        self.writer = writer
        self.fleet = fleet = Fleet(
            config, writer, self.metrics, self.allocator, latest_policy=registry.latest()
        )
        fleet.use_policy_thresholds(registry.latest(), self._policy_thresholds(registry, registry.latest()))

        def new_latest(version: str) -> None:
            fleet.policy_published(version, self._policy_thresholds(registry, version))

        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # A connection with no call open (one that only pings, or whose calls are done) is closed: a
            # peer, even one without a token, cannot hold thousands of them (a file descriptor each).
            ("grpc.max_connection_idle_ms", int(config.idle_connection_s * 1000)),
            *KEEPALIVE_OPTIONS,
        ]
        auth = TokenAuth(config.tokens)
        # One count of open calls across robot and operator sessions and fetches: a token's or an
        # address's calls of every kind together.
        limits = CallLimits(config.max_calls_per_token, config.max_calls_per_peer)
        server = grpc.aio.server(interceptors=[AuthInterceptor(auth)], options=options)
        pb_grpc.add_RobotServiceServicer_to_server(RobotService(fleet, auth, limits), server)
        pb_grpc.add_OperatorServiceServicer_to_server(OperatorService(fleet, auth, limits), server)
        pb_grpc.add_RegistryServiceServicer_to_server(
            RegistryService(
                registry,
                config.registry_chunk_bytes,
                new_latest,
                config.max_concurrent_fetches,
                config.stalled_reader_s,
                auth=auth,
                limits=limits,
                fetch_turns_per_caller=config.max_fetches_per_caller,
            ),
            server,
        )
        pb_grpc.add_AdminServiceServicer_to_server(AdminService(fleet), server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._grpc = server
        if config.metrics_port is not None:
            self._http = MetricsHttpServer(self.metrics, config.metrics_host, config.metrics_port)
            self.metrics_port = self._http.port
        self._tick = fleet.spawn(self._tick_loop())
        log.info(
            "fleet server on %s (%s), metrics on %s, store %s",
            self.address,
            "TLS" if config.tls_cert else "insecure",
            self.metrics_port,
            config.store,
        )

    def _policy_thresholds(self, registry: PolicyRegistry, version: str) -> dict | None:
        """The version's calibrated request thresholds for the allocator (fleet/server/policy_thresholds.py),
        or None with allocation.policy_thresholds off; a version whose safety.json cannot be used gets
        the configured thresholds, with a warning: the policy itself is still served."""
        if not self.config.allocation.policy_thresholds or not version:
            return None
        try:
            return published_thresholds(registry.root / version)
        except ValueError as err:
            log.warning("policy %s: its calibrated request thresholds are not used: %s", version, err)
            return {}

    def _gauges(self, writer: EpisodeWriter) -> dict:
        def connected(items) -> int:
            return sum(1 for item in list(items) if getattr(item, "outbox", True) is not None)

        return {
            "robots_connected": (
                "robots with an open session",
                lambda: connected(self.fleet.robots.values()),
            ),
            "operators_connected": ("operators with an open session", lambda: len(self.fleet.operators)),
            "writer_queue_depth": ("work items waiting for the episode writer", lambda: writer.depth),
            "episodes_committed_total": (
                "episodes committed to the store",
                lambda: writer.stats.episodes_committed,
            ),
            "steps_logged_total": ("steps committed to the store", lambda: writer.stats.steps_logged),
            "writer_failures_total": (
                "episodes the writer could not store (reported to the robot)",
                lambda: writer.stats.failures,
            ),
            "writer_healthy": (
                "1 while the episode store can be written; 0: steps are refused",
                lambda: int(writer.healthy),
            ),
            "robot_records": (
                "robot records kept (connected or recently departed)",
                lambda: len(self.fleet.robots),
            ),
        }

    async def _tick_loop(self) -> None:
        period = 1.0 / self.config.allocation.tick_hz
        while True:
            await asyncio.sleep(period)
            try:
                self.fleet.tick()
            except Exception:  # a faulty allocator must not stop the fleet: log, try again next tick
                log.exception("allocation tick failed")

    async def stop(self) -> None:
        """Graceful stop (see the module docstring). Safe to call more than once."""
        if self._grpc is None:
            return
        server, self._grpc = self._grpc, None
        self._tick.cancel()
        self.fleet.shutdown()
        await self.fleet.estops_saved()
        await server.stop(self.config.shutdown_grace_s)
        await asyncio.to_thread(self.writer.close, WRITER_CLOSE_TIMEOUT_S)
        if self._http is not None:
            self._http.close()
        log.info(
            "fleet server stopped: %d episodes committed, %d steps logged",
            self.writer.stats.episodes_committed,
            self.writer.stats.steps_logged,
        )
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class ServerThread:
    """A FleetServer on its own event loop in a daemon thread: `with ServerThread(config) as server: ...`."""

    def __init__(self, config: ServerConfig, allocator: Allocator | None = None):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fleet-server", daemon=True)
        self._allocator = allocator
        self.server: FleetServer | None = None

    def start(self, timeout: float = 30) -> ServerThread:
        self._thread.start()
        self.server = self.call(FleetServer, self.config, self._allocator)
        self.run(self.server.start(), timeout)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def run(self, coro, timeout: float | None = 30):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args, timeout: float | None = 30):
        """Call `fn(*args)` on the server's loop (where all fleet state lives) and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def invoke():
            try:
                future.set_result(fn(*args))
            except BaseException as err:
                future.set_exception(err)

        self.loop.call_soon_threadsafe(invoke)
        return future.result(timeout)

    def stop(self, timeout: float = 60) -> None:
        if self.server is not None and self._thread.is_alive():
            self.run(self.server.stop(), timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    server = FleetServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"flotilla serve: fleet server on {server.address}, "
        f"{'metrics off' if server.metrics_port is None else f'metrics on port {server.metrics_port}'} "
        f"(Ctrl-C stops gracefully)",
        flush=True,
    )
    await stop.wait()
    print("flotilla serve: stopping (draining the episode writer)...", flush=True)
    await server.stop()


def run(cfg) -> None:
    """`flotilla serve` (hydra config configs/serve.yaml)."""
    if not isinstance(cfg, dict):  # a hydra DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(ServerConfig.from_dict(cfg)))
    except (
        ValueError,
        StoreError,
        OSError,
    ) as err:  # a bad setting, store or address: one line, no traceback
        print(f"flotilla serve: {err}", file=sys.stderr)
        raise SystemExit(2) from None  # the exit code of every other job's one-line config error
