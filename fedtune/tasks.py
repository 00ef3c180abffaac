"""What a run fine-tunes: a sequence classifier or a causal LM. One registry, ``TASKS``,
chosen by the config key ``task`` (the ``llm`` preset sets ``causal-lm``).

A task supplies the frozen base model and peft's task type, how a split is encoded, the
local evaluation, and the server's per-round evaluator. Everything else (the wire boundary
``trainable_state``, every strategy, DP, profiles) is shared: it sees only LoRA tensors
(and, for classifiers, the head). Encodings carry their own ``collate`` and per-example
``loss`` so that training loops and DP-SGD batch and score any task the same way.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from fedtune.compat import check_task  # noqa: F401 - cross-section rules of a task live in fedtune.compat
from fedtune.registry import Registry


class Evaluator(Protocol):
    enc: Any

    def __call__(self, model: nn.Module) -> dict[str, float]: ...

    def end_round(self, server_round: int, model: nn.Module) -> None: ...


class Task(Protocol):
    peft_task: str  # peft TaskType name

    def base_model(self, cfg: Any, num_labels: int) -> nn.Module: ...

    def encode(self, tokenizer: Any, split: Any, max_length: int) -> Any: ...

    def evaluate(self, model: nn.Module, enc: Any, batch_size: int, pad_id: int) -> dict[str, float]: ...

    def evaluator(self, cfg: Any, run_dir: Any = None) -> Evaluator: ...


TASKS: Registry[Task] = Registry("task")


class Classify:
    """Sequence classification: the base model + a new head (trained and sent with LoRA)."""

    peft_task = "SEQ_CLS"

    def base_model(self, cfg, num_labels: int) -> nn.Module:
        from fedtune.bases import _base_model

        return _base_model(cfg.model, num_labels)

    def encode(self, tokenizer, split, max_length: int):
        from fedtune.training import encode

        return encode(tokenizer, split, max_length)

    def evaluate(self, model, enc, batch_size: int, pad_id: int) -> dict[str, float]:
        from fedtune.training import evaluate

        return evaluate(model, enc, batch_size, pad_id)

    def evaluator(self, cfg, run_dir=None) -> Evaluator:
        from fedtune.evaluation import TestEvaluator

        class _Evaluator(TestEvaluator):
            def end_round(self, server_round: int, model: nn.Module) -> None:
                """Nothing beyond accuracy and loss for a classifier."""

        return _Evaluator(cfg)


class CausalLM:
    """Instruction tuning of a causal LM: loss on the answer tokens only, perplexity per round,
    greedy generations for fixed prompts (fedtune/llm/)."""

    peft_task = "CAUSAL_LM"

    def base_model(self, cfg, num_labels: int) -> nn.Module:
        from fedtune.bases import base_causal_lm

        return base_causal_lm(cfg.model, cfg.base_dtype)

    def encode(self, tokenizer, split, max_length: int):
        from fedtune.llm.data import encode_dialogs

        return encode_dialogs(tokenizer, split, max_length)

    def evaluate(self, model, enc, batch_size: int, pad_id: int) -> dict[str, float]:
        from fedtune.llm.evaluate import evaluate_lm

        return evaluate_lm(model, enc, batch_size, pad_id)

    def evaluator(self, cfg, run_dir=None) -> Evaluator:
        from fedtune.llm.evaluate import LMEvaluator

        return LMEvaluator(cfg, run_dir)


TASKS.register("classify")(Classify())
TASKS.register("causal-lm")(CausalLM())


def task_of(cfg) -> Task:
    """The task of a RunConfig (or of a ModelConfig)."""
    model = cfg if hasattr(cfg, "task") else cfg.model
    return TASKS.get(model.task)
