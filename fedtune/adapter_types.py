"""Adapter types (``--set adapter=NAME``): moved to fedtune.adapter_kinds (the ``AdapterKind``
interface, issue 15); ``ADAPTERS`` is its registry, kept under the old name."""

from __future__ import annotations

from fedtune import catalog
from fedtune.adapter_kinds import KINDS as ADAPTERS  # noqa: F401

# The sparse selection rules (registered in fedtune.sparse.select, which needs torch): their
# names live in the catalog, which the config validates against.
SELECTIONS = catalog.SELECTIONS
