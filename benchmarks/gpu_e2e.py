"""A trained checkpoint through PolicyRunner on a device, eager and CUDA-graphed, against the CPU: the
actions must agree, and each runner's chunk latency is printed (benchmarks/gpu_suite.sh's e2e step).

    python -m benchmarks.gpu_e2e --checkpoint runs/x/checkpoints/latest --data .gpu_data/push.zarr --device cuda

Observations are the recorded ones of the store's first episodes, fed step by step to every runner (open
loop: no simulator needed, and an action difference cannot snowball through the robot's state). Two
comparisons, each a maximum over every action and dimension in the robot's units (actions lie in [-1, 1]):

- CUDA graphs vs eager on the device, both with the runner's own ``noise_seed`` (the real path: the
  graph re-seeds the device's generator for each replay); the same kernels, so a tight tolerance.
- the device vs the CPU, eager, from the same initial noise (a seeded generator draws different numbers
  on a GPU and a CPU, so ``torch.randn`` is served the same CPU-drawn noise on both); fp32 weights, but
  TF32 convolutions and matmuls on the GPU and another summation order: a looser tolerance.

Exit 1 when a difference exceeds its tolerance. On ``--device cpu`` (the suite's CPU rehearsal) both
sides are the CPU and the graph comparison is skipped.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from policies.data.windows import load_episodes
from policies.device import resolve_device
from policies.runner import PolicyRunner


class SameNoise(TorchFunctionMode):
    """Every ``torch.randn`` inside returns noise drawn on the CPU from ``seed``, moved to the call's
    device and dtype: the same initial noise on every device."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed, self.calls = seed, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.randn:
            return func(*args, **kwargs)
        self.calls += 1
        size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        noise = torch.randn(*size, generator=torch.Generator().manual_seed(self.seed))
        return noise.to(device=kwargs.get("device"), dtype=kwargs.get("dtype") or noise.dtype)


def run(runner: PolicyRunner, episodes: list[dict[str, np.ndarray]], same_noise: int | None = None):
    """(actions (T, A), seconds of each step that planned) for the episodes fed in order."""
    actions, plan_times = [], []
    mode = SameNoise(same_noise) if same_noise is not None else None
    for episode in episodes:
        runner.reset()
        for t in range(len(episode["action"])):
            obs = {key: values[t] for key, values in episode.items() if key != "action"}
            plans = t % runner.n_action_steps == 0  # no safety filter: a plan every Ta steps
            start = time.perf_counter()
            if mode is not None:
                with mode:
                    action = runner.act(obs)
            else:
                action = runner.act(obs)  # numpy out: the device's work is done when it returns
            if plans:
                plan_times.append(time.perf_counter() - start)
            actions.append(action)
    if mode is not None and mode.calls == 0:  # then the comparison would compare different noise
        raise SystemExit("e2e: the policy drew no noise through torch.randn: SameNoise cannot align devices")
    return np.stack(actions), plan_times


def latency(plan_times: list[float]) -> str:
    """The first plan (warm-up, graph capture) apart from the p50/p95 of the rest, in ms."""
    rest = np.array(plan_times[1:]) * 1e3
    return (
        f"first {plan_times[0] * 1e3:.1f} ms, then p50 {np.percentile(rest, 50):.2f} / "
        f"p95 {np.percentile(rest, 95):.2f} ms over {len(rest)} plans"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder of `flotilla train`")
    parser.add_argument("--data", required=True, help="an episode store with the policy's observation keys")
    parser.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    parser.add_argument("--steps", type=int, default=96, help="recorded steps to feed (whole episodes)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--graph-tolerance", type=float, default=1e-3, help="graphs vs eager, max |diff|")
    parser.add_argument("--device-tolerance", type=float, default=0.05, help="device vs CPU, max |diff|")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    cpu = PolicyRunner.from_checkpoint(args.checkpoint, device="cpu")
    eager = PolicyRunner.from_checkpoint(args.checkpoint, device=device, noise_seed=args.seed)
    goal = ["goal"] if cpu.uses_goal else []
    keys = list(dict.fromkeys([*cpu.obs_keys, cpu.action_space.position_key, *goal]))
    data = load_episodes([args.data], keys)  # (+ action and label)
    keys.append("action")
    episodes, total = [], 0
    for index in range(data.num_episodes):
        if total >= args.steps:
            break
        start, end = data.bounds(index)
        episodes.append({key: data.steps[key][start:end] for key in keys})
        total += end - start
    print(
        f"e2e: {args.checkpoint} (version {cpu.version}), To={cpu.n_obs_steps} Ta={cpu.n_action_steps}, "
        f"observing {', '.join(cpu.obs_keys)}; {total} recorded steps of {len(episodes)} episodes of "
        f"{args.data}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    failed = False

    def compare(name: str, a: np.ndarray, b: np.ndarray, tolerance: float) -> None:
        nonlocal failed
        diff = float(np.abs(a - b).max())
        ok = diff <= tolerance and np.isfinite(a).all() and np.isfinite(b).all()
        failed |= not ok
        print(
            f"e2e: {name}: max |action diff| {diff:.2e} (tolerance {tolerance:g}): {'ok' if ok else 'FAILED'}"
        )

    on_device, times = run(eager, episodes)
    print(f"e2e: {device} eager: {latency(times)}")
    if device.type == "cuda":
        graphed = PolicyRunner.from_checkpoint(
            args.checkpoint, device=device, cuda_graphs=True, noise_seed=args.seed
        )
        replayed, times = run(graphed, episodes)
        print(f"e2e: {device} cuda_graphs: {latency(times)}; {graphed.graph_replays} graph replays")
        failed |= graphed.graph_replays == 0
        compare(
            f"cuda_graphs vs eager on {device} (noise_seed {args.seed})",
            replayed,
            on_device,
            args.graph_tolerance,
        )
    else:
        print(f"e2e: cuda_graphs: skipped (device {device})")
    on_cpu, times = run(cpu, episodes, same_noise=args.seed)
    print(f"e2e: cpu eager (CPU-drawn noise): {latency(times)}")
    same_noise_device, _ = run(
        PolicyRunner.from_checkpoint(args.checkpoint, device=device), episodes, same_noise=args.seed
    )
    compare(
        f"{device} vs cpu, eager (the same initial noise)", same_noise_device, on_cpu, args.device_tolerance
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
