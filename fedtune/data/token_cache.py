"""An on-disk cache of tokenized splits, for benchmarks that rerun the same data many times.

Tokenizing 20 Newsgroups is not free: the fast tokenizer reads each whole post before
truncating, about 40 s for the training split and 16 s for the test split on one busy core,
and every run (every simulation actor, the server's test slice, the centralized baseline)
does it again. With ``FEDTUNE_TOKEN_CACHE=DIR`` set (bench/common.py sets it to
runs/token-cache), :func:`cached` keys each encoding by a hash of the tokenizer's identity,
``max_length`` and the texts and labels themselves, so a hit is exactly what tokenizing again
would give. Unset: nothing is cached.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV = "FEDTUNE_TOKEN_CACHE"


def cache_key(tokenizer, texts, labels: np.ndarray, max_length: int) -> str:
    h = hashlib.sha256()
    ident = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length,
             getattr(tokenizer, "truncation_side", ""))
    h.update(repr(ident).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:32]


Ids = tuple[tuple[np.ndarray, ...], np.ndarray]  # (token ids per text, labels)


def cached(tokenizer, texts, labels: np.ndarray, max_length: int, encode: Callable[[], Ids]) -> Ids:
    """(ids, labels) from the cache under $FEDTUNE_TOKEN_CACHE, else ``encode()`` (stored
    there when the variable is set; written atomically, so concurrent actors are safe)."""
    root = os.environ.get(ENV)
    if not root:
        return encode()
    path = Path(root) / f"{cache_key(tokenizer, texts, labels, max_length)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                flat, lengths, labs = z["ids"], z["lengths"], z["labels"]
            return tuple(np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1])) if len(lengths) else (), labs
        except (OSError, ValueError, KeyError):  # a damaged entry: tokenize again and overwrite it
            pass
    ids, labs = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    np.savez(tmp, ids=flat.astype(np.int32), lengths=np.array([len(x) for x in ids], dtype=np.int64), labels=labs)
    os.replace(tmp, path)
    return ids, labs
