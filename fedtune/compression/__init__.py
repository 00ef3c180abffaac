"""Update compression (client to server) and the wire format of sparse updates.

- ``codecs``: per-tensor codecs as pure functions (fp16, int8, int8-row, topk, dare);
- ``sparse_wire``: a whole update <-> the encoded ArrayRecord (sparse layers as indices +
  values, or values alone for seeded masks), with decoding that validates everything;
- ``client``: the train reply's encoding, with optional error feedback in ``context.state``;
- ``screen``: the server's ``decode`` reply screen (before ``validate``);
- ``rules``: which combinations a config may ask for.

See docs/sparse.md. This module stays import-light (config validation reads ``CODECS``).
"""

from fedtune.catalog import CODECS  # noqa: F401 - the codec names (tests/test_layering.py keeps them in sync)
