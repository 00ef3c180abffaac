"""What a client process keeps between rounds: the model (built once) and its own encoded
data. Simulation actors and deployed SuperNodes both reuse a worker across messages."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedtune.config import DataConfig, PartitionConfig, RunConfig
from fedtune.data import client_data, load_dataset
from fedtune.device import cap_memory, placement_of
from fedtune.modeling import load_tokenizer, shared_model
from fedtune.tasks import TASKS
from fedtune.training import Encoded


@dataclass(frozen=True)
class LocalData:
    train: Encoded
    val: Encoded


@functools.lru_cache(maxsize=64)
def _data(data: DataConfig, part: PartitionConfig, model_name: str, seed: int, client: int,
          task: str = "classify") -> LocalData:
    tok = load_tokenizer(model_name)
    cd = client_data(data, part, seed, client)
    enc = TASKS.get(task).encode  # classify: training.encode; causal-lm: chat template, answer-only labels
    return LocalData(enc(tok, cd.train, data.max_length), enc(tok, cd.val, data.max_length))


@dataclass
class Worker:
    model: nn.Module
    data: LocalData
    pad_id: int
    initial: dict[str, Tensor] = field(default_factory=dict)  # the adapter and head as built (a fresh adapter)


def get_worker(cfg: RunConfig, client: int) -> Worker:
    torch.set_num_threads(cfg.federation.client_cpus)
    num_labels = load_dataset(cfg.data).num_labels
    shared = shared_model(cfg.model, num_labels, cfg.federation.seed)
    cap_memory(cfg.federation.client_gpus, placement_of(shared.model).device)  # the share as a hard cap
    data = _data(cfg.data, cfg.partition, cfg.model.model, cfg.federation.seed, client, cfg.model.task)
    return Worker(shared.model, data, load_tokenizer(cfg.model.model).pad_token_id or 0, shared.initial)
