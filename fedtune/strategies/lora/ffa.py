"""FFA-LoRA: Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024).

A is frozen at a random init shared by every client (derived from a common seed, never trained),
only B is trained and averaged. With a shared A the average of B is the average of the updates.
Rows are drawn one by one from a per-(seed, layer, row) stream, so a rank-r A is the first r
rows of any larger-rank A: heterogeneous ranks still share A, and aggregation stays exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors, LoRAFactors
from fedtune.strategies.lora.ops import check_clients, normalized_weights, pad_rank


def ffa_init_A(seed: int, layer_name: str, r: int, d_in: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Frozen A: [r, d_in] ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's kaiming_uniform(a=sqrt(5)) bound).

    Seeded by sha256(seed, layer_name, row), not Python's salted hash(): the same in every process.
    """
    if r < 1 or d_in < 1:
        raise ValueError(f"need r >= 1 and d_in >= 1, got r={r}, d_in={d_in}")
    bound = 1.0 / math.sqrt(d_in)
    rows = []
    for j in range(r):
        digest = hashlib.sha256(f"{seed}\x00{layer_name}\x00{j}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        rows.append((torch.rand(d_in, generator=gen, dtype=F64) * 2 - 1) * bound)
    return torch.stack(rows).to(dtype)


def ffa(clients: Sequence[ClientFactors], atol: float = 1e-6) -> LoRAFactors:
    """A = the shared A of the largest rank; B = sum_i w_i (s_i / s) pad(B_i), s = sum_i w_i s_i.

    Only B is averaged; folding s_i / s in makes s * B @ A == sum_i w_i s_i B_i @ A_i exactly when
    every A_i is the first r_i rows of the shared A (with equal scales this is the plain mean of B).
    Raises ValueError when the clients' A differ. A: [R, d_in], B: [d_out, R].
    """
    clients = check_clients(clients)
    w = normalized_weights(clients).tolist()
    R = max(c.rank for c in clients)
    A = next(c.A for c in clients if c.rank == R).to(F64)  # [R, d_in]
    for i, c in enumerate(clients):
        if not torch.allclose(c.A.to(F64), A[: c.rank], rtol=0.0, atol=atol):
            raise ValueError(f"client {i}'s A is not the shared frozen A (FFA-LoRA needs a common A)")
    scale = sum(wi * c.scale for c, wi in zip(clients, w))
    B = torch.zeros(clients[0].B.shape[0], R, dtype=F64)  # [d_out, R]
    for c, wi in zip(clients, w):
        B += (wi * c.scale / scale) * pad_rank(c.A, c.B, R)[1]
    dtype = clients[0].A.dtype
    return LoRAFactors(A.to(dtype), B.to(dtype), scale)
