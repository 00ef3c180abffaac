"""The device-side text generator: greedy decoding with a KV cache on onnxruntime + tokenizers
+ numpy only (importing this module never pulls in torch or transformers).

An LLM export folder holds ``model.onnx`` (the decoder of ``fedtune.edge_export.decoder``),
optionally ``model.int8.onnx``, ``tokenizer.json`` and ``generation.json`` (the chat
template around one user prompt, the end-of-turn ids and the cache geometry).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedtune.edge_export.errors import EdgeRuntimeError
from fedtune.edge_export.layout import MODEL_FP32, MODEL_INT8, TOKENIZER
from fedtune.edge_export.runtime import open_session

GENERATION = "generation.json"


def read_generation(path: Path) -> dict:
    if not path.is_file():
        raise EdgeRuntimeError(f"no {path.name} in {path.parent}: not an LLM export folder")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        for key in ("prefix", "suffix", "eos_token_ids", "layers", "kv_heads", "head_dim"):
            spec[key]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeRuntimeError(f"cannot read {path}: {exc!s:.200}") from None
    return spec


class EdgeGenerator:
    """``EdgeGenerator(folder).generate("prompt", max_new_tokens=32) -> "answer"``."""

    def __init__(self, folder: str | Path, model_file: str = MODEL_FP32, threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EdgeRuntimeError(f"export folder not found: {self.folder}")
        self.spec = read_generation(self.folder / GENERATION)
        if not (self.folder / TOKENIZER).is_file():
            raise EdgeRuntimeError(f"no {TOKENIZER} in {self.folder}")
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
        self.session = open_session(self.folder / model_file, threads)
        self.layers, self.eos = int(self.spec["layers"]), set(self.spec["eos_token_ids"])
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[3].type else np.float32

    @classmethod
    def int8(cls, folder: str | Path, threads: int | None = None) -> EdgeGenerator:
        return cls(folder, MODEL_INT8, threads)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The chat template around one user turn, up to the assistant's answer."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise EdgeRuntimeError("the prompt is empty")
        text = self.spec["prefix"] + prompt + self.spec["suffix"]
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, int(self.spec["kv_heads"]), 0, int(self.spec["head_dim"]))  # [B, H, 0, D]
        return {f"past_{k}_{i}": np.zeros(shape, self.dtype) for i in range(self.layers) for k in ("key", "value")}

    def step(self, ids: list[int], past: dict[str, np.ndarray], start: int) -> tuple[np.ndarray, dict]:
        """Run ``ids`` after ``start`` cached tokens: (logits [S, V], the new cache)."""
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
                "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None], **past}
        out = self.session.run(None, feed)
        present = {f"past_{k}_{i}": out[1 + 2 * i + j] for i in range(self.layers) for j, k in enumerate(("key", "value"))}
        return out[0][0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, V] of a whole sequence in one call, no cache (the reference for the cache)."""
        return self.step(ids, self.empty_cache(), 0)[0]

    def generate_ids(self, ids: list[int], max_new_tokens: int = 32) -> tuple[list[int], np.ndarray]:
        """Greedy new tokens after ``ids`` (stops after an end-of-turn token) and the logits
        [N, V] each was chosen from: the prompt once, then one token per step on the cache."""
        if max_new_tokens < 1:
            raise EdgeRuntimeError("--max-new-tokens must be >= 1")
        new, rows = [], []
        logits, past = self.step(list(ids), self.empty_cache(), 0)
        pos = len(ids)
        while True:
            rows.append(logits[-1])
            token = int(np.argmax(logits[-1]))
            new.append(token)
            if token in self.eos or len(new) >= max_new_tokens:
                return new, np.stack(rows)
            logits, past = self.step([token], past, pos)
            pos += 1

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        new, _ = self.generate_ids(self.prompt_ids(prompt), max_new_tokens)
        return self.tokenizer.decode([t for t in new if t not in self.eos], skip_special_tokens=True).strip()

    def tokens_per_second(self, prompt: str, max_new_tokens: int = 32) -> float:
        ids = self.prompt_ids(prompt)
        t = time.perf_counter()
        new, _ = self.generate_ids(ids, max_new_tokens)
        return len(new) / (time.perf_counter() - t)
