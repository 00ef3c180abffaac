"""The chatterbot corpus: short human-written dialogs per language and topic.

The chatterbot-corpus wheel (Cox et al.; BSD) ships YAML files of conversations. We read its
data files through ``importlib.metadata`` (installed ``--no-deps``, data only; the package is
never imported). As a ``TextDataset`` a dialog is a JSON list of turns; its label and group
are its topic (``chatterbot``: English) or its language (``chatterbot-all``), so every
partitioner applies (iid, dirichlet over topics, natural = one client per topic/language).
"""

from __future__ import annotations

import json

import numpy as np

from fedtune.config import DataConfig
from fedtune.data.sources import SOURCES, Split, TextDataset, _wheel_file
from fedtune.errors import DataError

HINT = "pip install --no-deps chatterbot-corpus==1.3.3  (data files only)"
TEST_SEED = 12345  # the held-out conversations are the same for every run
TEST_FRACTION = 0.15


def _read_corpus(language: str | None) -> list[tuple[str, str, list[str]]]:
    """[(language, topic, turns)] of every conversation with at least one answer."""
    import yaml

    root = _wheel_file("chatterbot-corpus", "data/english/greetings.yml", HINT).parent.parent
    out = []
    for path in sorted(root.glob("*/*.yml")):
        lang = path.parent.name
        if language is not None and lang != language:
            continue
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # a damaged file of the corpus: skip it, the rest is usable
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()] if isinstance(conv, list) else []
            if len(turns) >= 2:
                out.append((lang, path.stem, turns[: len(turns) // 2 * 2]))
    if not out:
        raise DataError(f"no chatterbot conversations found in {root}")
    return out


def _dialog_dataset(name: str, language: str | None, group_by: int) -> TextDataset:
    rows = _read_corpus(language)
    groups = [r[group_by] for r in rows]
    names = tuple(sorted(set(groups)))
    ids = {n: i for i, n in enumerate(names)}
    full = Split(tuple(json.dumps(r[2], ensure_ascii=False) for r in rows),
                 np.array([ids[g] for g in groups], dtype=np.int64), tuple(groups))
    is_test = np.random.default_rng(TEST_SEED).random(len(rows)) < TEST_FRACTION
    return TextDataset(name, names, full.subset(np.flatnonzero(~is_test)), full.subset(np.flatnonzero(is_test)))


@SOURCES.register("chatterbot")
def _chatterbot_english(cfg: DataConfig) -> TextDataset:
    """English conversations; label and group = topic (ai, greetings, tech_support, ...)."""
    return _dialog_dataset("chatterbot", "english", group_by=1)


@SOURCES.register("chatterbot-all")
def _chatterbot_all(cfg: DataConfig) -> TextDataset:
    """Every language; label and group = language (partition=natural: one client per language)."""
    return _dialog_dataset("chatterbot-all", None, group_by=0)
