import numpy as np
import pytest

from fedtune.config import DataConfig, PartitionConfig
from fedtune.data import client_data, load_dataset, partition_indices
from fedtune.data.partition import train_pool
from fedtune.errors import ConfigError, DataError

DATA = DataConfig(train_size=2000)


def test_20newsgroups_is_the_real_split():
    ds = load_dataset(DataConfig())
    assert (len(ds.train), len(ds.test), ds.num_labels) == (11293, 7528, 20)
    assert ds.label_names[0] == "alt.atheism"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover(scheme):
    parts = partition_indices(DATA, PartitionConfig(partition=scheme, num_clients=5), 0)
    allrows = np.concatenate(parts)
    assert len(allrows) == len(set(allrows.tolist())) == 2000
    if scheme == "iid":
        assert {len(p) for p in parts} == {400}


def test_dirichlet_skews_labels_more_than_iid():
    pool = train_pool(DATA, 0)

    def skew(scheme, alpha=0.5):
        parts = partition_indices(DATA, PartitionConfig(partition=scheme, num_clients=5, dirichlet_alpha=alpha), 0)
        glob = np.bincount(pool.labels, minlength=20) / len(pool)
        # mean total-variation distance between each client's label mix and the global one
        return np.mean([0.5 * np.abs(np.bincount(pool.labels[p], minlength=20) / len(p) - glob).sum() for p in parts])

    assert skew("iid") < 0.1
    assert skew("dirichlet", 0.1) > skew("dirichlet", 10.0) > skew("iid")
    assert skew("dirichlet", 0.5) > 0.3


def test_natural_partition_by_topic_hierarchy():
    parts = partition_indices(DATA, PartitionConfig(partition="natural", num_clients=7), 0)
    pool = train_pool(DATA, 0)
    assert all(len({pool.groups[i] for i in p}) == 1 for p in parts)
    with pytest.raises(ConfigError, match="num-clients=10.*set num-clients=7"):
        partition_indices(DATA, PartitionConfig(partition="natural", num_clients=10), 0)


def test_partitioning_is_seeded():
    a = partition_indices(DATA, PartitionConfig(num_clients=4), 1)
    b = partition_indices(DataConfig(train_size=2000), PartitionConfig(num_clients=4), 1)
    c = partition_indices(DATA, PartitionConfig(num_clients=4), 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_client_sees_only_its_partition():
    part = PartitionConfig(num_clients=4)
    cd = client_data(DATA, part, 0, 2)
    rows = partition_indices(DATA, part, 0)[2]
    pool = train_pool(DATA, 0)
    mine = {pool.texts[i] for i in rows}
    assert set(cd.train.texts) | set(cd.val.texts) <= mine
    assert len(cd.train) + len(cd.val) == len(rows) and len(cd.val) == round(0.1 * len(rows))


def test_user_csv(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("text,label,split\n" + "".join(f"doc {i},{'ab'[i % 2]},{'test' if i < 4 else 'train'}\n" for i in range(20)))
    ds = load_dataset(DataConfig(dataset=str(f)))
    assert (len(ds.train), len(ds.test), ds.label_names) == (16, 4, ("a", "b"))
    with pytest.raises(DataError, match="no column 'body'"):
        load_dataset(DataConfig(dataset=str(f), text_column="body"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(dataset=str(tmp_path / "nope.csv")))

def test_client_rows_split_the_partition_as_client_data_does():
    """What the centralized ceiling trains on (every client's training rows) is what the clients
    train on: client_rows and client_data agree, and train + val cover the partition exactly."""
    from fedtune.data.partition import client_rows

    part = PartitionConfig(num_clients=4, val_fraction=0.25)
    pool = train_pool(DATA, 0)
    for c, rows in enumerate(partition_indices(DATA, part, 0)):
        train, val = client_rows(DATA, part, 0, c)
        assert sorted(np.concatenate([train, val]).tolist()) == sorted(rows.tolist())
        assert len(val) == round(0.25 * len(rows))
        assert client_data(DATA, part, 0, c).train.texts == pool.subset(train).texts
    with pytest.raises(ConfigError, match="bad client id 4"):
        client_rows(DATA, part, 0, 4)
