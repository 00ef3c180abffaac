"""Everything in an export folder besides the ONNX files: tokenizer and label names."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.layout import LABELS, TOKENIZER


def write_tokenizer(model_name: str, max_length: int, folder: Path) -> Path:
    """The run's tokenizer as tokenizer.json, set to truncate at the run's max_length and
    pad each batch to its longest text: the edge runtime needs no other settings."""
    from tokenizers import Tokenizer

    from fedtune.modeling import load_tokenizer

    hf = load_tokenizer(model_name)
    hf.save_pretrained(str(folder))
    path = folder / TOKENIZER
    if not path.is_file():
        raise ExportError(f"the tokenizer of {model_name!r} has no {TOKENIZER}: the edge runtime needs a fast one")
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=hf.pad_token_id or 0, pad_token=hf.pad_token or "[PAD]")
    tok.save(str(path))
    return path


def write_labels(labels: list[str], folder: Path) -> Path:
    path = folder / LABELS
    path.write_text(json.dumps(labels, indent=1), encoding="utf-8")
    return path
