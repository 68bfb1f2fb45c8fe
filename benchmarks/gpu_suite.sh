#!/usr/bin/env bash
# The GPU figures of issue 15 and the CUDA-only tests in one run (sized for < 8 minutes on one H200):
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh        # OUT defaults to runs/gpu_suite
#
# Writes to $OUT: machine.txt (GPU, driver, torch), tests.txt (tests/test_device.py: the CUDA-only tests
# run here, skipped in CI), policy_latency.txt (chunk latency at batch 1, on the GPU), train_throughput.txt
# (Flotilla's pipeline vs the reference pipeline, samples/s at batch 64 and 256, GPU utilization, chunk
# latency eager and CUDA-graphed), train_throughput_compile.txt (the DP-sized net with torch.compile),
# e2e.txt (collect -> `flotilla train device=cuda` -> `flotilla eval device=cuda cuda_graphs=true`).
# Every step has its own time limit (480 s in all) and the suite goes on after a failure; summary.txt
# lists each step's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run it with a limit, output to $OUT/NAME.txt, status to summary
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  echo "$name: exit $status, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

{
  date -u
  nvidia-smi || true
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())"
  uptime
} > "$OUT/machine.txt" 2>&1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: torch sees no CUDA device (see $OUT/machine.txt); nothing to measure" | tee -a "$OUT/summary.txt"
  exit 1
fi

step tests 80 python -m pytest -q -rs tests/test_device.py
step policy_latency 70 python -m benchmarks.policy_latency --device cuda --threads 4 --calls 100
step train_throughput 150 python -m benchmarks.train_throughput --device cuda --threads 4 --steps 30 --calls 100
step train_throughput_compile 90 python -m benchmarks.train_throughput --device cuda --threads 4 --steps 30 \
  --compile --networks "DP-sized reference" --batches 256 --calls 20

e2e() {  # the real trainer and runner on the GPU: a checkpoint trained there, evaluated with CUDA graphs
  local data="$OUT/e2e/push.zarr" run="$OUT/e2e/run"
  rm -rf "$OUT/e2e"
  python -m flotilla.cli collect task=push episodes=10 out="$data" cameras=true progress=false &&
    python -m flotilla.cli train data="$data" out="$run" cameras=true steps=300 batch_size=256 device=cuda \
      progress=false tensorboard=false &&
    python -m flotilla.cli eval checkpoint="$run/checkpoints/latest" task=push episodes=2 device=cuda \
      cuda_graphs=true progress=false &&
    python -m flotilla.cli eval checkpoint="$run/checkpoints/latest" task=push episodes=1 device=cpu \
      progress=false  # the GPU-trained checkpoint on a CPU robot
}
export OUT
export -f e2e
step e2e 90 bash -c e2e

date -u >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
