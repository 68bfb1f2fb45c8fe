#!/usr/bin/env bash
# Prepares, here, what benchmarks/gpu_suite.sh needs on the lent GPU machine (no registry there, project
# not installed): the wheels of the packages its image lacks in .whl/ (benchmarks/gpu_env.py CARRIED:
# cp312 manylinux x86_64 or pure Python) and a small real dataset in .gpu_data/ (scripted push demos with
# a 96x96 camera, for the e2e step's `flotilla train device=cuda`). Both git-ignored through
# .git/info/exclude; the run carries them: carry [".whl", ".gpu_data"] (benchmarks/README.md, Devices).
#
#   bash benchmarks/gpu_wheels.sh                  # GPU_PYTHON=3.11 for a Python 3.11 rehearsal
#
# Settings (environment): GPU_PYTHON (3.12: the image's), WHEEL_DIR (.whl), GPU_DATA (.gpu_data),
# GPU_EPISODES (20 push episodes, ~9 MB). Prints what it fetched and the size of all that travels.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON=${GPU_PYTHON:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}
GPU_DATA=${GPU_DATA:-.gpu_data}
GPU_EPISODES=${GPU_EPISODES:-20}
PYTHON=${PYTHON:-python}
tag=cp${GPU_PYTHON/./}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for ignored in "/$WHEEL_DIR/" "/$GPU_DATA/"; do
  case $ignored in /.*/) grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >> "$exclude" ;; esac
done

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
platforms=()
for platform in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${platform}_x86_64")
done
sdist_only=()
for pin in $("$PYTHON" -m benchmarks.gpu_env pins); do
  if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp --abi "$tag" --abi abi3 --abi none "${platforms[@]}" -d "$WHEEL_DIR" "$pin" 2>/dev/null; then
    sdist_only+=("$pin")
  fi
done
# A pure-Python package published as an sdist only (antlr4-python3-runtime) is built into a wheel here;
# a compiled one would be built for this machine's Python, not the image's, so it is refused.
for pin in "${sdist_only[@]}"; do
  "$PYTHON" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$WHEEL_DIR" "$pin" 2>&1 | grep -v "is ignored" >&2 || true
done
for wheel in "$WHEEL_DIR"/*.whl; do
  case $wheel in
    *-none-any.whl | *-"$tag"-*.whl | *-abi3-*.whl) ;;
    *)
      echo "gpu_wheels: $wheel does not fit Python $GPU_PYTHON on x86_64" >&2
      exit 1
      ;;
  esac
done
expected=$("$PYTHON" -m benchmarks.gpu_env pins | wc -l)
got=$(find "$WHEEL_DIR" -type f -name '*.whl' | wc -l)
if [ "$got" -ne "$expected" ]; then
  echo "gpu_wheels: $got wheels in $WHEEL_DIR for $expected pins" >&2
  exit 1
fi

if [ ! -d "$GPU_DATA/push.zarr" ]; then  # the demos do not depend on the Python version: kept between runs
  "$PYTHON" -m flotilla.cli collect task=push episodes="$GPU_EPISODES" cameras=true out="$GPU_DATA/push.zarr" \
    overwrite=true progress=false
fi

ls -1 "$WHEEL_DIR"
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb "$WHEEL_DIR" | cut -f1)
data=$(du -sb "$GPU_DATA" | cut -f1)
mib() { echo "$(($1 / 1048576)).$((($1 % 1048576) * 10 / 1048576))"; }
echo "gpu_wheels: $got wheels for Python $GPU_PYTHON, $(mib "$wheels") MiB in $WHEEL_DIR; $(mib "$data") MiB of data" \
  "in $GPU_DATA; with the working tree ($(mib "$tree") MiB) $(mib $((tree + wheels + data))) MiB travel (limit 64)"
