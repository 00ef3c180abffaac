"""Text-classification data shared by server and clients: sources, partitions, batches."""

from fedtune.data.sources import TextDataset, load_dataset
from fedtune.data.partition import ClientData, client_data, partition_indices, train_sizes

import fedtune.llm.corpus  # noqa: E402,F401  registers the dialog corpora (chatterbot, chatterbot-all) in SOURCES

__all__ = ["TextDataset", "load_dataset", "ClientData", "client_data", "partition_indices", "train_sizes"]
