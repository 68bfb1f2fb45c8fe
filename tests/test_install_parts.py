"""The installable parts (pyproject.toml): the base install (no extras) is the episode store, the protocol,
the fleet server, the client SDKs, the robot agent and the `flotilla` command, and that is enough to run a
server, a robot client whose episode gets committed, an operator client and the registry.

tests/base_install_check.py is the scenario. Here it runs with every module that no base dependency
provides refused by an import hook (fast, no network), and, marked slow, in a fresh virtual environment
with only the base installed from the package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCENARIO = REPO / "tests" / "base_install_check.py"
# What the base must never pull in: the heavy parts a fleet server machine or a robot's client has no use
# for, each distribution with the modules it installs (the import hook refuses those).
NOT_BASE_PARTS = {
    "torch": ["torch"],
    "pybullet": ["pybullet", "pybullet_data", "pybullet_utils"],
    "robosuite": ["robosuite"],
    "mujoco": ["mujoco"],
    "diffusers": ["diffusers"],
    "tensorboard": ["tensorboard"],
    "matplotlib": ["matplotlib"],
    "gymnasium": ["gymnasium"],
    "safetensors": ["safetensors"],
    "tqdm": ["tqdm"],
    "grpcio-tools": ["grpc_tools"],
}
NOT_BASE = list(NOT_BASE_PARTS)
NOT_BASE_MODULES = [module for modules in NOT_BASE_PARTS.values() for module in modules]


def base_requirements() -> list[Requirement]:
    return [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the distributions the requirements install, following installed metadata."""
    closure: set[str] = set()
    todo = [(req, frozenset(req.extras)) for req in requirements]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        closure.add(name)
        for line in metadata.requires(req.name) or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return closure


def test_base_dependencies_leave_out_the_heavy_parts():
    base = {canonicalize_name(req.name) for req in base_requirements()}
    assert not base & {canonicalize_name(name) for name in NOT_BASE}, base
    # ... not even through a dependency of a dependency.
    assert not installed_closure(base_requirements()) & {canonicalize_name(name) for name in NOT_BASE}


def test_every_part_is_an_extra_and_all_is_every_part():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"train", "sim", "robosuite", "console", "ros", "all", "test"} <= set(extras)
    (everything,) = extras["all"]
    assert set(Requirement(everything).extras) == set(extras) - {"all", "test"}
    train = {canonicalize_name(Requirement(line).name) for line in extras["train"]}
    assert "torch" in train
    torch = next(Requirement(line) for line in extras["train"] if Requirement(line).name == "torch")
    assert "==" not in str(torch.specifier), (
        "torch is a range, not a pin (setup.sh installs the CPU wheel first)"
    )
    assert torch.specifier.contains(metadata.version("torch").split("+")[0]), (
        "the installed torch is in range"
    )


def test_setup_installs_every_part_and_the_test_tools():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert 'pip install --quiet -e ".[all,test]"' in setup
    assert setup.index("torch==2.13.0") < setup.index('".[all,test]"'), "torch's CPU wheel goes in first"


def refused_modules() -> list[str]:
    """Every top-level module an installed distribution outside the base's closure provides (this project's
    own packages stay: a base install has them all, and those of other parts fail on torch and the rest)."""
    base = installed_closure(base_requirements()) | {canonicalize_name(PYPROJECT["project"]["name"])}
    refused = {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(dist) in base for dist in dists)
    }
    return sorted(refused | set(NOT_BASE_MODULES))


def run_scenario(python, work: Path, env: dict, *args: str) -> dict:
    """Run the scenario (tests/base_install_check.py) in `work`; its report, the JSON of its last line."""
    result = subprocess.run(
        [str(python), str(SCENARIO), str(work), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_server_and_clients_run_with_only_the_base(tmp_path):
    refuse = tmp_path / "refuse.json"
    refused = refused_modules()
    refuse.write_text(json.dumps(refused))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded = run_scenario(sys.executable, tmp_path, env, "--refuse", str(refuse))["loaded"]
    assert not set(loaded) & set(refused)


@pytest.mark.slow
def test_server_and_clients_run_in_a_fresh_venv_with_only_the_base(tmp_path):
    """`pip install .` (no extras) into a new virtual environment, from the package index, then the scenario."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = package.rstrip("*")
        if (REPO / package).is_dir():
            shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {canonicalize_name(entry["name"]) for entry in json.loads(installed.stdout)}
    assert not names & {canonicalize_name(name) for name in NOT_BASE}, names

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    work = tmp_path / "work"
    work.mkdir()
    report = run_scenario(python, work, env)
    assert Path(report["fleet"]).is_relative_to(venv), report["fleet"]
    usage = subprocess.run(
        [str(venv / "bin" / "flotilla"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 0 and "serve" in usage.stdout, usage.stderr
