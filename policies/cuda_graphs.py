"""A policy's whole chunk prediction (encoder + every denoiser step) as one CUDA graph replay.

At batch 1 a diffusion policy's GPU time is mostly kernel launches: DDIM-10 through the U-Net is ~10 x
60 small kernels, each launched by Python. Captured once into a CUDA graph, a plan is one replay: copy
the observation into the graph's static inputs, replay, read the static output. Shapes are fixed (batch
1, To steps, K samples), which is exactly the runner's case; the runner builds one ``GraphedPlanner``
per policy and K (``PolicyRunner(cuda_graphs=True)``) and falls back to eager calls elsewhere.

Noise: the graph draws its initial noise from the device's default generator (capture records the draw,
every replay draws fresh numbers). With a fixed ``seed`` the generator is re-seeded for that replay and
restored after, so every plan starts from the same noise, as the runner's ``noise_seed`` promises.
Everything inside ``predict_action`` must stay on the device (no ``.item()``, no host-to-device copies):
the U-Net's step input is a fill, the schedulers' coefficients are Python floats or CPU scalars
(tests/test_device_paths.py checks every policy kind on the meta device).

Threads: robots planning in threads of one process (RegistryPolicies, several agents) may each build a
graph. Captures take turns (one lock per process), and a capture only forbids unsafe CUDA calls in its
own thread (``capture_error_mode="thread_local"``): with the default ("global") another robot's eager
plan allocating or synchronizing during a capture would fail or invalidate it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

__all__ = ["GraphedPlanner"]

_CAPTURE = threading.Lock()  # one capture at a time in this process


class GraphedPlanner:
    """``policy.predict_action`` for one observation at fixed shapes, replayed from a CUDA graph.
    ``features(obs, goal)``, when given, is captured into the same graph (a safety filter's embedding of
    the observation: no second, eager encoder pass per plan); its result is ``self.features``."""

    def __init__(
        self,
        policy,
        num_samples: int,
        device: torch.device,
        warmup: int = 3,
        features: Callable[[dict, torch.Tensor | None], torch.Tensor] | None = None,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.policy, self.num_samples, self.device = policy, num_samples, device
        self._features = features
        meta = policy.shape_meta
        self.obs = {
            key: torch.zeros(
                (1, policy.n_obs_steps, *shape),
                dtype=torch.uint8 if len(shape) == 3 else torch.float32,
                device=device,
            )
            for key, shape in meta.obs.items()
        }
        self.goal = torch.zeros((1, meta.goal_dim), device=device) if meta.goal_dim else None
        self.replays = 0
        with _CAPTURE, torch.inference_mode():
            side = torch.cuda.Stream(device)  # warm-up (lazy inits, cuDNN autotuning) off the capture stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._predict()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out, self.features = self._predict()

    def _predict(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.policy.predict_action(self.obs, self.goal, num_samples=self.num_samples)
        return out, (None if self._features is None else self._features(self.obs, self.goal))

    def __call__(
        self, obs: Mapping[str, torch.Tensor], goal: torch.Tensor | None, seed: int | None = None
    ) -> torch.Tensor:
        """(1, K, Tp, A) for this observation; a view of the graph's output (copy it before the next call)."""
        for key, static in self.obs.items():
            static.copy_(obs[key], non_blocking=True)
        if self.goal is not None:
            self.goal.copy_(goal, non_blocking=True)
        if seed is None:
            self.graph.replay()
        else:
            with torch.random.fork_rng(devices=[self.device]), torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)  # this plan's noise; the generator is restored after
                self.graph.replay()
        self.replays += 1
        return self.out
