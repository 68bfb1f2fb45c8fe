"""Torch's CPU thread count, set in one place for every job that runs a policy."""

from __future__ import annotations


def set_torch_threads(threads: int | None) -> None:
    """Use `threads` torch threads (None or 0: leave torch's default). With more threads than free cores,
    every plan and training step stalls on a shared machine (measured 30-60x); torch is imported only here,
    so torch-free callers (the fleet harness) stay light until a policy runs."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
