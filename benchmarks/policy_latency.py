"""Action-chunk latency at batch 1 (the robot's control loop waits on it) and training throughput.

    python -m benchmarks.policy_latency [--calls 50] [--threads 2]

Latency: p50/p99 of one `predict_action` call (a whole chunk of Tp actions) under
`torch.inference_mode`, for the default diffusion policy (DDIM) and the goal-conditioned EDM policy,
low-dim and with one 96x96 camera, with 3 and 10 sampler steps. Training: samples/s of
`compute_loss` + backward + AdamW step at batch 64 on random data of the same shapes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import machine_line, print_table
from policies.models.factory import ShapeMeta, build_policy

LOWDIM = {
    "joint_pos": (7,),
    "ee_pos": (3,),
    "ee_quat": (4,),
    "gripper": (1,),
    "object_pos": (3,),
    "object_quat": (4,),
}
IMAGE = {**LOWDIM, "front_rgb": (96, 96, 3)}


def fake_batch(meta: ShapeMeta, batch: int, n_obs: int, horizon: int) -> dict:
    obs = {}
    for key, shape in meta.obs.items():
        if len(shape) == 3:
            obs[key] = torch.randint(0, 256, (batch, n_obs, *shape), dtype=torch.uint8)
        else:
            obs[key] = torch.randn(batch, n_obs, *shape)
    out = {
        "obs": obs,
        "action": torch.rand(batch, horizon, meta.action_dim) * 2 - 1,
        "weight": torch.ones(batch),
    }
    if meta.goal_dim:
        out["goal"] = torch.randn(batch, meta.goal_dim)
    return out


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


def chunk_latency(policy, meta: ShapeMeta, calls: int) -> tuple[float, float, int]:
    policy.eval()
    batch = fake_batch(meta, 1, policy.n_obs_steps, policy.horizon)
    goal = batch.get("goal")
    times = []
    with torch.inference_mode():
        for _ in range(5):
            policy.predict_action(batch["obs"], goal)
        for _ in range(calls):
            start = time.perf_counter()
            policy.predict_action(batch["obs"], goal)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in policy.parameters())
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), params


def train_throughput(policy, meta: ShapeMeta, batch_size: int = 64, steps: int = 10) -> float:
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    batch = fake_batch(meta, batch_size, policy.n_obs_steps, policy.horizon)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = policy.compute_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), f"torch {torch.__version__}, {args.threads} threads\n")
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
        policy = fitted_policy(kind, meta, **kwargs)
        p50, p99, params = chunk_latency(policy, meta, args.calls)
        rate = train_throughput(policy, meta) if steps in (0, 10) else float("nan")
        rows.append(
            [kind, label, steps or "-", f"{params / 1e6:.2f}M", p50, p99, "-" if np.isnan(rate) else rate]
        )
    print_table(
        [
            "policy",
            "observation",
            "sampler steps",
            "params",
            "chunk p50 ms",
            "chunk p99 ms",
            "train samples/s (b=64)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
