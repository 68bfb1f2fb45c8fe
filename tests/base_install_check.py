"""What a base install (`pip install flotilla`, no extras) must run: a fleet server, a robot client that
streams an episode the server commits, an operator client that is assigned the robot, the registry, and
the `flotilla` command's server-side jobs.

    python tests/base_install_check.py WORKDIR [--refuse FILE]

--refuse FILE (a JSON list of top-level module names) first hides those modules from every import
finder, as if not installed, so this runs as if only the base were installed
(tests/test_install_parts.py refuses every module that no base dependency provides). It prints one
JSON line at the end: the top-level modules imported from outside the standard library, and where
`fleet` was imported from.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import sys
import time
from pathlib import Path

TOKENS = {
    "robot": ["robot-token"],
    "operator": ["operator-token"],
    "trainer": ["trainer-token"],
    "admin": ["admin-token"],
}
SPEC = {"state": ((3,), "float32"), "rgb": ((8, 8, 3), "uint8")}


class Hidden(importlib.abc.MetaPathFinder):
    """Wraps an import finder so that it finds none of the top-level modules `names` (nor their
    submodules): `import NAME` raises ModuleNotFoundError and `importlib.util.find_spec(NAME)` is None,
    as if they were not installed."""

    def __init__(self, finder, names: frozenset[str]):
        self.finder, self.names = finder, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            return None
        return self.finder.find_spec(fullname, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def hide_modules(names) -> None:
    names = frozenset(names)
    # Forget what the interpreter's start-up imported (.pth files: setuptools' _distutils_hack, certifi).
    for name in [name for name in sys.modules if name.partition(".")[0] in names]:
        del sys.modules[name]
    sys.meta_path[:] = [
        Hidden(finder, names) if hasattr(finder, "find_spec") else finder for finder in sys.meta_path
    ]


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run(workdir: Path) -> None:
    import numpy as np

    import fleet.agent  # noqa: F401  (the robot agent: imports no policy code)
    from fleet.client import OperatorClient, RobotClient, fetch_checkpoint, list_policies, publish_checkpoint
    from fleet.labels import ControlLabel
    from fleet.server import AllocationConfig, ServerConfig, ServerThread
    from fleet.store import EpisodeStore
    from flotilla.cli import main as flotilla

    store_path = workdir / "fleet.zarr"
    config = ServerConfig(
        port=0,
        metrics_port=0,
        tokens=TOKENS,
        store=str(store_path),
        registry_dir=str(workdir / "registry"),
        shutdown_grace_s=0.5,
        allocation=AllocationConfig(
            rule="cur", tick_hz=20, t_T=3, t_R=2, uncertainty_threshold=0.5, risk_threshold=0.5
        ),
    )
    with ServerThread(config) as server:
        operator = OperatorClient(server.address, "operator-token", "op-1", backoff=(0.05, 0.2)).start()
        robot = RobotClient(
            server.address, "robot-token", "arm-1", "push", SPEC, action_dim=2, backoff=(0.05, 0.2)
        ).start()
        try:
            assert operator.next_update(10, kind="queue") is not None, "the operator never got the queue"
            robot.start_episode(1)
            for t in range(6):
                observation = {"state": np.full(3, t, np.float32), "rgb": np.full((8, 8, 3), t, np.uint8)}
                robot.step(
                    1,
                    t,
                    observation,
                    np.array([t, -t], np.float32),
                    ControlLabel.ROBOT,
                    signals={"uncertainty": 0.9 if t == 5 else 0.1},
                )
            assert operator.next_update(10, kind="assignment") is not None, (
                "the uncertain robot was not assigned"
            )
            operator.release("arm-1")
            assert robot.wait_committed(robot.end_episode(1, success=True), timeout=20), (
                "episode not committed"
            )

            checkpoint = workdir / "checkpoint"
            checkpoint.mkdir()
            (checkpoint / "config.json").write_text('{"kind": "test"}')
            (checkpoint / "model.safetensors").write_bytes(bytes(range(256)) * 64)
            publish_checkpoint(server.address, "trainer-token", checkpoint, "v1")
            assert list(list_policies(server.address, "robot-token").versions) == ["v1"]
            fetched = fetch_checkpoint(server.address, "robot-token", workdir / "fetched")
            assert (fetched / "model.safetensors").read_bytes() == (
                checkpoint / "model.safetensors"
            ).read_bytes()
        finally:
            robot.close(timeout=2)
            operator.close(timeout=2)

    store = EpisodeStore.open(str(store_path))
    assert store.num_episodes == 1, store.num_episodes
    # The `flotilla` command's jobs leave nothing in the working directory (no hydra logs or outputs).
    cwd = workdir / "cwd"
    cwd.mkdir()
    os.chdir(cwd)
    assert flotilla(["info", str(store_path)]) == 0
    assert flotilla(["serve", "--cfg", "job"]) == 0  # the server's hydra config composes
    assert not list(cwd.iterdir()), f"jobs wrote into the working directory: {sorted(cwd.iterdir())}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--refuse", type=Path, help="a JSON list of top-level module names to refuse")
    args = parser.parse_args()
    if args.refuse:
        hide_modules(json.loads(args.refuse.read_text()))
    run(args.workdir)
    import fleet

    loaded = sorted({name.partition(".")[0] for name in sys.modules} - set(sys.stdlib_module_names))
    print(json.dumps({"loaded": loaded, "fleet": fleet.__file__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
