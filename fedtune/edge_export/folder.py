"""Build the export folder next to its destination, then move it into place in one rename
(``fedtune.artifacts.staged_folder``, the one folder publish of fedtune).

A failed export removes its staging folder, so ``--out`` is either the previous complete
export, or the new complete one, never something in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fedtune.artifacts import staged_folder
from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.layout import REPORT


def check_destination(out: Path) -> None:
    """``out`` may be new, an empty folder, or a previous export (which gets replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not (out / REPORT).is_file():
        raise ExportError(f"{out} exists and is not an export folder; choose another --out")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out``; deleted if the block raises, published if not (``out``
    is checked again first: it may have changed while we worked)."""
    check_destination(out)
    with staged_folder(out, check_destination) as tmp:
        yield tmp
