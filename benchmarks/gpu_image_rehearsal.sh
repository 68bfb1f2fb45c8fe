#!/usr/bin/env bash
# Rehearses, here, benchmarks/gpu_suite.sh on a Python that looks like the lent GPU machine's: a fresh
# venv (no system site-packages) with torch and only the packages of the image's list
# (/work/.library/device/KINDS.md) that the suite touches, and older grpcio/protobuf than pyproject's, as
# an image may hold. The carried wheels (made by gpu_wheels.sh for this Python) must fill exactly the gap:
# the suite installs what is missing or too old, checks its imports and runs every step (CPU, tiny sizes).
#
#   bash benchmarks/gpu_image_rehearsal.sh         # ~3 minutes; prints each step's status
#
# Python 3.11, not the image's 3.12: the only CPU torch wheel here is cp311 (PyPI's cp312 torch is the CUDA
# build, gigabytes). The wheel list is the same, fetched for cp311. Needs PyPI (pip); not a CI test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python} # a Python 3.11 (the CPU torch wheel here is cp311)
SCRATCH=${SCRATCH:-/tmp/flotilla_gpu_image}
VENV=$SCRATCH/venv
# The image's packages that the suite's imports reach (torch's own dependencies come with it); pip may
# bring dependencies of these, and whatever it brings that the image's list lacks is named below.
IMAGE_PACKAGES=(
  "torch==2.13.0" numpy opencv-python-headless pyyaml safetensors tqdm huggingface-hub pillow requests
  filelock regex packaging typing-extensions pytest pytest-timeout
  "grpcio==1.70.0" "protobuf==5.29.3" # older than pyproject's: the carried wheels must replace them
)
IMAGE_LIST=/work/.library/device/KINDS.md

rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${IMAGE_PACKAGES[@]}"
if [ -f "$IMAGE_LIST" ]; then # what pip brought that the image does not have would hide a gap
  image=$(sed -n 's/.*holds these.*Packages: //p' "$IMAGE_LIST" | tr -d '.' | tr ',' '\n' | tr -d ' ' | tr '_' '-')
  extra=$("$VENV/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr 'A-Z_' 'a-z-' |
    grep -vxF -f <(echo "$image" | tr 'A-Z' 'a-z') | grep -vx 'pip' | tr '\n' ' ' || true)
  echo "gpu_image_rehearsal: in the venv but not in the image's list: ${extra:-none}"
fi
GPU_PYTHON=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
  WHEEL_DIR="$SCRATCH/whl" GPU_DATA=.gpu_data bash benchmarks/gpu_wheels.sh
PATH="$VENV/bin:$PATH" GPU_SUITE_DEVICE=cpu WHEEL_DIR="$SCRATCH/whl" GPU_SUITE_SITE="$SCRATCH/site" \
  OUT="$SCRATCH/out" bash benchmarks/gpu_suite.sh
