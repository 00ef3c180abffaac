"""Which sparse-adapter and compression settings compose with the rest of a run: the rules
live in fedtune.compat (checked once by RunConfig); this module keeps their old names."""

from fedtune.catalog import SHAPELESS  # noqa: F401 - codecs that need the shape of what the server sent
from fedtune.compat import check_compression  # noqa: F401
