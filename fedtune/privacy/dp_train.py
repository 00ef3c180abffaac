"""Sample-level DP-SGD on the trainable adapter (LoRA + head) with opacus.

Per step: Poisson-sample the local examples (each with probability q = batch / n), compute
per-example gradients of the trainable tensors only (opacus GradSampleModule, hooks mode),
clip each example's gradient to L2 norm C over all those tensors, sum, add N(0, (sigma C)^2)
noise, divide by the expected batch size (DPOptimizer) and take the usual two-group AdamW
step (post-processing). The frozen base model is public and never touched.

Why GradSampleModule + DPOptimizer directly rather than ``PrivacyEngine.make_private``:
make_private derives the sample rate as ``1 / len(data_loader)`` (= 1 / ceil(n / batch)),
which is not the ``batch / n`` the noise was calibrated for, and a new engine per round
starts a new accountant. Here the same two opacus objects are built with the exact q and
every step is recorded in the caller's :class:`PrivacyAccountant`, which lives across rounds.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedtune.config import TrainConfig
from fedtune.device import placement_of, to_device
from fedtune.modeling import LogitsOnly
from fedtune.errors import ConfigError
from fedtune.privacy.accountant import PrivacyAccountant
from fedtune.privacy.calibrate import Entry, calibrate, sample_rate
from fedtune.privacy.config import DPConfig
from fedtune.training import Encoded, make_optimizer, num_local_steps

_OPACUS_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_processed")


LogitsModule = LogitsOnly  # (input_ids, attention_mask) -> logits: the module opacus wraps (fedtune.modeling)


def noise_multiplier(
    dp: DPConfig, cfg: TrainConfig, n_local: int, rounds: int | None, prior: tuple[Entry, ...] = ()
) -> float:
    """The sigma a client uses: the configured one, or the one calibrated to spend
    ``target_epsilon`` over ``prior`` (releases planned before training, e.g. the DP head)
    and ``rounds`` rounds (the same value every round)."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if rounds is None:
        raise ConfigError(
            f"bad value target-epsilon={dp.target_epsilon!r}: calibrating the noise needs the planned "
            "number of rounds (pass rounds=...), or set noise-multiplier instead"
        )
    assert dp.target_epsilon is not None
    return calibrate(dp.target_epsilon, dp.delta, cfg, n_local, rounds, dp.accountant, prior)


def train_local_dp(
    model: nn.Module,
    enc: Encoded,
    cfg: TrainConfig,
    dp: DPConfig,
    accountant: PrivacyAccountant,
    seed: int,
    pad_id: int,
    *,
    rounds: int | None = None,
    prior: tuple[Entry, ...] = (),
    noise_seed: int | None = None,
    on_step: Callable[[DPOptimizer], None] | None = None,
) -> dict[str, float]:
    """One client's DP-SGD local run; updates ``model``'s trainable tensors in place and
    records its steps in ``accountant`` (keep it across rounds; persist its state_dict).

    ``rounds``: planned rounds, needed when ``dp.target_epsilon`` sets the budget.
    ``prior``: the releases the budget also pays for (:func:`fedtune.privacy.head.head_plan`).
    ``noise_seed``: None (default) draws the Poisson sampling and the Gaussian noise from OS
    entropy, as the guarantee requires; an int makes the run reproducible, and whoever
    knows it can remove the noise: tests and debugging only. ``seed`` only seeds dropout.
    ``on_step``: diagnostics, called with the DPOptimizer after clipping and noising and
    before the parameter update (``p.grad_sample`` raw, ``p.summed_grad`` clipped sum,
    ``p.grad`` noised and scaled).

    Returns train_loss (mean over non-empty batches; NOT privatised), steps, examples_seen,
    empty_batches, epsilon (spent after this run, all rounds), delta, noise_multiplier,
    sample_rate, max_grad_norm and budget_exhausted (1.0: the budget could not pay for this
    round, nothing was trained, the weights are unchanged).
    """
    n = len(enc)
    if n == 0:
        raise ValueError("no training examples on this client")
    if accountant.mechanism != dp.accountant:
        raise ConfigError(
            f"bad value accountant={dp.accountant!r}: the client's accountant state is {accountant.mechanism!r}"
        )
    q = sample_rate(cfg.batch_size, n)
    steps = num_local_steps(cfg, n)
    sigma = noise_multiplier(dp, cfg, n, rounds, prior)
    info = {"delta": dp.delta, "noise_multiplier": sigma, "sample_rate": q, "max_grad_norm": dp.max_grad_norm}

    if dp.target_epsilon is not None:
        after = accountant.projected_epsilon(dp.delta, noise_multiplier=sigma, sample_rate=q, steps=steps)
        if after > dp.target_epsilon * (1 + 1e-9):
            return {"train_loss": 0.0, "steps": 0.0, "examples_seen": 0.0, "empty_batches": 0.0,
                    "epsilon": accountant.epsilon(dp.delta), "budget_exhausted": 1.0, **info}

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    before = [p.detach().clone() for _, p in named]

    entropy = secrets.randbits(63) if noise_seed is None else int(noise_seed)
    rng = np.random.default_rng(entropy)  # Poisson sampling
    where = placement_of(model)
    device = where.device
    generator = torch.Generator(device=device)
    generator.manual_seed(entropy)  # Gaussian noise
    torch.manual_seed(seed)  # dropout masks

    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    wrapped = LogitsModule(model)
    ModuleValidator.validate(wrapped, strict=True)  # what make_private checks (no BatchNorm etc.)
    gsm = GradSampleModule(wrapped, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = DPOptimizer(
        opt,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=min(cfg.batch_size, n),  # = q * n
        loss_reduction="mean",
        generator=generator,
    )
    if {id(p) for p in dp_opt.params} != {id(p) for _, p in named}:
        gsm._close()
        raise RuntimeError("the DP optimizer does not hold the model's own trainable tensors")
    account = accountant.optimizer_hook(q)

    def step_hook(optimizer: DPOptimizer) -> None:
        account(optimizer)
        if on_step is not None:
            on_step(optimizer)

    dp_opt.attach_step_hook(step_hook)

    losses: list[float] = []
    seen = empty = 0
    model.train()
    try:
        for _ in range(steps):
            idx = np.flatnonzero(rng.random(n) < q)
            dp_opt.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # An empty Poisson batch still releases a noise-only step, and is accounted:
                # skipping it would make the update depend on whether anyone was sampled.
                empty += 1
                for _, p in named:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                batch = to_device(enc.collate(idx, pad_id), device)  # the task's batching and per-example loss
                with where.compute():  # autocast of a half base (fedtune/device.py)
                    logits = gsm(batch["input_ids"], batch["attention_mask"])  # [B, C] or [B, T, V]
                loss = enc.loss(logits.float(), batch["labels"])
                loss.backward()
                _check_grad_samples(named, len(idx))
                losses.append(loss.detach().item())
                seen += len(idx)
            dp_opt.step()
            sched.step()
    finally:
        dp_opt.zero_grad(set_to_none=True)
        gsm._close()  # removes the hooks and opacus' per-parameter attributes
        for module in model.modules():
            for attr in ("activations", "max_batch_len"):
                module.__dict__.pop(attr, None)
        for _, p in named:
            p.grad = None
            for attr in _OPACUS_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)

    changed = [not torch.equal(b, p.detach()) for b, (_, p) in zip(before, named)]
    if not any(changed):
        raise RuntimeError(
            f"DP training took {steps} steps but left every trainable tensor unchanged; "
            "the adapter is not being trained (check that opacus sees the model's own parameters)"
        )
    return {
        "train_loss": float(np.mean(losses)) if losses else 0.0,
        "steps": float(steps),
        "examples_seen": float(seen),
        "empty_batches": float(empty),
        "epsilon": accountant.epsilon(dp.delta),
        "budget_exhausted": 0.0,
        **info,
    }


def _check_grad_samples(named: list[tuple[str, nn.Parameter]], batch: int) -> None:
    """Every trainable tensor must have a per-example gradient for this batch; a missing
    one means opacus would clip and noise without it, and that tensor would silently not
    train (or train without privacy)."""
    bad = []
    for name, p in named:
        g = getattr(p, "grad_sample", None)
        if not isinstance(g, torch.Tensor) or g.shape != (batch, *p.shape):
            bad.append(f"{name}: {None if g is None else tuple(getattr(g, 'shape', ()))}")
    if bad:
        raise RuntimeError(f"opacus computed no per-example gradient of shape [{batch}, ...] for: {'; '.join(bad[:5])}")
