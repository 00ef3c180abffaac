"""Types and scalings for heterogeneous-rank LoRA aggregation (pure torch, no Flower).

Convention (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): one
layer's update is ``Delta W = s * B @ A`` with ``A: [r, d_in]``, ``B: [d_out, r]`` and ``s``
the scaling; the rank r is A.shape[0] == B.shape[1], validated on construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def lora_scale(alpha: float, r: int) -> float:
    """s = alpha / r (Hu et al., 2022)."""
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    return alpha / r


def rslora_scale(alpha: float, r: int) -> float:
    """s = alpha / sqrt(r) (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for LoRA")."""
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    return alpha / math.sqrt(r)


def check_pair(A: Tensor, B: Tensor) -> None:
    """A: [r, d_in], B: [d_out, r], floating point, r >= 1; else ValueError naming the mismatch."""
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D, got A.shape={tuple(A.shape)}, B.shape={tuple(B.shape)}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(f"A and B must be floating point, got {A.dtype} and {B.dtype}")
    if A.shape[0] < 1 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"rank mismatch: A has rank {A.shape[0]} (A.shape={tuple(A.shape)}) "
            f"but B has {B.shape[1]} columns (B.shape={tuple(B.shape)})"
        )


def _product(A: Tensor, B: Tensor, scale: float) -> Tensor:
    return scale * (B.to(F64) @ A.to(F64))  # [d_out, d_in], float64


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: compare by identity
class ClientFactors:
    """One client's LoRA factors for ONE layer. rank r = A.shape[0] = B.shape[1] (validated).

    A: [r, d_in]; B: [d_out, r]; scale: s > 0; weight: data weight >= 0 (e.g. #examples).
    """

    A: Tensor
    B: Tensor
    scale: float
    weight: float

    def __post_init__(self) -> None:
        check_pair(self.A, self.B)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"negative or non-finite weight: {self.weight} (weights must be >= 0)")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """s * B @ A in float64: [d_out, d_in]."""
        return _product(self.A, self.B, self.scale)


@dataclass(frozen=True, eq=False)
class LoRAFactors:
    """Factors the server sends out: Delta W = scale * B @ A, A: [R, d_in], B: [d_out, R]."""

    A: Tensor
    B: Tensor
    scale: float

    def __post_init__(self) -> None:
        check_pair(self.A, self.B)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """scale * B @ A in float64: [d_out, d_in]."""
        return _product(self.A, self.B, self.scale)
