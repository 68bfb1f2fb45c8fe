#!/usr/bin/env bash
# Rehearses, here, benchmarks/gpu_suite.sh on a Python like the lent GPU machine's: a fresh venv (no system
# site-packages) of its Python (3.12) and torch (2.11.0, PyPI's cp312 build: the CUDA one, ~4.6 GB
# installed, which runs on a CPU) with only the packages of the image's list (/work/.library/device/KINDS.md)
# that the suite touches, grpcio and protobuf older than pyproject's as an image may hold them. In a copy of
# what the device tool sends (tracked and untracked-not-ignored files and .gpu_data: no install, no git),
# the suite must install the carried wheels (.whl/, cp312) that fill the gap, pass its import check and run
# every step (CPU, tiny sizes); then tests/test_device.py and test_device_paths.py run in full there (the
# CUDA-only tests skip; the sim fleet test needs pybullet, which cannot travel).
#
#   bash benchmarks/gpu_image_rehearsal.sh                                  # ~3 minutes
#   PYTHON=python3.11 IMAGE_TORCH=2.13.0 bash benchmarks/gpu_image_rehearsal.sh  # this machine's CPU wheel
#
# Needs PyPI (pip); not a CI test. Scratch in $SCRATCH (/tmp/flotilla_gpu_image), replaced each run.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_TORCH=${IMAGE_TORCH:-2.11.0}
SCRATCH=${SCRATCH:-/tmp/flotilla_gpu_image}
PYTHON=${PYTHON:-}
for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do # (a pyenv shim may refuse)
  if [ -z "$PYTHON" ] && "$candidate" -c "" 2> /dev/null; then PYTHON=$candidate; fi
done
if [ -z "$PYTHON" ]; then
  echo "gpu_image_rehearsal: no python3.12 here: set PYTHON (and IMAGE_TORCH to a torch it can install)" >&2
  exit 2
fi
VENV=$SCRATCH/venv
# The image's packages that the suite's imports reach (torch's own dependencies come with it); pip may
# bring dependencies of these, and whatever it brings that the image's list lacks is named below.
IMAGE_PACKAGES=(
  "torch==$IMAGE_TORCH" numpy opencv-python-headless pyyaml
  safetensors tqdm huggingface-hub pillow requests filelock regex packaging typing-extensions pytest
  pytest-timeout "grpcio==1.70.0" "protobuf==5.29.3" # older than pyproject's: carried wheels replace them
)
IMAGE_LIST=/work/.library/device/KINDS.md

rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${IMAGE_PACKAGES[@]}" 2>&1 | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -c "import sys, numpy, torch; print('gpu_image_rehearsal: Python', sys.version.split()[0], \
'torch', torch.__version__, 'numpy', numpy.__version__)"
if [ -f "$IMAGE_LIST" ]; then # what pip brought that the image does not have would hide a gap
  image=$(sed -n 's/.*holds these.*Packages: //p' "$IMAGE_LIST" | tr -d '.' | tr ',' '\n' | tr -d ' ' | tr '_' '-')
  extra=$("$VENV/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr 'A-Z_' 'a-z-' |
    grep -vxF -f <(echo "$image" | tr 'A-Z' 'a-z') | grep -vx 'pip' | tr '\n' ' ' || true)
  echo "gpu_image_rehearsal: in the venv but not in the image's list: ${extra:-none}"
fi
version=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$version" = 3.12 ]; then # the wheels that travel, themselves
  [ -d .whl ] || bash benchmarks/gpu_wheels.sh
  wheels=$PWD/.whl
else
  wheels=$SCRATCH/whl
  GPU_PYTHON=$version WHEEL_DIR="$wheels" bash benchmarks/gpu_wheels.sh
fi
[ -d .gpu_data ] || bash benchmarks/gpu_wheels.sh

tree=$SCRATCH/tree
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
cp -r .gpu_data "$tree/"
cd "$tree"
export PATH="$VENV/bin:$PATH" GPU_SUITE_SITE="$SCRATCH/site"
GPU_SUITE_DEVICE=cpu WHEEL_DIR="$wheels" OUT="$SCRATCH/out" bash benchmarks/gpu_suite.sh
PYTHONPATH=$GPU_SUITE_SITE python3 -m pytest -q -rs -p no:cacheprovider tests/test_device.py \
  tests/test_device_paths.py -k "not sim_fleet" | tail -n 1 | sed 's/^/gpu_image_rehearsal: the device tests: /'
