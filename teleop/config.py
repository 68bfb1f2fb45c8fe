"""The console's settings: `flotilla console` (configs/console.yaml holds only what differs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.schema import check, check_int, check_number, register_job
from fleet.server.config import is_loopback


@dataclass
class ConsoleConfig:
    """`flotilla console [server=HOST:PORT] [port=8080]` (configs/console.yaml)."""

    server: str = "127.0.0.1:50051"  # the fleet server the console is an operator client of
    host: str = "127.0.0.1"  # where browsers reach the console; beyond loopback it needs tls_cert/tls_key
    port: int = 8080  # 0: the OS picks a free one (printed)
    root_certificates: str = ""  # PEM of the fleet server's CA when the fleet server uses TLS
    tls_cert: str = ""  # the console's own HTTPS certificate and key (PEM paths)
    tls_key: str = ""
    # Origins whose pages may sign in and open the console's WebSocket besides its own (scheme://host:port as
    # configured, and localhost on loopback): a reverse proxy's public origin, or the names of a host=0.0.0.0.
    allowed_origins: list[str] = field(default_factory=list)
    status_hz: float = 2.0  # fleet view refreshes per second (robots, signals, tallies, rounds)
    # When an operator's last tab closes, the console ends their fleet session after this long (a reload
    # keeps it); their robots hold at once anyway (the server's teleop watchdog) and then re-queue.
    session_grace_s: float = 3.0
    signin_timeout_s: float = 5.0  # how long a sign-in waits for the fleet server to accept the token
    session_ttl_s: float = 12 * 3600.0  # a session cookie is good for this long
    # Connection limits (teleop/guard.py), so a flood of sockets cannot lock operators out of a stop:
    read_timeout_s: float = 5.0  # a request's head and body must be in this long after its first byte
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this long
    max_connections: int = 512  # open connections in all (pages' sockets too); beyond: 503 and closed
    max_connections_per_client: int = 64  # open connections from one client address; beyond: 503
    shutdown_grace_s: float = 2.0  # at a stop, requests still running get this long (idle ones are closed)

    def __post_init__(self):
        check(":" in self.server, "server", f"must be HOST:PORT, got {self.server!r}")
        check_int(self.port, "port", 0)
        check(self.port <= 65535, "port", f"must be 0-65535, got {self.port}")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "tls_cert and tls_key go together")
        check(
            is_loopback(self.host) or bool(self.tls_cert),
            "host",
            f"{self.host} is beyond loopback: serve the console over HTTPS there (tls_cert, tls_key), "
            "operator tokens and session cookies must not cross a network in the clear",
        )
        timeouts = ("read_timeout_s", "keep_alive_s", "shutdown_grace_s")
        for key in ("status_hz", "session_grace_s", "signin_timeout_s", "session_ttl_s", *timeouts):
            check_number(getattr(self, key), key, 0, low_open=True)
        check_int(self.max_connections, "max_connections", 1)
        check_int(self.max_connections_per_client, "max_connections_per_client", 1)
        check(
            self.max_connections_per_client <= self.max_connections,
            "max_connections_per_client",
            f"{self.max_connections_per_client} is more than max_connections ({self.max_connections})",
        )
        check(
            self.host not in ("0.0.0.0", "::", "") or bool(self.allowed_origins),
            "allowed_origins",
            f"host {self.host or '(empty)'} listens on every address: name the origins operators' browsers use "
            "(e.g. https://console.lab:8080) so pages from anywhere else are refused",
        )
        for origin in self.allowed_origins:
            check(
                isinstance(origin, str) and origin.startswith(("http://", "https://")),
                "allowed_origins",
                f"an origin is scheme://host[:port], got {origin!r}",
            )


register_job("console", ConsoleConfig)
