"""Policies for fleet robots from the fleet server's registry: `RegistryPolicies` is the robot agent's
`load_policy(version)` (fleet/agent.py), used by the simulated fleet (sim/fleet_sim.py) and meant for
the ROS 2 node as well. Checkpoints are fetched with the client SDK (sha256-verified) and loaded once
per version; torch is imported only when a policy is first needed. ``device`` (auto | cpu | cuda | cuda:N)
is where the weights are loaded and the robots' plans run; ``cuda_graphs`` replays plans from CUDA graphs
(policies/runner.py); with a ``planner`` (policies/batched.py) the robots' plans are batched per tick."""

from __future__ import annotations

import threading
from pathlib import Path

from fleet.client import fetch_checkpoint


class RegistryPolicies:
    """`load_policy(version)` for the agents: fetch a checkpoint from the registry once per version
    (into `cache_dir`), load it once, and give every robot its own PolicyRunner over the shared weights.
    Version "" means the registry's latest."""

    def __init__(
        self,
        address: str,
        token: str,
        cache_dir: str | Path,
        num_samples: int = 1,
        root_certificates=None,
        device: str = "auto",
        cuda_graphs: bool = False,
        planner=None,
    ):
        from policies.device import check_device

        check_device(device)  # a bad name fails here, not at the first policy swap
        self.address, self.token, self.cache_dir = address, token, Path(cache_dir)
        self.num_samples, self.device, self.cuda_graphs = num_samples, device, cuda_graphs
        self.planner = planner  # a policies.batched.BatchedPlanner, or None: every robot plans alone
        self.root_certificates = root_certificates
        self._lock = threading.Lock()
        self._checkpoints: dict[str, object] = {}
        # Each version's safety models (policies/safety), None without: its robots report learned risk.
        self._safety: dict[str, object] = {}

    def __call__(self, version: str = ""):
        from policies.checkpoint import load_checkpoint  # torch is imported only when a policy is needed
        from policies.device import resolve_device
        from policies.runner import PolicyRunner
        from policies.safety.models import load_safety

        with self._lock:  # one download and one load per version, however many robots ask at once
            if version and version in self._checkpoints:
                checkpoint = self._checkpoints[version]
            else:
                folder = self.cache_dir / version if version else None
                if folder is None or not (folder / "config.json").exists():
                    folder = fetch_checkpoint(
                        self.address,
                        self.token,
                        self.cache_dir,
                        version,
                        root_certificates=self.root_certificates,
                    )
                version = folder.name
                if version not in self._checkpoints:  # "latest" may be a version loaded already
                    self._checkpoints[version] = load_checkpoint(
                        folder, map_location=resolve_device(self.device)
                    )
                    self._safety[version] = load_safety(folder)
                checkpoint = self._checkpoints[version]
        if self.planner is not None:
            return self.planner.runner(
                checkpoint.policy,
                version,
                num_samples=self.num_samples,
                action_space=checkpoint.action_space,
                safety=self._safety.get(version),
            )
        return PolicyRunner(
            checkpoint.policy,
            version,
            self.num_samples,
            action_space=checkpoint.action_space,
            cuda_graphs=self.cuda_graphs,
            safety=self._safety.get(version),
        )
