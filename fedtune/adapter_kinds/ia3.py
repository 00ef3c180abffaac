"""``adapter=ia3``: peft's IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning"): learned vectors that rescale the keys, the values
and the feed-forward input of each adapted layer, initialised to ones, plus the head.

The targets are peft's defaults for the base's architecture (BERT / MiniLM: ``key``, ``value``
and ``output.dense``, the feed-forward ones rescaling their input), on the deepest ``lora-layers``
layers (0 = all). ``target-modules`` and the LoRA keys do not apply. A reply is the whole
trainable state (the vectors and the head), aggregated by a plain example-weighted mean
(fedavg / fedavgm / fedadam: the strategies with the catalog's ``dense`` flag); with no rank
and no layer set to differ by, ``profiles`` is refused. Export merges the vectors into the
weights (peft's ``merge_and_unload``), so the ONNX graph is the plain base's.
"""

from __future__ import annotations

from torch import nn

from fedtune.adapter_kinds.base import AdapterKind
from fedtune.adapter_kinds.lora import adapted_layers
from fedtune.config import ModelConfig
from fedtune.errors import ModelError


class IA3(AdapterKind):
    name = "ia3"

    def build(self, base: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
        """IA3 vectors on peft's default targets for the base's model type (nothing random: they start at 1)."""
        from peft import IA3Config, TaskType, get_peft_model
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
        )

        from fedtune.tasks import task_of

        model_type = getattr(base.config, "model_type", "")
        if model_type not in TARGETS:
            raise ModelError(f"cannot attach IA3 to {cfg.model!r}: peft has no default IA3 modules for "
                             f"model type {model_type!r}")
        targets = _targets(base, cfg, TARGETS[model_type])
        feedforward = [n for n in targets if _matches(n, FEEDFORWARD[model_type])]
        config = IA3Config(task_type=TaskType[task_of(cfg).peft_task], target_modules=targets,
                           feedforward_modules=feedforward)
        return get_peft_model(base, config)


def _matches(name: str, keys: list[str]) -> bool:
    """peft's rule for a target key: the module's whole name, or its last dotted parts."""
    return any(name == k or name.endswith("." + k) for k in keys)


def _targets(base: nn.Module, cfg: ModelConfig, keys: list[str]) -> list[str]:
    """The full names of the linear layers peft's ``keys`` name, on the deepest ``lora-layers``
    transformer layers (peft's IA3Config has no layers_to_transform)."""
    from fedtune.adapters import layer_index

    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and _matches(n, keys)]
    layers = adapted_layers(cfg, int(getattr(base.config, "num_hidden_layers", 0) or 0))
    return [n for n in names if layers is None or layer_index(n) in layers]


KIND = IA3()
