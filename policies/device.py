"""Where a policy runs and in what precision: one place for device names, their errors and CUDA settings.

    device = resolve_device("auto")          # "auto" | "cpu" | "cuda" | "cuda:N"; auto: CUDA when present
    precision = resolve_precision("auto", device)   # "auto" | "fp32" | "bf16"; auto: bf16 on CUDA (Ampere+)
    with autocast(device, precision): loss = policy(batch)

Device names are checked without torch (``check_device``, used by the typed configs, so `device=gpu` is a
one-line config error); ``resolve_device`` then raises ``DeviceError`` naming what is missing
(`device=cuda` on a machine without CUDA, `cuda:3` on a two-GPU machine).

Mixed precision follows Diffusion Policy practice on GPUs: bf16 autocast for the forward pass (no loss
scaling needed, unlike fp16), fp32 master weights, optimizer state and EMA (autocast never changes a
parameter's dtype). ``bf16`` on the CPU runs the same autocast path (slower there than fp32 on most CPUs:
it exists so the path is tested without a GPU). TF32 matmuls and convolutions are on for CUDA
(``enable_tf32``): ~fp32 accuracy for training, several times the fp32 throughput on Ampere and later.

Memory: ``check_fits(bytes_needed, device, what)`` compares an estimate with what the device has free
(CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable) and raises ``DeviceError`` before anything is
allocated; ``out_of_memory(err, device, what)`` turns an OOM that still happens into the same kind of
message. ``parameter_count(build)`` counts a model's parameters by building it on torch's ``meta`` device
(no memory), so a checkpoint's needs are known from its config alone.

torch is imported inside the functions: the typed configs (torch-free) import the name checks from here.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from configs.schema import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_CHOICES",
    "PRECISIONS",
    "DeviceError",
    "autocast",
    "check_compiler",
    "check_device",
    "check_fits",
    "device_memory",
    "enable_tf32",
    "out_of_memory",
    "parameter_count",
    "process_device",
    "resolve_device",
    "resolve_precision",
]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
GIB = 1024**3
# Training needs per parameter: fp32 weights (4) + gradients (4) + AdamW moments (8) + the EMA copy (4).
TRAIN_BYTES_PER_PARAM = 20
INFER_BYTES_PER_PARAM = 4
# What a CUDA context, cuDNN/cuBLAS workspaces and the caching allocator take before any tensor (measured
# ~0.5 GiB on recent drivers); kept as headroom on top of every estimate.
CUDA_OVERHEAD_BYTES = GIB // 2


class DeviceError(ConfigError):
    """A device that is not there or too small; ``str(err)`` is "device: <problem>" like any config error."""

    def __init__(self, problem: str, key: str = "device"):
        super().__init__(key, problem)


def check_device(value, key: str = "device") -> None:
    """A config check (torch-free): ``value`` must name a device this module resolves."""
    if not (isinstance(value, str) and _DEVICE_NAME.match(value)):
        raise ConfigError(key, f"must be {DEVICE_CHOICES}, got {value!r}")


def check_precision(value, key: str = "precision") -> None:
    if value not in PRECISIONS:
        raise ConfigError(key, f"must be one of {', '.join(PRECISIONS)}, got {value!r}")


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: check the driver"


def resolve_device(name: str | torch.device = "auto", key: str = "device") -> torch.device:
    """The torch.device a setting names: "auto" (CUDA when present, else the CPU), "cpu", "cuda"
    (the current CUDA device) or "cuda:N". DeviceError for a device this machine does not have."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    check_device(name, key)
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{name} requested but {_no_cuda_reason()}; or set {key}=cpu (or auto)", key)
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{name} requested but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}", key
        )
    return torch.device("cuda", index)


def process_device(
    name: str = "auto", env: Mapping[str, str] | None = None, key: str = "device"
) -> torch.device:
    """This process's device, under torchrun too (``env``: torchrun's WORLD_SIZE, LOCAL_WORLD_SIZE,
    LOCAL_RANK; default os.environ). With several processes, auto and cuda take cuda:LOCAL_RANK, one
    GPU each (NCCL refuses two ranks on one GPU); an explicit cuda:N shared by more than one process
    on this machine is a DeviceError. A single process gets ``resolve_device(name)``."""
    import torch

    env = os.environ if env is None else env
    check_device(name, key)
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1 and local > 1 and name.startswith("cuda:"):
        raise DeviceError(
            f"{name} would put all {local} processes torchrun started on this machine on one GPU (NCCL "
            f"needs one each): set {key}=cuda (or auto) and process LOCAL_RANK takes cuda:LOCAL_RANK; "
            "CUDA_VISIBLE_DEVICES picks which GPUs",
            key,
        )
    device = resolve_device(name, key)
    if world > 1 and device.type == "cuda" and name in ("auto", "cuda"):
        rank, count = int(env.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if rank >= count:
            raise DeviceError(
                f"torchrun started {local} processes on this machine, which has {count} CUDA device(s): "
                f"start at most --nproc_per_node={count}",
                key,
            )
        device = torch.device("cuda", rank)
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in on ``device``: auto is bf16 on a CUDA device that computes it natively
    (``native_bf16``), else fp32."""
    import torch

    check_precision(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda" and (
        torch.cuda.is_bf16_supported()
        if torch.version.hip
        else native_bf16(torch.cuda.get_device_capability(device))
    ):
        return "bf16"
    return "fp32"


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether an NVIDIA GPU of this compute capability computes in bf16 natively (Ampere, 8.0, and later).
    Older ones (V100, T4, Jetson Xavier) emulate it, slower than fp32, although torch.cuda.is_bf16_supported()
    says yes there by default (it counts emulation), and it asks about the current device, not this one."""
    return capability[0] >= 8


def autocast(device: torch.device, precision: str):
    """The forward pass's context: bf16 autocast on ``device``, or nothing for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_compiler(device: torch.device, key: str = "compile") -> None:
    """A ConfigError naming ``key`` when torch.compile cannot build kernels for ``device`` here: inductor
    compiles C++ on the CPU (CXX, else g++) and Triton's launchers on CUDA (CC, else gcc or clang, and
    Python.h). Slim CUDA images often lack them; without this check the first step failed in a traceback."""
    import shutil
    import sysconfig
    from pathlib import Path

    if device.type == "cuda":
        names, what = [os.environ.get("CC"), "gcc", "clang"], "a C compiler (gcc or clang, or CC)"
    else:
        names, what = [os.environ.get("CXX"), "g++"], "a C++ compiler (g++, or CXX)"
    if not any(name and shutil.which(name) for name in names):
        raise ConfigError(
            key,
            f"torch.compile on {device.type} needs {what} and none was found: install one "
            f"(apt-get install build-essential) or set {key}=false",
        )
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if device.type == "cuda" and not headers.exists():  # Triton's launchers include it
        raise ConfigError(
            key,
            f"torch.compile on cuda needs Python's C headers ({headers} is missing): install them "
            f"(apt-get install python3-dev) or set {key}=false",
        )


def enable_tf32(device: torch.device) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (no effect on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes in training: pick the fastest kernels once


def device_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: free device memory; CPU: the kernel's MemAvailable)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown (not Linux): do not refuse


def check_fits(bytes_needed: int, device: torch.device, what: str, hint: str = "") -> None:
    """DeviceError when ``what`` (needing about ``bytes_needed``) cannot fit in what ``device`` has free."""
    needed = bytes_needed + (CUDA_OVERHEAD_BYTES if device.type == "cuda" else 0)
    free = device_memory(device)
    if needed > free:
        raise DeviceError(
            f"{what} needs about {needed / GIB:.1f} GiB on {device}, which has {free / GIB:.1f} GiB free"
            + (f"; {hint}" if hint else "")
        )


def out_of_memory(err: BaseException, device: torch.device, what: str, hint: str = "") -> DeviceError:
    """A DeviceError saying ``what`` ran out of memory on ``device`` (for ``raise ... from err``)."""
    free = device_memory(device)
    return DeviceError(
        f"{what} ran out of memory on {device} ({free / GIB:.1f} GiB free now)"
        + (f"; {hint}" if hint else "")
    )


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def parameter_count(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the module ``build()`` makes, built on the meta device (nothing allocated, no RNG)."""
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())
