"""User-facing errors of export and edge inference (the CLI prints one line, exits 2)."""

from __future__ import annotations

from fedtune.errors import FedtuneError


class ExportError(FedtuneError):
    """A run directory or output folder that cannot be exported to or from."""


class ParityError(ExportError):
    """The ONNX model disagrees with the torch model beyond the allowed tolerance."""


class EdgeRuntimeError(FedtuneError):
    """An export folder or input the edge runtime cannot use."""
