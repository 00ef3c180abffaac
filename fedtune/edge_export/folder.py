"""Build the export folder next to its destination, then move it into place in one rename.

A failed export removes its staging folder, so ``--out`` is either the previous complete
export, or the new complete one, never something in between.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
    """A hidden folder beside ``out``; deleted if the block raises, published if not."""
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path) -> None:
    check_destination(out)  # it may have changed while we worked
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
