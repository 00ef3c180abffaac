"""Server-side evaluation of a causal LM: held-out perplexity on answer tokens, and greedy
generations for fixed prompts written per round to ``RUN/generations.jsonl``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtune.device import placement_of, to_device
from fedtune.llm.data import LMEncoded, prompt_ids, token_nll

GENERATIONS = "generations.jsonl"
GEN_TOKENS = 32  # new tokens per fixed prompt and round
PROMPTS = (  # fixed: the same every round, every run, and in the export check
    "What is AI?",
    "Tell me a joke.",
    "My computer is overheating. What should I do?",
    "Who was the first president of the United States?",
)


@torch.inference_mode()
def evaluate_lm(model: nn.Module, enc: LMEncoded, batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-level mean NLL on answers (``loss``), ``perplexity`` = exp(loss), and ``accuracy``:
    top-1 next-token accuracy on answer tokens. Batches are length-sorted to pad little."""
    if len(enc) == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "num_examples": 0.0}
    model.eval()
    where = placement_of(model)
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    nll = tokens = correct = 0.0
    for s in range(0, len(order), batch_size):
        b = to_device(enc.collate(order[s : s + batch_size], pad_id), where.device)
        with where.compute():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, T, V]
        total, n = token_nll(logits, b["labels"])
        nll, tokens = nll + float(total.sum()), tokens + float(n.sum())
        target = b["labels"][:, 1:]
        correct += float(((logits[:, :-1].argmax(-1) == target) & (target != -100)).sum())
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(tokens, 1.0),
            "num_examples": float(len(enc))}


@torch.inference_mode()
def greedy(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = GEN_TOKENS) -> list[int]:
    """Greedy continuation of a one-turn chat prompt (new token ids; stops at end of turn)."""
    where = placement_of(model)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=where.device)  # [1, T]
    model.eval()
    with where.compute():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return out[0, ids.shape[1]:].tolist()


class LMEvaluator:
    """Perplexity on a fixed slice of the held-out dialogs; generations after each round."""

    def __init__(self, cfg, run_dir: str | Path | None = None) -> None:
        from fedtune.data import load_dataset
        from fedtune.evaluation import EVAL_SUBSET_SEED
        from fedtune.bases import load_tokenizer
        from fedtune.llm.data import encode_dialogs

        test = load_dataset(cfg.data).test
        if cfg.data.eval_size and cfg.data.eval_size < len(test):
            test = test.subset(np.sort(np.random.default_rng(EVAL_SUBSET_SEED).choice(len(test), cfg.data.eval_size,
                                                                                      replace=False)))
        self.tokenizer = load_tokenizer(cfg.model.model)
        self.enc = encode_dialogs(self.tokenizer, test, cfg.data.max_length)  # the causal-lm task's encoding
        self.batch_size, self.pad_id = cfg.train.eval_batch_size, self.tokenizer.pad_token_id or 0
        self.path = Path(run_dir) / GENERATIONS if run_dir is not None else None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_lm(model, self.enc, self.batch_size, self.pad_id)

    def end_round(self, server_round: int, model: nn.Module) -> None:
        """Append this round's greedy answers to the fixed prompts (flushed, one line each)."""
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            for prompt in PROMPTS:
                tokens = greedy(model, self.tokenizer, prompt)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                fh.write(json.dumps({"round": server_round, "prompt": prompt, "answer": text, "tokens": tokens},
                                    ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_generations(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / GENERATIONS
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.exists() else []
