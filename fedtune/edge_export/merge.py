"""A run's global adapter on its base model, and the merged plain model that gets exported."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from fedtune.config import RunConfig
from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.runtime import read_labels

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedRun:
    cfg: RunConfig
    labels: list[str]
    model: nn.Module  # the PeftModel, adapter not merged: exactly what the run evaluated


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits [B, C]: the exported signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _run_files(run_dir: Path) -> tuple[Path, Path]:
    """(adapter weights, labels.json) of a finished run."""
    from fedtune.server.run_dir import ADAPTER_DIR, CONFIG

    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    adapter = run_dir / ADAPTER_DIR
    for need in (run_dir / CONFIG, adapter / ADAPTER_WEIGHTS, adapter / "labels.json"):
        if not need.is_file():
            raise ExportError(f"{run_dir} is not a finished run: {need.relative_to(run_dir)} is missing")
    return adapter / ADAPTER_WEIGHTS, adapter / "labels.json"


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_run(run_dir: str | Path) -> LoadedRun:
    """Base model + the run's global adapter (peft format), in eval mode."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedtune.modeling import build_model
    from fedtune.server.run_dir import RunDir

    weights, labels_file = _run_files(Path(run_dir))
    cfg = RunDir(run_dir).config()
    labels = read_labels(labels_file)
    with _no_progress_bar():
        model = build_model(cfg.model, len(labels), seed=cfg.federation.seed)
    try:
        state = load_file(str(weights))
        result = set_peft_model_state_dict(model, state)
    except Exception as exc:  # a truncated file, a shape mismatch: this run's adapter is unusable
        raise ExportError(f"the adapter in {run_dir} does not fit its base model: {str(exc).splitlines()[0]}") from None
    trainable = sum(p.requires_grad for p in model.parameters())
    if result.unexpected_keys or len(state) != trainable:
        raise ExportError(f"the adapter in {run_dir} has {len(state)} tensors, its base model expects {trainable}")
    return LoadedRun(cfg, labels, model.eval())


def merge(model: nn.Module) -> LogitsOnly:
    """Fold the adapter into the base weights (in place) and drop the peft wrapper."""
    return LogitsOnly(model.merge_and_unload()).eval()
