"""Split the training set across clients with flwr-datasets partitioners.

``iid`` (IidPartitioner), ``dirichlet`` (DirichletPartitioner over labels, Hsu et al., 2019)
and ``natural`` (NaturalIdPartitioner over the dataset's real group attribute) all run over
an in-memory ``datasets.Dataset`` of row ids, so a client materialises only its own rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedtune.config import DataConfig, PartitionConfig
from fedtune.data.sources import Split, TextDataset, load_dataset
from fedtune.errors import ConfigError
from fedtune.registry import Registry

PARTITIONERS: Registry[Callable] = Registry("partition")


@PARTITIONERS.register("iid")
def _iid(cfg: PartitionConfig, seed: int):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=cfg.num_clients)


@PARTITIONERS.register("dirichlet")
def _dirichlet(cfg: PartitionConfig, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=cfg.num_clients,
        partition_by="label",
        alpha=cfg.dirichlet_alpha,
        min_partition_size=cfg.min_partition_size,
        self_balancing=False,
        seed=seed,
    )


@PARTITIONERS.register("natural")
def _natural(cfg: PartitionConfig, seed: int):
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="group")


def train_pool(data: DataConfig, seed: int) -> Split:
    """The training split, or its seeded subset of ``train-size`` rows."""
    ds = load_dataset(data)
    if data.train_size and data.train_size < len(ds.train):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds.train), data.train_size, replace=False))
        return ds.train.subset(idx)
    return ds.train


@functools.lru_cache(maxsize=4)
def partition_indices(data: DataConfig, part: PartitionConfig, seed: int) -> tuple[np.ndarray, ...]:
    """Row ids of ``train_pool`` for each client, in client order."""
    import datasets

    pool = train_pool(data, seed)
    table = datasets.Dataset.from_dict(
        {"row": np.arange(len(pool)), "label": pool.labels, "group": list(pool.groups)}
    ).shuffle(seed=seed)  # as FederatedDataset does: partitioners take contiguous shards
    partitioner = PARTITIONERS.get(part.partition)(part, seed)
    partitioner.dataset = table
    n = partitioner.num_partitions
    if n != part.num_clients:
        raise ConfigError(
            f"bad value num-clients={part.num_clients}: partition={part.partition} gives {n} clients "
            f"(one per distinct {data.group_column!r}); set num-clients={n}"
        )
    return tuple(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n))


def train_sizes(data: DataConfig, part: PartitionConfig, seed: int) -> tuple[int, ...]:
    """Each client's number of training examples (its partition less the local validation
    share, as ``client_data`` splits it): the most examples a client of this run can state."""
    return tuple(len(rows) - int(round(len(rows) * part.val_fraction))
                 for rows in partition_indices(data, part, seed))


@dataclass(frozen=True)
class ClientData:
    """One client's private data: its training rows and a local validation share."""

    train: Split
    val: Split
    label_names: tuple[str, ...]


def client_rows(data: DataConfig, part: PartitionConfig, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``train_pool`` that ``client`` holds, in its local
    (seeded, shuffled) order: the validation share is the first ``val-fraction`` of them."""
    if not 0 <= client < part.num_clients:
        raise ConfigError(f"bad client id {client}: must be in [0, {part.num_clients})")
    rows = partition_indices(data, part, seed)[client]
    rows = np.random.default_rng([seed, client]).permutation(rows)
    n_val = int(round(len(rows) * part.val_fraction))
    return rows[n_val:], rows[:n_val]


def client_data(data: DataConfig, part: PartitionConfig, seed: int, client: int) -> ClientData:
    train, val = client_rows(data, part, seed, client)
    pool = train_pool(data, seed)
    ds: TextDataset = load_dataset(data)
    return ClientData(pool.subset(train), pool.subset(val), ds.label_names)
