"""One policy serving many robots: plans asked for in the same control tick run as one batched call.

A GPU planning one robot's chunk at a time is idle between tiny calls (batch 1 is launch-bound: a
batch of 16 costs about what a batch of 1 does). ``BatchedPlanner`` gathers them:

    planner = BatchedPlanner()
    runner = planner.runner(policy, version, num_samples=4)     # a PolicyRunner, one per robot
    with planner.tick(len(robots)):                             # each robot steps in its own thread
        ... robot i: action = runner_i.act(obs_i); then planner.finish() ...

Inside a tick each participating thread either asks for a plan (its runner's queue ran dry) or calls
``finish()`` without one; once every participant has done one or the other, the waiting requests run
as one ``predict_action`` per policy (robots on different policy versions are batched per version), and
each runner gets its rows. Outside a tick a runner plans alone, as a plain PolicyRunner does.
``finish()`` after a plan counts nothing more, so every thread can call it unconditionally.

Batched rows draw fresh noise (a runner's ``noise_seed`` would give every plan the same noise; batch
positions change from tick to tick, so it is refused here).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from policies.runner import PolicyRunner

__all__ = ["BatchedPlanner"]


@dataclass
class _Request:
    policy: torch.nn.Module
    obs: dict[str, torch.Tensor]
    goal: torch.Tensor | None
    num_samples: int
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Routed:
    """A policy as a runner sees it, whose ``predict_action`` goes through the planner (all else delegates)."""

    def __init__(self, policy: torch.nn.Module, planner: BatchedPlanner):
        self._policy, self._planner = policy, planner

    def __getattr__(self, name: str):
        return getattr(self._policy, name)

    def eval(self) -> _Routed:
        self._policy.eval()
        return self

    def to(self, device) -> _Routed:
        self._policy.to(device)
        return self

    def parameters(self, recurse: bool = True):
        return self._policy.parameters(recurse)

    def predict_action(self, obs, goal=None, num_samples: int = 1, generator=None) -> torch.Tensor:
        if generator is not None:
            raise ValueError("a batched runner draws fresh noise: noise_seed is not supported")
        return self._planner.plan(self._policy, obs, goal, num_samples)


class BatchedPlanner:
    """Batches the plans of the runners it made, tick by tick (see the module docstring)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._participants = 0  # threads in the current tick (0: no tick, runners plan alone)
        self._settled = 0  # of them: asked for a plan or finished without one
        self._pending: list[_Request] = []
        self._asked = threading.local()
        self.batch_sizes: list[int] = []  # rows of every batched call so far

    def runner(self, policy: torch.nn.Module, version: str = "", **runner_kwargs) -> PolicyRunner:
        """A PolicyRunner over ``policy`` (shared, not copied) whose plans go through this planner."""
        if runner_kwargs.get("noise_seed") is not None or runner_kwargs.get("cuda_graphs"):
            raise ValueError(
                "a batched runner draws fresh noise and plans eagerly: no noise_seed, no cuda_graphs"
            )
        return PolicyRunner(_Routed(policy, self), version, **runner_kwargs)

    @contextmanager
    def tick(self, participants: int):
        """One control tick of ``participants`` threads, each acting for one robot, then ``finish()``."""
        with self._cond:
            if self._participants:
                raise RuntimeError("a tick is already running")
            self._participants, self._settled = participants, 0
        try:
            yield self
        finally:
            with self._cond:
                self._participants = 0
                self._flush()  # a participant that died before settling must not strand the others

    def finish(self) -> None:
        """This thread's robot has stepped (counted only if it did not ask for a plan in this tick)."""
        asked = getattr(self._asked, "flag", False)
        self._asked.flag = False
        if asked:
            return
        with self._cond:
            if self._participants:
                self._settled += 1
                if self._settled >= self._participants:
                    self._flush()

    def plan(self, policy, obs, goal, num_samples: int) -> torch.Tensor:
        """(1, K, Tp, A) for one robot: alone outside a tick, else batched with the tick's other requests."""
        request = _Request(policy, obs, goal, num_samples)
        with self._cond:
            if not self._participants:
                self._pending.append(request)
                self._flush()
            else:
                self._asked.flag = True
                self._pending.append(request)
                self._settled += 1
                if self._settled >= self._participants:
                    self._flush()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _flush(self) -> None:
        """Run every pending request, one batched call per (policy, K); the caller holds the lock."""
        pending, self._pending = self._pending, []
        groups: dict[tuple[int, int], list[_Request]] = {}
        for request in pending:
            groups.setdefault((id(request.policy), request.num_samples), []).append(request)
        for requests in groups.values():
            first = requests[0]
            try:
                with torch.inference_mode():  # (per thread: the flushing thread may not be in a plan)
                    obs = {key: torch.cat([r.obs[key] for r in requests]) for key in first.obs}
                    goal = None if first.goal is None else torch.cat([r.goal for r in requests])
                    out = first.policy.predict_action(obs, goal, num_samples=first.num_samples)
                self.batch_sizes.append(len(requests))
                for row, request in enumerate(requests):
                    request.result = out[row : row + 1]
            except Exception as err:  # every waiting robot hears of it, not only one
                for request in requests:
                    request.error = err
            for request in requests:
                request.done.set()
