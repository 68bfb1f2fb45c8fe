#!/usr/bin/env bash
# The GPU figures of issue 15 and the CUDA-only tests in one run, sized for < 8 minutes on one H200, on a
# bare machine: Python 3 with torch, the project not installed, no registry (the lent machine's image).
#
#   bash benchmarks/gpu_wheels.sh                       # here, once: .whl/ (wheels) and .gpu_data/ (demos)
#   OUT=/some/folder bash benchmarks/gpu_suite.sh       # there (carry .whl and .gpu_data); OUT: runs/gpu_suite
#   GPU_SUITE_DEVICE=cpu bash benchmarks/gpu_suite.sh   # the CPU rehearsal: the same steps, tiny sizes
#
# First the environment: the carried wheels the image lacks (benchmarks/gpu_env.py select) are installed
# into $GPU_SUITE_SITE and put on PYTHONPATH, then every module the suite imports is checked (one line
# naming what is missing, and the suite stops). Then the steps, each with its own time limit (450 s in
# all), going on after a failure. Writes 7 files to $OUT (the device tool brings back at most 8):
#   summary.txt                  each step's exit status and seconds, and the verdict
#   machine.txt                  GPU, driver, Python, torch, load; what was installed; the import check
#   tests.txt                    the test files naming this suite (test_device.py, test_device_paths.py):
#                                their CUDA-only tests (skipped in CI), the rest with CUDA present
#   policy_latency.txt           chunk latency at batch 1 and training samples/s, on the device
#   train_throughput.txt         Flotilla's pipeline vs the reference, batch 64 and 256, GPU utilization,
#                                chunk latency eager and CUDA-graphed
#   train_throughput_compile.txt the DP-sized net with torch.compile
#   e2e.txt                      `flotilla train device=cuda` on .gpu_data's demos, the checkpoint through
#                                PolicyRunner on cuda eager, cuda_graphs and the CPU (benchmarks/gpu_e2e.py:
#                                action differences within tolerance, chunk latencies); `flotilla eval`
#                                on cuda and cpu only where pybullet imports (no cp312 wheel exists)
# The end of each step's output is printed as well (what the device tool's output_tail shows). Exit status
# 0 when every step exited 0. The checkpoint and other scratch go to a temporary folder. Settings
# (environment): GPU_SUITE_DEVICE (cuda), WHEEL_DIR (.whl), GPU_DATA (.gpu_data), GPU_SUITE_SITE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
DEVICE=${GPU_SUITE_DEVICE:-cuda}
WHEEL_DIR=${WHEEL_DIR:-.whl}
GPU_DATA=${GPU_DATA:-.gpu_data}
SITE=${GPU_SUITE_SITE:-/tmp/flotilla_gpu_site}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
failed=()

say() { echo "gpu_suite: $*" | tee -a "$OUT/summary.txt"; }

step() { # step NAME SECONDS COMMAND...: run it with a limit, output to $OUT/NAME.txt, status to summary
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  [ "$status" -eq 0 ] || failed+=("$name")
  echo "$name: exit $status, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

case $DEVICE in
  cuda*) rehearsal=false ;;
  cpu) rehearsal=true ;;
  *)
    say "GPU_SUITE_DEVICE must be cuda, cuda:N or cpu, got '$DEVICE'"
    exit 2
    ;;
esac
say "device $DEVICE$($rehearsal && echo ' (CPU rehearsal: tiny sizes, figures mean nothing)'), $(date -u)"

# ------------------------------------------------------------------------------------- the environment
{
  date -u
  uname -srm
  if ! $rehearsal; then nvidia-smi || true; fi
  command -v python3
  python3 --version
  uptime
} > "$OUT/machine.txt" 2>&1
if [ -d "$WHEEL_DIR" ]; then
  wheels=$(python3 -m benchmarks.gpu_env select "$WHEEL_DIR" 2>> "$OUT/machine.txt") || {
    say "$(tail -1 "$OUT/machine.txt")"
    exit 1
  }
  if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086 # one path per line, none with spaces (wheel names)
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $wheels >> "$OUT/machine.txt" 2>&1 || {
      say "installing the wheels of $WHEEL_DIR failed (see machine.txt)"
      exit 1
    }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  say "$(echo "$wheels" | grep -c .) of $(find "$WHEEL_DIR" -type f -name '*.whl' | wc -l) carried wheels installed"
fi
if ! timeout 120 python3 -m benchmarks.gpu_env check >> "$OUT/machine.txt" 2>&1; then
  say "$(tail -1 "$OUT/machine.txt" | sed 's/^gpu_suite: //')"
  exit 1
fi
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())" \
  >> "$OUT/machine.txt" 2>&1
if ! $rehearsal && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch sees no CUDA device (see $OUT/machine.txt); nothing to measure"
  exit 1
fi
pybullet=$(python3 -c "import pybullet" > /dev/null 2>&1 && echo true || echo false)

# ------------------------------------------------------------------------------------------- the steps
if $rehearsal; then # the same commands at sizes a loaded 2-core CPU runs in about a minute
  tests=(--collect-only) # CI runs these tests on the CPU anyway: here their imports and collection
  latency=(--threads 1 --quick)
  throughput=(--threads 1 --quick --batches 8 --networks "flotilla low-dim,flotilla image")
  compiled=(--threads 1 --quick --batches 8 --networks "flotilla low-dim")
  export TORCH_COMPILE_DISABLE=1 # inductor on a 2-core CPU takes minutes: the step's arguments are rehearsed
  TRAIN_ARGS="steps=4 batch_size=8 threads=1"
  EVAL_ARGS="episodes=1 threads=1"
  E2E_ARGS="--steps 24"
  EPISODES=4 # demos collected when $GPU_DATA has none
else
  tests=()
  $pybullet || tests=(-k "not sim_fleet") # the batched sim fleet test needs pybullet
  latency=(--threads 4 --calls 100)
  throughput=(--threads 4 --steps 30 --calls 100)
  compiled=(--threads 4 --steps 30 --calls 20 --networks "DP-sized reference" --batches 256)
  TRAIN_ARGS="steps=300 batch_size=64 threads=4"
  EVAL_ARGS="episodes=2 threads=4"
  E2E_ARGS="--steps 96"
  EPISODES=20
fi

# The test files that name this suite as where their CUDA-only tests run (test_device.py, test_device_paths.py).
mapfile -t test_files < <(grep -l "benchmarks/gpu_suite.sh" tests/test_*.py | grep -v test_gpu_suite.py)
step tests 100 python3 -m pytest -q -rs -p no:cacheprovider "${test_files[@]}" "${tests[@]}"
step policy_latency 50 python3 -m benchmarks.policy_latency --device "$DEVICE" "${latency[@]}"
step train_throughput 130 python3 -m benchmarks.train_throughput --device "$DEVICE" "${throughput[@]}"
step train_throughput_compile 90 python3 -m benchmarks.train_throughput --device "$DEVICE" --compile "${compiled[@]}"

# shellcheck disable=SC2086 # TRAIN_ARGS, EVAL_ARGS, E2E_ARGS: lists of words
e2e() { # the real trainer and runner on the device: a checkpoint trained there, against the CPU
  local data="$GPU_DATA/push.zarr" run="$WORK/run"
  if [ ! -d "$data" ]; then
    if ! $pybullet; then
      echo "e2e: no $data and no pybullet to collect it: run bash benchmarks/gpu_wheels.sh and carry $GPU_DATA"
      return 1
    fi
    data="$WORK/push.zarr"
    python3 -m flotilla.cli collect task=push episodes="$EPISODES" cameras=true out="$data" progress=false || return
  fi
  python3 -m flotilla.cli train data="$data" out="$run" cameras=true device="$DEVICE" $TRAIN_ARGS \
    progress=false tensorboard=false || return
  python3 -m benchmarks.gpu_e2e --checkpoint "$run/checkpoints/latest" --data "$data" --device "$DEVICE" \
    $E2E_ARGS || return
  if $pybullet; then
    python3 -m flotilla.cli eval checkpoint="$run/checkpoints/latest" task=push device="$DEVICE" \
      cuda_graphs=true $EVAL_ARGS progress=false || return
    [ "$DEVICE" = cpu ] && return # the rehearsal's device eval was the CPU one
    python3 -m flotilla.cli eval checkpoint="$run/checkpoints/latest" task=push device=cpu episodes=1 \
      progress=false # the device-trained checkpoint on a CPU robot
  else
    echo "e2e: flotilla eval skipped: pybullet does not import here (PyPI has no cp312 wheel of it)"
  fi
}
export GPU_DATA WORK DEVICE pybullet TRAIN_ARGS EVAL_ARGS E2E_ARGS EPISODES
export -f e2e
step e2e 80 bash -c e2e

for name in tests policy_latency train_throughput train_throughput_compile; do # the figures, on stdout too
  echo "----- $name.txt (end)"
  tail -n 14 "$OUT/$name.txt"
done
echo "----- e2e.txt (its findings)"
grep -E '^(e2e|trained|Traceback|[A-Za-z]*Error)|"(success_rate|mean_episode_length)"' "$OUT/e2e.txt"
if [ ${#failed[@]} -eq 0 ]; then
  say "every step exited 0, $(date -u)"
else
  say "FAILED: ${failed[*]} (see $OUT/<step>.txt), $(date -u)"
  exit 1
fi
