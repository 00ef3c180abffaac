"""Dialogs as training examples: the chat template, answer-only labels, batches and loss.

Each conversation (``fedtune/llm/corpus.py``: a JSON list of turns) becomes one example:
turns alternate user / assistant, rendered with the model's chat template; only assistant
tokens carry a label (every other position is -100, ignored by the loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedtune.data.sources import Split
from fedtune.errors import DataError

IGNORE = -100  # label of every token that is not part of an answer


def turns_of(text: str) -> list[str]:
    """A dialog stored as JSON turns; any other text is one user turn with no answer."""
    try:
        turns = json.loads(text)
    except ValueError:
        return [text]
    return [str(t) for t in turns] if isinstance(turns, list) else [text]


def messages(turns: list[str]) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def render(tokenizer, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template's text (a plain 'User:/Assistant:' one for models without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
    return text + ("Assistant:" if generation_prompt else "")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn conversation up to the assistant's answer."""
    return tokenizer(render(tokenizer, messages([prompt]), True), add_special_tokens=False)["input_ids"]


def encode_dialog(tokenizer, turns: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], labels [T]): the template's text piece by piece, so the answer spans are exact;
    labels = ids on assistant answers (with their end-of-turn token), -100 elsewhere."""
    msgs = messages(turns)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k in range(len(msgs)):
        answer = msgs[k]["role"] == "assistant"
        upto = render(tokenizer, msgs[: k + 1], False) if answer else render(tokenizer, msgs[: k + 1], True)
        if not upto.startswith(done):  # a template that rewrites earlier turns: answers cannot be located
            raise DataError("the model's chat template is not incremental; cannot mask answers")
        piece = tokenizer(upto[len(done):], add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if answer else [IGNORE] * len(piece)
        done = upto
    return np.asarray(ids[:max_length], dtype=np.int64), np.asarray(labels[:max_length], dtype=np.int64)


@dataclass(frozen=True)
class LMEncoded:
    """Tokenized dialogs, unpadded; ``targets`` is -100 outside the answers."""

    ids: tuple[np.ndarray, ...]  # N x [T_i]
    targets: tuple[np.ndarray, ...]  # N x [T_i]
    labels: np.ndarray  # [N] topic / language ids (what partitions use), not the LM targets

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, idx: np.ndarray, pad_id: int) -> dict[str, Tensor]:
        """Right-padded batch; padding is masked and labelled -100."""
        width = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(idx), width), dtype=torch.long)  # [B, T]
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)  # [B, T]
        for j, i in enumerate(idx):
            n = len(self.ids[i])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.from_numpy(self.ids[i]), torch.from_numpy(self.targets[i]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over examples of each example's mean next-token loss on its answer tokens
        (per-example terms, as DP-SGD clips them). logits [B, T, V], labels [B, T]."""
        nll, n = token_nll(logits, labels)  # [B], [B]
        return (nll / n.clamp(min=1)).mean()


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(summed next-token NLL [B], answer-token count [B]); position t predicts labels[t + 1]."""
    target = labels[:, 1:]  # [B, T-1]
    ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=IGNORE,
                                     reduction="none")  # [B, T-1]
    keep = target != IGNORE
    return (ce * keep).sum(1), keep.sum(1)


def encode_dialogs(tokenizer, split: Split, max_length: int) -> LMEncoded:
    """Every dialog of ``split`` with at least one answer token left after truncation."""
    ids, targets, labels = [], [], []
    for text, label in zip(split.texts, split.labels):
        x, y = encode_dialog(tokenizer, turns_of(text), max_length)
        if (y[1:] != IGNORE).any():
            ids.append(x), targets.append(y), labels.append(label)
    return LMEncoded(tuple(ids), tuple(targets), np.asarray(labels, dtype=np.int64))
