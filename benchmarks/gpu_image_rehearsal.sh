#!/usr/bin/env bash
# Rehearses, here, benchmarks/gpu_suite.sh on a Python that looks like the lent GPU machine's: a fresh
# venv (no system site-packages) with torch and only the packages of the image's list
# (/work/.library/device/KINDS.md) that the suite touches, and older grpcio/protobuf than pyproject's, as
# an image may hold. The carried wheels (made by gpu_wheels.sh for this Python) must fill exactly the gap:
# the suite, run in a copy of what the device tool sends, installs what is missing or too old, checks its
# imports and runs every step (CPU, tiny sizes).
#
#   bash benchmarks/gpu_image_rehearsal.sh         # ~2 minutes; prints each step's status
#
# Python 3.11, not the image's 3.12: the only CPU torch wheel here is cp311 (PyPI's cp312 torch is the CUDA
# build, gigabytes). The wheel list is the same, fetched for cp311. Then the cp312 wheels that travel
# (.whl/) on a Python 3.12 venv without torch: installed, imported, the demos read, fleet/proto loaded.
# Needs PyPI (pip); not a CI test.
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
# What the device tool sends (tracked and untracked-not-ignored files, the carried .gpu_data), elsewhere:
# nothing of this checkout's install or ignored files can help the suite there.
mkdir -p "$SCRATCH/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SCRATCH/tree"
cp -r .gpu_data "$SCRATCH/tree/"
(cd "$SCRATCH/tree" && PATH="$VENV/bin:$PATH" GPU_SUITE_DEVICE=cpu WHEEL_DIR="$SCRATCH/whl" \
  GPU_SUITE_SITE="$SCRATCH/site" OUT="$SCRATCH/out" bash benchmarks/gpu_suite.sh)

# The wheels that travel (cp312, .whl/) on a Python 3.12 with numpy 2.5 as the image has, without torch
# (no CPU torch for it here): installed as the suite installs them, imported, the demos read, the protocol's
# generated code loaded (protobuf 7 gencode, grpcio's version check).
PYTHON312=${PYTHON312:-}
for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12; do # (a pyenv shim may refuse)
  if [ -z "$PYTHON312" ] && "$candidate" -c "" 2> /dev/null; then PYTHON312=$candidate; fi
done
if [ -z "$PYTHON312" ]; then
  echo "gpu_image_rehearsal: no python3.12 here: the cp312 wheels were not rehearsed"
  exit 0
fi
[ -d .whl ] || bash benchmarks/gpu_wheels.sh
"$PYTHON312" -m venv "$SCRATCH/venv312"
"$SCRATCH/venv312/bin/python" -m pip install --quiet "numpy>=2.5" packaging pyyaml typing-extensions
wheels=$(PATH="$SCRATCH/venv312/bin:$PATH" python3 -m benchmarks.gpu_env select .whl)
# shellcheck disable=SC2086 # one wheel path per line
"$SCRATCH/venv312/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SCRATCH/site312" $wheels
PYTHONPATH="$SCRATCH/site312" "$SCRATCH/venv312/bin/python" - <<'PY'
import sys

sys.path.insert(0, ".")
import donfig, google_crc32c, hydra, numcodecs, numpy, omegaconf, zarr  # noqa: E401, F401
from fleet.proto import flotilla_pb2_grpc  # noqa: F401
from fleet.store import EpisodeStore

store = EpisodeStore.open(".gpu_data/push.zarr")
print(
    f"gpu_image_rehearsal: Python {sys.version.split()[0]}, numpy {numpy.__version__}: the cp312 wheels import,"
    f" fleet/proto loads, .gpu_data holds {len(store.episode_ends)} episodes"
)
PY
