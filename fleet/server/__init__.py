"""The Flotilla fleet server (gRPC): robot and operator sessions, allocation tick, episode writer,
policy registry, admin status and Prometheus metrics. `flotilla serve` runs `fleet.server.app:run`.

    fleet/server/app.py        FleetServer (start/stop), ServerThread, run(cfg)
    fleet/server/config.py     ServerConfig, AllocationConfig (configs/serve.yaml)
    fleet/server/fleet.py      the fleet's state and control rules (modes, takeover, release, e-stop),
                               and the allocation tick that drives fleet/allocation/ (the rules)
    fleet/server/robots.py     robot sessions: hello spec, step checks
    fleet/server/operators.py  operator sessions
    fleet/server/writer.py     the episode writer and committer threads (own the EpisodeStore)
    fleet/server/registry.py   the policy registry
    fleet/server/auth.py       tokens -> roles
    fleet/server/metrics.py    Prometheus text over HTTP
"""

from fleet.server.app import FleetServer, ServerThread, run
from fleet.server.config import AllocationConfig, ServerConfig

__all__ = ["AllocationConfig", "FleetServer", "ServerConfig", "ServerThread", "run"]
