"""What a client reports about its device, and how a CUDA out-of-memory stays its own failure.

A virtual client's GPU share (``client-gpus``) is enforced as a hard cap on its process's
CUDA allocator (fedtune.device.cap_memory): going past it raises OutOfMemoryError in that
process only. ``oom_mod`` turns it into this client's failed reply, with the reason, after
freeing the cached blocks, so the actor (and the clients it serves next) go on.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from torch import nn

from fedtune import wire
from fedtune.device import peak_mib, placement_of


def device_metrics(model: nn.Module) -> dict[str, float]:
    """MetricRecord entries: the CUDA device index (-1 = CPU) and its peak MiB this round."""
    device = placement_of(model).device
    index = -1 if device.type != "cuda" else (device.index or 0)
    return {wire.DEVICE_INDEX: index, wire.GPU_PEAK: peak_mib(device)}


def start_round(model: nn.Module) -> None:
    peak_mib(placement_of(model).device, reset=True)  # the peak of this round only


def oom_reason(exc: BaseException) -> str:
    device = torch.cuda.current_device() if torch.cuda.is_available() else "?"
    return f"CUDA out of memory on cuda:{device} (this client's share: client-gpus): {str(exc).splitlines()[0][:200]}"


def oom_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: a CUDA OOM in this client's handler fails this client only, with its reason."""
    reason = None
    try:
        return call_next(msg, context)
    except torch.cuda.OutOfMemoryError as exc:
        reason = oom_reason(exc)
    gc.collect()  # the failed step's tensors are unreachable once the exception is gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise RuntimeError(reason)
