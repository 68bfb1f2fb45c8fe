"""Training throughput and chunk latency, side by side on one device: Flotilla's pipeline and a reference.

    python -m benchmarks.train_throughput [--device auto] [--batches 64,256] [--steps 20] [--threads 2]
    python -m benchmarks.train_throughput --device cpu --quick     # a few steps, small data (CI-sized)

Networks (each trained by both pipelines; data: synthetic episodes of the push task's shapes, in memory):
    flotilla low-dim    DiffusionConfig's defaults (U-Net 64/128/256, 2.8M), 22 low-dim values
    flotilla image      the same + one 96x96 camera through the default encoder (4.5M)
    DP-sized reference  Diffusion Policy's U-Net size: down dims 256/512/1024, kernel 5, step embedding
                        256 (65.5M parameters), low-dim, DDPM training / DDIM sampling
Pipelines:
    reference   Diffusion Policy's: a torch DataLoader over per-sample ``__getitem__`` (numpy windows to
                tensors, default collate; ``--ref-workers`` worker processes, 0 by default), each batch
                copied to the device, fp32, AdamW, a per-parameter EMA update.
    flotilla    policies/train.py's: windows gathered on the device (policies/data/batches.py), bf16
                autocast and TF32 on CUDA (``--precision``), fused AdamW on CUDA, a multi-tensor EMA,
                ``--compile`` for torch.compile (``--compile-mode reduce-overhead``: CUDA graphs too).
Samples/s at each batch size (steps after warm-up; CUDA timings end with a synchronize). On CUDA, the
GPU's utilization (nvidia-smi, sampled every 100 ms) during each timed window. Chunk latency: p50/p95
of one chunk at batch 1 with DDIM-10, eager and, on CUDA, replayed from a CUDA graph.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import time

import numpy as np
import torch

from benchmarks.common import machine_line, print_table
from benchmarks.policy_latency import IMAGE, LOWDIM, chunk_latency, device_name, synchronize
from fleet.labels import ControlLabel
from policies.config import COMPILE_MODES
from policies.data.batches import DeviceBatches, DeviceSteps
from policies.data.windows import EpisodeData, WindowDataset
from policies.device import autocast, enable_tf32, resolve_device, resolve_precision
from policies.models.factory import ShapeMeta, build_policy
from policies.train import EMA, normalizer_data, train_step, weighted_loss

NETWORKS = {  # name: (observation keys, DiffusionConfig settings)
    "flotilla low-dim": (LOWDIM, {}),
    "flotilla image": (IMAGE, {}),
    "DP-sized reference": (LOWDIM, {"down_dims": [256, 512, 1024], "kernel_size": 5, "step_embed_dim": 256}),
}


def synthetic_episodes(obs: dict, episodes: int, length: int, seed: int = 0) -> EpisodeData:
    """Random-walk low-dim steps, random uint8 frames, 4-dim actions in [-1, 1]: shapes are what matter."""
    rng = np.random.default_rng(seed)
    steps_total = episodes * length
    steps = {}
    for key, shape in obs.items():
        if len(shape) == 3:
            steps[key] = rng.integers(0, 256, (steps_total, *shape), dtype=np.uint8)
        else:
            steps[key] = np.cumsum(rng.normal(0, 0.01, (steps_total, *shape)), axis=0).astype(np.float32)
    steps["action"] = rng.uniform(-1, 1, (steps_total, 4)).astype(np.float32)
    steps["label"] = np.full(steps_total, ControlLabel.DEMO, np.uint8)
    ends = np.arange(1, episodes + 1, dtype=np.int64) * length
    return EpisodeData(steps=steps, episode_ends=ends, holds=np.zeros(steps_total, bool))


def build(network: str, data: EpisodeData):
    obs, settings = NETWORKS[network]
    meta = ShapeMeta(obs=obs, action_dim=4)
    policy = build_policy("diffusion", meta, **settings)
    policy.normalizer.fit(normalizer_data(data, np.arange(data.num_episodes), meta))
    return policy, meta


class GpuUtilization:
    """Mean GPU utilization (%) over a ``with`` block, from nvidia-smi sampled every 100 ms (None if absent)."""

    def __init__(self, device: torch.device):
        self.device, self.process, self.mean = device, None, None

    def __enter__(self):
        if self.device.type == "cuda" and shutil.which("nvidia-smi"):
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.device.index or 0), *query], stdout=subprocess.PIPE, text=True
            )
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            out, _ = self.process.communicate(timeout=10)
            samples = [float(line) for line in out.split() if line.strip().replace(".", "").isdigit()]
            self.mean = (
                float(np.mean(samples[1:])) if len(samples) > 1 else None
            )  # the first predates the work


def reference_rate(policy, dataset, device, batch_size, steps, workers) -> tuple[float, float | None]:
    """Diffusion Policy's loop: DataLoader (per-sample Python), copy to the device, fp32, per-parameter EMA."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    policy.train()
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's defaults, which Diffusion Policy keeps
    torch.backends.cudnn.benchmark = False
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    ema = copy.deepcopy(policy).requires_grad_(False)

    def batches():
        while True:
            yield from loader

    source = batches()

    def step():
        batch = next(source)
        batch = {
            key: {k: v.to(device, non_blocking=True) for k, v in value.items()}
            if isinstance(value, dict)
            else value.to(device, non_blocking=True)
            for key, value in batch.items()
        }
        loss, _ = weighted_loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), policy.parameters(), strict=True):
                ema_param.mul_(0.999).add_(param, alpha=0.001)

    return timed(step, batch_size, steps, device)


def flotilla_rate(policy, dataset, data, device, batch_size, steps, precision, compile_mode=None):
    """policies/train.py's loop: device batches, its train_step (autocast, fused AdamW on CUDA, multi-tensor
    EMA)."""
    batches = DeviceBatches(dataset, DeviceSteps(data, [*dataset.obs_keys, "action"], device))
    policy.train()
    enable_tf32(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=device.type == "cuda")
    ema = EMA(policy)
    model = torch.compile(policy, mode=compile_mode) if compile_mode else policy

    def epochs():
        epoch = 0
        while True:
            yield from batches.epoch(batch_size, epoch, drop_last=True)
            epoch += 1

    source = epochs()

    def step():
        if compile_mode:
            torch.compiler.cudagraph_mark_step_begin()  # as policies/train.py does
        train_step(model, next(source), optimizer, 1.0, autocast(device, precision), ema, policy)

    return timed(step, batch_size, steps, device, warmup=10 if compile_mode else 3)


def timed(step, batch_size, steps, device, warmup=3) -> tuple[float, float | None]:
    """(samples/s, mean GPU utilization %) of ``steps`` calls of ``step`` after ``warmup`` calls. On the
    CPU the rate is per second of this process's CPU time: on a shared machine wall time mostly measures
    the other jobs (on a quiet one the two agree at 1 thread)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    with GpuUtilization(device) as gpu:
        start = clock()
        for _ in range(steps):
            step()
        synchronize(device)
        elapsed = clock() - start
    return batch_size * steps / elapsed, gpu.mean


def graph_latency(policy, meta, calls, device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    from policies.cuda_graphs import GraphedPlanner

    planner = GraphedPlanner(policy.eval(), 1, device)
    return chunk_latency(policy, meta, calls, device, plan=lambda obs, goal: planner(obs, goal))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batches", default="64,256", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per figure")
    parser.add_argument("--calls", type=int, default=50, help="timed chunks per latency figure")
    parser.add_argument("--episodes", type=int, default=100, help="synthetic episodes of 100 steps")
    parser.add_argument("--precision", default="auto", help="flotilla pipeline: auto | fp32 | bf16")
    parser.add_argument("--compile", action="store_true", help="flotilla pipeline: torch.compile the policy")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode (with --compile)",
    )
    parser.add_argument("--ref-workers", type=int, default=0, help="reference DataLoader worker processes")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="which networks, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 steps, 10 calls, 10 episodes")
    args = parser.parse_args()
    unknown = [name for name in args.networks.split(",") if name not in NETWORKS]
    if unknown:
        parser.error(
            f"--networks: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(NETWORKS)}"
        )
    if args.quick:
        args.steps, args.calls, args.episodes = 3, 10, 10
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    print(machine_line(), f"torch {torch.__version__}, {args.threads} threads")
    print(
        f"device {device_name(device)}; flotilla pipeline: {precision}"
        f"{', TF32' if device.type == 'cuda' else ''}{f', torch.compile ({args.compile_mode})' if args.compile else ''}; "
        f"reference: fp32, DataLoader with {args.ref_workers} workers; {args.episodes} x 100 steps"
        f"{'' if device.type == 'cuda' else '; samples per CPU second of this process'}\n"
    )
    rows = []
    for network in args.networks.split(","):
        data = synthetic_episodes(NETWORKS[network][0], args.episodes, 100)
        torch.manual_seed(0)
        policy, meta = build(network, data)
        dataset = WindowDataset(data, np.arange(data.num_episodes), list(meta.obs), n_obs_steps=2, horizon=16)
        params = f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M"
        policy.to(device)
        eager = chunk_latency(policy, meta, args.calls, device)
        graphed = graph_latency(policy, meta, args.calls, device)
        latency = f"{eager['p50']:.1f} / {eager['p95']:.1f}"
        if graphed:
            latency += f" (graph {graphed['p50']:.1f} / {graphed['p95']:.1f})"
        for batch_size in batch_sizes:
            state = copy.deepcopy(policy.state_dict())
            ref, ref_gpu = reference_rate(policy, dataset, device, batch_size, args.steps, args.ref_workers)
            policy.load_state_dict(state)
            ours, our_gpu = flotilla_rate(
                policy,
                dataset,
                data,
                device,
                batch_size,
                args.steps,
                precision,
                args.compile_mode if args.compile else None,
            )
            policy.load_state_dict(state)
            gpu = "-" if ref_gpu is None else f"{ref_gpu:.0f}% / {our_gpu:.0f}%"
            rows.append([network, params, batch_size, ref, ours, f"{ours / ref:.2f}x", gpu, latency])
            print(
                f"  {network} b={batch_size}: reference {ref:,.0f}, flotilla {ours:,.0f} samples/s",
                flush=True,
            )
    print()
    print_table(
        [
            "network",
            "params",
            "batch",
            "reference samples/s",
            "flotilla samples/s",
            "gain",
            "GPU util ref / flotilla",
            "chunk ms p50 / p95 (b=1, DDIM-10)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
