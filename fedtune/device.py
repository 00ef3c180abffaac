"""Where a process's tensors live and in what precision its frozen base computes: the one
place that decides (docs/gpu.md). Nothing else in fedtune names ``cuda``.

``device``: auto (the CUDA device this process was given: Ray sets CUDA_VISIBLE_DEVICES for a
virtual client with client-gpus > 0, a SuperNode sees its own GPUs; else the CPU) | cpu |
cuda | cuda:N. Adapters, head and optimizer state stay fp32 whatever the base's precision;
autocast runs the base's matmuls in its half dtype (bf16 on CPUs with AMX / AVX512-BF16 too,
``cpu-autocast=auto``: Intel's "bf16 autocast on Xeon" recipe).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.catalog import check_device as check  # syntax only (a config may be written elsewhere)
from fedtune.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PLACED: weakref.WeakKeyDictionary[nn.Module, Placement] = weakref.WeakKeyDictionary()


def resolve(request: str, key: str = "device") -> torch.device:
    """``request`` -> a torch.device this process can use, or a one-line ConfigError."""
    check(key, request)
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"bad value {key}={request!r}: this process sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")
    index = int(request.split(":")[1]) if ":" in request else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"bad value {key}={request!r}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """The CPU has bf16 matrix instructions (AMX or AVX512-BF16), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def autocast_dtype(device: torch.device, base_dtype: str, cpu_autocast: str = "off") -> torch.dtype | None:
    """The dtype the frozen base computes in under autocast, or None (plain fp32): a half
    base on any device; an fp32 base on a CPU with bf16 instructions when cpu-autocast=auto."""
    if base_dtype != "float32":
        return DTYPES[base_dtype]
    if device.type == "cpu" and cpu_autocast == "auto" and cpu_has_bf16():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Placement:
    device: torch.device
    autocast: torch.dtype | None = None

    def compute(self) -> AbstractContextManager:
        """The forward's context: autocast on the device, or nothing."""
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()


def place(model: nn.Module, placement: Placement) -> nn.Module:
    """Record where ``model`` computes (its parameters are already there)."""
    _PLACED[model] = placement
    return model


def placement_of(model: nn.Module) -> Placement:
    """The model's recorded placement; else its parameters' device, no autocast."""
    if model in _PLACED:
        return _PLACED[model]
    first = next(model.parameters(), None)
    return Placement(first.device if first is not None else torch.device("cpu"))


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """One collated batch on the model's device: the one place batches move. To a GPU through
    pinned memory, so the copy is truly asynchronous: from pageable memory CUDA syncs the stream
    first, and the host could not queue the next step's kernels while the GPU runs this one."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True) for k, v in batch.items()}


def cap_memory(share: float, device: torch.device) -> None:
    """A hard cap on this process's CUDA allocator: ``share`` of the device (client-gpus);
    going past it raises torch.cuda.OutOfMemoryError in this process only."""
    if device.type == "cuda" and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)


def peak_mib(device: torch.device, reset: bool = True) -> float:
    """Peak CUDA memory allocated on ``device`` since the last reset, in MiB (0 on CPU)."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return float(peak)


def accelerator_bytes() -> int:
    """Total memory of the emptiest visible CUDA device; 0 without one."""
    if not torch.cuda.is_available():
        return 0
    return max(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count()))
