"""The Python environment of the lent GPU machine for benchmarks/gpu_suite.sh (the project is not installed
there and nothing can be downloaded: the packages its image lacks travel as wheels in ``.whl/``).

    python -m benchmarks.gpu_env pins              # NAME==VERSION per line: what gpu_wheels.sh downloads
    python3 -m benchmarks.gpu_env select .whl      # the carried wheels this Python needs installed
    python3 -m benchmarks.gpu_env check            # one line naming what is missing; exit 1 if anything is

Stdlib + ``packaging`` only (the image has it), so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# What the suite imports that the GPU image (/work/.library/device/KINDS.md's package list) lacks, and
# grpcio/protobuf, which it has at a version nobody has read (fleet/proto's code needs protobuf >= 7.36):
# distribution pin (the versions tested here, inside pyproject's ranges) -> the module the check imports.
# Without pybullet (no cp312 wheel on PyPI, and its ~100 MB wheel would not fit the 64 MiB a call
# carries), so no gymnasium either: the suite runs `flotilla eval` only where pybullet imports.
CARRIED = {
    "zarr==3.1.6": "zarr",
    "numcodecs==0.16.6": "numcodecs",
    "donfig==0.8.1.post1": "donfig",  # zarr's
    "google-crc32c==1.9.0": "google_crc32c",  # zarr's
    "hydra-core==1.3.8": "hydra",
    "omegaconf==2.3.1": "omegaconf",
    "antlr4-python3-runtime==4.9.3": "antlr4",  # hydra's and omegaconf's; an sdist only: built here
    "diffusers==0.42.1": "diffusers",
    "zuko==1.6.0": "zuko",
    "grpcio==1.85.3": "grpc",
    "protobuf==7.36.2": "google.protobuf",
}
# Modules of the image's own packages that the suite imports (a fresh image that drops one says so).
FROM_IMAGE = ["torch", "numpy", "cv2", "yaml", "safetensors", "tqdm", "huggingface_hub", "PIL", "pytest"]
# The suite's entry points: importing them finds whatever the two lists above forgot.
ENTRY_MODULES = [
    "flotilla.cli",
    "policies.train",
    "policies.runner",
    "benchmarks.policy_latency",
    "benchmarks.train_throughput",
    "benchmarks.gpu_e2e",
    "tests.conftest",
    "tests.test_device",
    "tests.test_device_paths",
]


def project_requirements() -> dict[str, Requirement]:
    """pyproject's requirements of the parts the suite uses (base, train, test), by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = [*project["dependencies"], *extras["train"], *extras["test"]]
    requirements = [Requirement(line) for line in lines if not line.startswith("flotilla")]
    return {canonicalize_name(r.name): r for r in requirements}


def select(wheel_dir: Path) -> list[Path]:
    """The wheels in ``wheel_dir`` whose distribution this Python lacks or holds at a version pyproject
    refuses; the image's own copy is kept otherwise (installing over it could break its other packages)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_env: no wheels in {wheel_dir} (run `bash benchmarks/gpu_wheels.sh` first)")
    required = project_requirements()
    supported = set(sys_tags())
    chosen = []
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        try:
            present = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            present = None
        requirement = required.get(name)
        if present is not None and (requirement is None or requirement.specifier.contains(present, True)):
            print(f"gpu_env: keeping the image's {name} {present} (carried {version})", file=sys.stderr)
            continue
        if not tags & supported:
            python = f"cp{sys.version_info.major}{sys.version_info.minor}"
            raise SystemExit(
                f"gpu_env: {wheel.name} does not install on this Python ({python}): "
                f"run `GPU_PYTHON={sys.version_info.major}.{sys.version_info.minor} bash benchmarks/gpu_wheels.sh`"
            )
        why = "missing" if present is None else f"{present} is outside {requirement}"
        print(f"gpu_env: installing {name} {version} ({why})", file=sys.stderr)
        chosen.append(wheel)
    return chosen


def problem() -> str | None:
    """One line naming every module of CARRIED and FROM_IMAGE that this Python cannot find, else the first
    failure importing the suite's entry points (what the lists forgot, or a version clash); None if none."""
    missing = []
    for module in [*CARRIED.values(), *FROM_IMAGE]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            found = False
        if not found:
            missing.append(module)
    if missing:
        return f"missing {', '.join(missing)}"
    sys.path.insert(0, str(ROOT))
    for module in ENTRY_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # a protobuf version clash is no ImportError
            return f"importing {module} failed: {type(error).__name__}: {error}".replace("\n", " ")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins", help="the carried distributions, NAME==VERSION per line")
    chooser = commands.add_parser("select", help="print the wheels this Python needs installed")
    chooser.add_argument("wheel_dir", type=Path)
    commands.add_parser("check", help="exit 1 with one line if a module the suite imports is missing")
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(CARRIED))
    elif args.command == "select":
        print("\n".join(str(wheel) for wheel in select(args.wheel_dir)))
    else:
        found = problem()
        if found:
            raise SystemExit(
                f"gpu_suite: {found} ({sys.executable}); the packages the GPU image lacks travel as "
                "wheels: run `bash benchmarks/gpu_wheels.sh` here and carry .whl"
            )
        print(f"gpu_env: every module the suite imports is there ({sys.executable})")


if __name__ == "__main__":
    main()
