"""Sparse adapters: train a chosen subset of the base weights' entries (docs/sparse.md).

- ``layer``: SparseLinear / SparseModel (real gradient masking: only the trained values are parameters);
- ``select``: the selection rules (magnitude, random, ks), one registry;
- ``train``: a client's local run (choose the entries, train them, hand back indices + values).
"""
