"""Action-chunk latency at batch 1 (the robot's control loop waits on it) and training throughput.

    python -m benchmarks.policy_latency [--calls 50] [--threads 2] [--device auto|cpu|cuda|cuda:N]
    python -m benchmarks.policy_latency --quick    # 3 chunks, 1 training step at batch 8 (a rehearsal)

Latency: p50/p95/p99 of one `predict_action` call (a whole chunk of Tp actions) under
`torch.inference_mode`, for the default diffusion policy (DDIM) and the goal-conditioned EDM policy,
low-dim and with one 96x96 camera, with 3 and 10 sampler steps. Training: samples/s of
`compute_loss` + backward + AdamW step at batch 64 on random data of the same shapes, already on the
device, in fp32 (the whole training pipeline, data included, is benchmarks/train_throughput.py). On CUDA
every timing ends with a synchronize, so it counts the GPU's work, not just the launches.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import machine_line, print_table
from policies.device import resolve_device
from policies.models.factory import ShapeMeta, build_policy
from sim.conventions import OBJECT_STATE_SHAPES

LOWDIM = OBJECT_STATE_SHAPES  # the robosuite lift's low-dim observation
IMAGE = {**LOWDIM, "front_rgb": (96, 96, 3)}


def fake_observation(meta: ShapeMeta, batch: int, n_obs: int, device="cpu", generator=None) -> dict:
    """Random observations of `meta`'s keys: uint8 images, normal low-dim values."""
    obs = {}
    for key, shape in meta.obs.items():
        if len(shape) == 3:
            obs[key] = torch.randint(
                0, 256, (batch, n_obs, *shape), dtype=torch.uint8, device=device, generator=generator
            )
        else:
            obs[key] = torch.randn(batch, n_obs, *shape, device=device, generator=generator)
    return obs


def fake_batch(meta: ShapeMeta, batch: int, n_obs: int, horizon: int, device="cpu") -> dict:
    obs = fake_observation(meta, batch, n_obs, device)
    out = {
        "obs": obs,
        "action": torch.rand(batch, horizon, meta.action_dim, device=device) * 2 - 1,
        "weight": torch.ones(batch, device=device),
    }
    if meta.goal_dim:
        out["goal"] = torch.randn(batch, meta.goal_dim, device=device)
    return out


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timing must include it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fitted_policy(kind: str, meta: ShapeMeta, **kwargs):
    policy = build_policy(kind, meta, **kwargs)
    batch = fake_batch(meta, 256, 1, 1)
    data = {
        key: value.reshape(-1, *value.shape[2:]).numpy()
        for key, value in batch["obs"].items()
        if value.dtype != torch.uint8
    }
    data["action"] = batch["action"].reshape(-1, meta.action_dim).numpy()
    if meta.goal_dim:
        data["goal"] = batch["goal"].numpy()
    policy.normalizer.fit(data)
    return policy


def chunk_latency(policy, meta: ShapeMeta, calls: int, device="cpu", plan=None) -> dict[str, float]:
    """Milliseconds per chunk at batch 1: {"p50", "p95", "p99"}. ``plan(obs, goal)`` replaces
    ``policy.predict_action`` (e.g. a CUDA graph replay)."""
    policy.eval()
    batch = fake_batch(meta, 1, policy.n_obs_steps, policy.horizon, device)
    goal = batch.get("goal")
    plan = plan or policy.predict_action
    times = []
    with torch.inference_mode():
        for _ in range(5):
            plan(batch["obs"], goal)
        synchronize(device)
        for _ in range(calls):
            start = time.perf_counter()
            plan(batch["obs"], goal)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {f"p{q}": float(np.percentile(times, q) * 1e3) for q in (50, 95, 99)}


def train_throughput(policy, meta: ShapeMeta, batch_size: int = 64, steps: int = 10, device="cpu") -> float:
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    batch = fake_batch(meta, batch_size, policy.n_obs_steps, policy.horizon, device)
    for i in range(steps + 2):
        if i == 2:
            synchronize(device)
            start = time.perf_counter()
        loss = policy.compute_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per figure")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch size")
    parser.add_argument("--quick", action="store_true", help="3 chunks, 1 training step at batch 8")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.train_steps, args.train_batch = 3, 1, 8
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(
        machine_line(), f"torch {torch.__version__}, {args.threads} threads, device {device_name(device)}\n"
    )
    configs = [
        ("diffusion", "low-dim", LOWDIM, 0, 10),
        ("diffusion", "low-dim", LOWDIM, 0, 3),
        ("diffusion", "96x96 image", IMAGE, 0, 10),
        ("diffusion", "96x96 image", IMAGE, 0, 3),
        ("gc_diffusion", "low-dim", LOWDIM, 3, 3),
        ("gc_diffusion", "low-dim", LOWDIM, 3, 10),
        ("gc_diffusion", "96x96 image", IMAGE, 3, 3),
        ("mlp", "low-dim", LOWDIM, 0, 0),
    ]
    rows = []
    for kind, label, obs, goal_dim, steps in configs:
        meta = ShapeMeta(obs=obs, action_dim=4, goal_dim=goal_dim)
        kwargs = {"num_inference_steps": steps} if kind != "mlp" else {}
        policy = fitted_policy(kind, meta, **kwargs).to(device)
        latency = chunk_latency(policy, meta, args.calls, device)
        rate = (
            train_throughput(policy, meta, args.train_batch, args.train_steps, device)
            if steps in (0, 10)
            else float("nan")
        )
        params = sum(p.numel() for p in policy.parameters())
        rows.append(
            [
                kind,
                label,
                steps or "-",
                f"{params / 1e6:.2f}M",
                latency["p50"],
                latency["p95"],
                latency["p99"],
                "-" if np.isnan(rate) else rate,
            ]
        )
    print_table(
        [
            "policy",
            "observation",
            "sampler steps",
            "params",
            "chunk p50 ms",
            "chunk p95 ms",
            "chunk p99 ms",
            f"train samples/s (b={args.train_batch})",
        ],
        rows,
    )


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu``: the device every figure of a run was measured on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


if __name__ == "__main__":
    main()
