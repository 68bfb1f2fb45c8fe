"""Training batches gathered with tensor indexing on the training device: no per-sample Python in the step.

A ``WindowDataset`` (policies/data/windows.py) describes every window by index arrays (observed steps,
action steps, mask, weight, goal step). ``DeviceSteps`` puts the step arrays those indices point into on
the device once (low-dim arrays always; camera frames too when they take at most ``DEVICE_DATA_SHARE`` of
the device's free memory, else they stay in host RAM and each batch's frames are gathered into pinned
memory and copied asynchronously). ``DeviceBatches`` then builds a whole batch with a few indexing ops:
``steps[key][obs_index[batch]]``. Images stay uint8 until the policy's encoder crops (random crop in
training) and scales them, on the device: 4x fewer bytes to move than float frames.

On the CPU the "device" arrays are the numpy arrays themselves (``torch.from_numpy``, no copy), and a
batch costs a handful of gathers instead of a DataLoader's per-sample ``__getitem__`` and collate.

Order: ``epoch(...)`` yields the batches a ``DataLoader`` over the dataset would (same global-RNG draws,
same permutation, same ``drop_last``; ``DistributedSampler``'s under DDP), so a seeded CPU run trains on
exactly the batches it did with the DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from policies.data.windows import EpisodeData, WindowDataset

__all__ = ["DEVICE_DATA_SHARE", "DeviceBatches", "DeviceSteps", "epoch_indices"]

# Camera frames go to the device when they take at most this share of its free memory (the model,
# optimizer and activations need the rest); more than that stays in pinned host memory.
DEVICE_DATA_SHARE = 0.5


class DeviceSteps:
    """The step arrays of ``data`` (``keys``: observations, "action", "goal") as tensors for ``device``."""

    def __init__(self, data: EpisodeData, keys: Sequence[str], device: torch.device | str = "cpu"):
        from policies.device import device_memory

        self.device = torch.device(device)
        keys = [key for key in dict.fromkeys(keys) if key in data.steps]
        arrays = {key: np.ascontiguousarray(data.steps[key]) for key in keys}
        images = [key for key, array in arrays.items() if array.ndim == 4]
        image_bytes = sum(arrays[key].nbytes for key in images)
        on_device = self.device.type == "cpu" or image_bytes <= DEVICE_DATA_SHARE * device_memory(self.device)
        self.host_keys = [] if on_device else images  # gathered on the host, then copied
        self._pin = self.device.type == "cuda"  # page-locked: the copies to the GPU are asynchronous
        self.tensors: dict[str, torch.Tensor] = {}
        for key, array in arrays.items():
            tensor = torch.from_numpy(array)
            if key in self.host_keys:
                self.tensors[key] = tensor.pin_memory() if self._pin else tensor
            else:
                self.tensors[key] = tensor.to(self.device)

    def gather(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """steps[key][index] on the device (index: an int64 tensor of any shape; on the device, or on the
        CPU for a key in ``host_keys``: reading device indices back would wait for the GPU every batch)."""
        source, flat = self.tensors[key], index.reshape(-1)
        if (
            key not in self.host_keys
        ):  # index_select copies whole rows: ~20x faster than source[index] on frames
            return torch.index_select(source, 0, flat).reshape(*index.shape, *source.shape[1:])
        flat = flat.cpu()  # (a no-op for the host indices DeviceBatches passes)
        out = torch.empty((flat.numel(), *source.shape[1:]), dtype=source.dtype, pin_memory=self._pin)
        torch.index_select(source, 0, flat, out=out)
        # `out` may be freed once this returns: the caching host allocator does not hand its pages out
        # again before the queued copy has read them.
        return out.to(self.device, non_blocking=True).reshape(*index.shape, *source.shape[1:])


class DeviceBatches:
    """Batches of one ``WindowDataset`` over shared ``DeviceSteps``: the dict a DataLoader would collate."""

    def __init__(self, dataset: WindowDataset, steps: DeviceSteps, with_index: bool = False):
        device = steps.device
        self.steps, self.obs_keys, self.with_index = steps, list(dataset.obs_keys), with_index
        self.size = len(dataset)
        self.obs_index = torch.from_numpy(dataset.obs_index.astype(np.int64)).to(device)
        # Frames left on the host are gathered with host rows, from the host indices the epoch has anyway.
        self.host_obs_index = (
            torch.from_numpy(dataset.obs_index.astype(np.int64)) if steps.host_keys else None
        )
        self.action_index = torch.from_numpy(dataset.action_index.astype(np.int64)).to(device)
        self.action_mask = torch.from_numpy(dataset.action_mask).to(device)
        self.weights = torch.from_numpy(np.asarray(dataset.weights, np.float32)).to(device)
        self.goal_index = (
            torch.from_numpy(dataset.anchors.astype(np.int64)).to(device) if "goal" in steps.tensors else None
        )

    def __len__(self) -> int:
        return self.size

    def gather(self, index: torch.Tensor, host_index: torch.Tensor | None = None) -> dict:
        """The batch of windows ``index`` (int64, on the device). ``host_index``: the same indices on the CPU
        (``epoch`` passes them): the batch's "index" entry, which an ensemble reads on the host, and the
        rows of frames kept on the host, both without waiting for the GPU."""
        obs_rows = self.obs_index.index_select(0, index)
        host_rows = None
        if self.host_obs_index is not None:
            host_rows = self.host_obs_index.index_select(0, index.cpu() if host_index is None else host_index)
        batch = {
            "obs": {
                key: self.steps.gather(key, host_rows if key in self.steps.host_keys else obs_rows)
                for key in self.obs_keys
            },
            "action": self.steps.gather("action", self.action_index.index_select(0, index)),
            "action_mask": self.action_mask.index_select(0, index),
            "weight": self.weights.index_select(0, index),
        }
        if self.goal_index is not None:
            batch["goal"] = self.steps.gather("goal", self.goal_index.index_select(0, index))
        if self.with_index:
            batch["index"] = index if host_index is None else host_index
        return batch

    def epoch(
        self,
        batch_size: int,
        epoch: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[dict]:
        """One pass in the DataLoader's order (see the module docstring)."""
        host = epoch_indices(self.size, epoch, shuffle=shuffle, seed=seed, rank=rank, world=world)
        order = host.to(self.steps.device)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield self.gather(order[start : start + batch_size], host[start : start + batch_size])


def epoch_indices(
    size: int, epoch: int = 0, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """The sample order a DataLoader over ``size`` samples iterates in one epoch (int64, on the CPU):
    its RandomSampler's permutation (single process) or DistributedSampler(seed)'s share for ``rank``;
    the global-RNG draws they make are made here too, so the rest of training sees the same RNG state."""
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
    if world > 1:
        if shuffle:
            generator = torch.Generator().manual_seed(seed + epoch)
            indices = torch.randperm(size, generator=generator)
        else:
            indices = torch.arange(size)
        total = math.ceil(size / world) * world  # padded so every rank gets as many (DistributedSampler)
        indices = indices.repeat(math.ceil(total / size))[:total]
        return indices[rank:total:world]
    if not shuffle:
        return torch.arange(size)
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's
    return torch.randperm(size, generator=torch.Generator().manual_seed(sampler_seed))
