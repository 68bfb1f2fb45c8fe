"""benchmarks/gpu_suite.sh, ready for a bare GPU machine: its CPU rehearsal runs every step end to end, and
benchmarks/gpu_env.py picks the carried wheels the machine needs and names what is missing in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests", "policy_latency", "train_throughput", "train_throughput_compile", "e2e"]


def test_the_cpu_rehearsal_runs_every_step_and_compares_the_runners_actions(tmp_path):
    pytest.importorskip("pybullet")  # with no carried demos, the e2e step collects its own
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_SUITE_DEVICE": "cpu",
        "OUT": str(out),
        "WHEEL_DIR": str(tmp_path / "no_wheels"),
        "GPU_DATA": str(tmp_path / "no_data"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this Python
    }
    run = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stderr
    for step in STEPS:
        assert f"\n{step}: exit 0," in summary
    assert "every step exited 0" in summary
    e2e = (out / "e2e.txt").read_text()
    assert (
        "cpu vs cpu, eager (the same initial noise): max |action diff| 0.00e+00 (tolerance 0.05): ok" in e2e
    )
    assert "cpu eager: first" in e2e and "p50" in e2e
    # The device tool brings back at most 8 files, none deeper than 2 folders: the suite writes 7, flat.
    written = sorted(path.name for path in out.rglob("*"))
    assert written == sorted(["summary.txt", "machine.txt", "e2e.txt", *(f"{s}.txt" for s in STEPS[:-1])])


def fake_wheel(folder: Path, name: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"")  # select reads names only


def test_select_installs_what_is_missing_or_too_old_and_keeps_the_rest(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    fake_wheel(wheels, "zarr-3.1.6-py3-none-any.whl")  # installed here at a version pyproject accepts
    fake_wheel(wheels, "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl")
    fake_wheel(wheels, "not_on_this_machine-1.0-py3-none-any.whl")
    old = site / "protobuf-5.29.3.dist-info"  # an image with protobuf 5 (pyproject: >=7.36)
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: protobuf\nVersion: 5.29.3\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    select = [sys.executable, "-m", "benchmarks.gpu_env", "select", str(wheels)]
    run = subprocess.run(select, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    chosen = sorted(Path(line).name for line in run.stdout.split())
    assert chosen == [
        "not_on_this_machine-1.0-py3-none-any.whl",
        "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl",
    ]
    assert "protobuf 7.36.2 (5.29.3 is outside protobuf<8,>=7.36)" in run.stderr
    assert "keeping the image's zarr" in run.stderr

    fake_wheel(wheels, "also_missing-1.0-cp399-cp399-manylinux2014_x86_64.whl")  # another Python's
    run = subprocess.run(select, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1  # its name sorts first
    assert (
        "also_missing-1.0-cp399-cp399-manylinux2014_x86_64.whl does not install on this Python" in run.stderr
    )
    assert "GPU_PYTHON=" in run.stderr


def test_check_names_every_missing_module_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # find_spec reports a None entry as not found
    monkeypatch.setitem(sys.modules, "hydra", None)
    assert gpu_env.problem() == "missing zarr, hydra"


def test_the_carried_pins_are_inside_pyprojects_ranges():
    required = gpu_env.project_requirements()
    pins = [Requirement(pin) for pin in gpu_env.CARRIED]
    assert len({canonicalize_name(pin.name) for pin in pins}) == len(pins)  # one version of each
    assert all(len(pin.specifier) == 1 and str(pin.specifier).startswith("==") for pin in pins)
    for pin in pins:
        name = canonicalize_name(pin.name)
        if name in required:
            version = next(iter(pin.specifier)).version
            assert required[name].specifier.contains(version), (pin, required[name])
