"""Device profiles: what a client can afford (adapter rank, adapted layers, batch, steps).

A heterogeneous federation gives weak devices a small LoRA rank on few layers and strong
ones a large rank on all layers (HetLoRA, Cho et al., 2024; FlexLoRA, Bai et al., 2024).
Fewer layers means the *deepest* ones (LEGEND, Liu et al., 2024: deeper layers first), via
peft's ``layers_to_transform``. Profiles are built in or defined per run; a run assigns them
to clients with one flat key, ``profiles``:

- ``""`` (default): none, every client uses the run's ``lora-rank`` / ``lora-layers``;
- ``"gpu-large,gpu-small,cpu-edge"``: round-robin by client id (a list of ``num-clients``
  names assigns every client explicitly);
- ``"gpu-large:0.2,cpu-edge:0.8"``: proportions, contiguous blocks of client ids;
- ``"auto"``: each client picks from its own hardware (``detect_profile``): no GPU ->
  cpu-edge (on the CPU), a GPU of about 8 / 24 / 80 GiB -> gpu-small / gpu-medium / gpu-large
  (bf16 base, checkpointing below 48 GiB, a 4-bit base only where the weights dominate).

User profiles (``profile-defs``, or ``[profiles.NAME]`` tables in a TOML file) are strings
``"NAME lora-rank=4 layers=2 batch-size=8"``; unset fields inherit the run's values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from fedtune.profile_specs import (  # noqa: F401 - the declared half: fedtune.profiles is the one entry point
    AUTO,
    BUILTIN,
    DEFAULT,
    Profile,
    _parse_assignment,
    apply,
    candidates,
    check,
    default_profile,
    flag,
    lookup,
    parse_def,
    registry,
    server_model,
    to_def,
)

GIB = 2**30
TIERS = ((48 * GIB, "gpu-large"), (16 * GIB, "gpu-medium"), (0, "gpu-small"))  # GPU memory -> built-in profile
QUANT_MIN_PARAMS = 3_000_000_000  # below ~3B parameters 4-bit costs more memory than bf16 (docs/gpu.md)
QUANT_WEIGHT_SHARE = 0.25  # 4-bit when the bf16 weights would take more than this share of the GPU


@dataclass(frozen=True)
class Hardware:
    gpus: int
    free_gpu_bytes: int  # on the emptiest GPU; 0 without one


def probe_hardware() -> Hardware:
    """CUDA devices and their free memory (``torch.cuda.mem_get_info``); CPU-only otherwise."""
    import torch

    if not torch.cuda.is_available():
        return Hardware(0, 0)
    n = torch.cuda.device_count()
    return Hardware(n, max(torch.cuda.mem_get_info(i)[0] for i in range(n)))


def detect_profile(probe: Callable[[], Hardware] = probe_hardware, share: float = 0.0,
                   base_params: Callable[[], int] = lambda: 0) -> Profile:
    """A real client's built-in profile from its hardware: no GPU -> cpu-edge; else by the
    GPU memory it may use (free memory, times its ``share`` = client-gpus when > 0):
    >= 48 GiB gpu-large, >= 16 GiB gpu-medium, less gpu-small. A base of >= 3B parameters
    whose bf16 weights would take over a quarter of that memory is loaded in 4-bit (nf4): the
    only case where QLoRA saves memory (H100: 8B nf4 12.4 GiB vs bf16 18.6; 1B nf4 costs more)."""
    hw = probe()
    if hw.gpus == 0:
        return BUILTIN.get("cpu-edge")
    usable = hw.free_gpu_bytes * (share if 0 < share < 1 else 1.0)
    profile = BUILTIN.get(next(name for floor, name in TIERS if usable >= floor))
    profile = replace(profile, base_dtype="bfloat16", gradient_checkpointing=usable < TIERS[0][0])  # on the GPU
    params = base_params()
    if params >= QUANT_MIN_PARAMS and 2 * params > QUANT_WEIGHT_SHARE * usable:
        profile = replace(profile, base_quant="nf4")
    return profile


def assign(cfg, client: int, probe: Callable[[], Hardware] = probe_hardware) -> Profile:
    """The profile of ``client`` under ``cfg`` (a RunConfig)."""
    spec, n = cfg.federation.profiles.strip(), cfg.partition.num_clients
    if not spec:
        return default_profile(cfg.model.lora_rank, cfg.model.lora_layers)
    if spec == AUTO:
        from fedtune.modeling import base_params

        from fedtune.catalog import adapter_kind

        quant = not adapter_kind(cfg.model.adapter).base_quant  # a quantized base takes LoRA only
        found = detect_profile(probe, cfg.federation.client_gpus, lambda: base_params(cfg.model) if quant else 0)
        if cfg.privacy.dp == "sample" and found.gradient_checkpointing:  # refused together (fedtune/tasks.py)
            found = replace(found, gradient_checkpointing=False)
        return found
    items = _parse_assignment(spec, registry(cfg.federation.profile_defs))
    if items[0][1] is None:
        return items[client % len(items)][0]
    point, acc = (client + 0.5) / n, 0.0
    for profile, share in items:
        acc += share
        if point < acc:
            return profile
    return items[-1][0]
