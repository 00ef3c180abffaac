"""Run configuration: frozen dataclasses, validated once at the boundary.

Keys are flat and hyphenated, as in Flower's run config (``--set lora-rank=4``); each
section's field ``lora_rank`` is the key ``lora-rank``. A config is built from a preset,
then a TOML file, then ``--set`` overrides, in that order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtune import catalog, compat, plugin_loader
from fedtune.errors import ConfigError
from fedtune.flat_keys import coerce, key_of
from fedtune.profile_specs import check as check_profiles, to_def


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"bad value {key}={value!r}: {why}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "20newsgroups"  # a registered name, or a path to a .csv/.tsv file
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = "group"  # the real attribute used by partition=natural
    test_fraction: float = 0.2  # only for files without a 'split' column
    max_length: int = 64  # tokens per example (20 Newsgroups posts: the first 64 carry most of the signal)
    train_size: int = 0  # 0 = the whole training split; else a seeded subset
    eval_size: int = 500  # server-side test examples per round; 0 = the whole test split

    def __post_init__(self) -> None:
        _require(0.0 < self.test_fraction < 1.0, "test-fraction", self.test_fraction, "must be in (0, 1)")
        _require(8 <= self.max_length <= 4096, "max-length", self.max_length, "must be in [8, 4096]")
        _require(self.train_size >= 0, "train-size", self.train_size, "must be >= 0")
        _require(self.eval_size >= 0, "eval-size", self.eval_size, "must be >= 0")


@dataclass(frozen=True)
class PartitionConfig:
    partition: str = "dirichlet"  # iid | dirichlet | natural
    num_clients: int = 10
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    val_fraction: float = 0.1  # each client's local held-out share, for client-side evaluation

    def __post_init__(self) -> None:
        _require(self.num_clients >= 1, "num-clients", self.num_clients, "must be >= 1")
        _require(self.dirichlet_alpha > 0, "dirichlet-alpha", self.dirichlet_alpha, "must be > 0")
        _require(self.min_partition_size >= 0, "min-partition-size", self.min_partition_size, "must be >= 0")
        _require(0.0 <= self.val_fraction < 1.0, "val-fraction", self.val_fraction, "must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "minilm"  # 'minilm' (bundled), 'minilm-2' (its first 2 layers), 'tiny' (built from a config), a HF id or a path
    adapter: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    use_rslora: bool = False  # scaling alpha/sqrt(r) (Kalajdzievski, 2023) instead of alpha/r
    lora_layers: int = 0  # adapters on the deepest N transformer layers only (LEGEND); 0 = all
    # adapter=sparse (fedtune/sparse, docs/sparse.md): trained share of each targeted weight's entries
    sparse_density: float = 0.01
    sparse_selection: str = "magnitude"  # magnitude (SpIEL) | random (PaCA, seeded) | ks (KS-Lottery)
    sparse_warmup: int = 4  # local batches (magnitude) / dense warm-up steps (ks) used to choose the entries
    sparse_keep: float = 0.0  # magnitude: share of the entries kept by |global delta| (prune-and-regrow)
    task: str = "classify"  # classify (sequence classifier + head) | causal-lm (fedtune/tasks.py)
    base_dtype: str = "float32"  # frozen base weights: float32 | bfloat16 | float16 (adapters stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)
    # devices and precision (fedtune/device.py, docs/gpu.md)
    device: str = "auto"  # auto (the CUDA device this process was given, else CPU) | cpu | cuda | cuda:N
    server_device: str = "auto"  # where the server evaluates the global model
    base_quant: str = "none"  # none | nf4 | int8: a frozen 4/8-bit base through bitsandbytes (QLoRA; CUDA only)
    cpu_autocast: str = "off"  # auto: bf16 autocast of the fp32 base's forward on CPUs with AMX/AVX512-BF16

    def __post_init__(self) -> None:
        _require(self.task in catalog.TASKS, "task", self.task, "must be classify or causal-lm")
        _require(self.base_dtype in catalog.BASE_DTYPES, "base-dtype", self.base_dtype,
                 "must be float32, bfloat16 or float16")
        _require(self.lora_rank >= 1, "lora-rank", self.lora_rank, "must be a positive integer")
        _require(self.lora_layers >= 0, "lora-layers", self.lora_layers, "must be >= 0 (0 = all layers)")
        _require(0.0 < self.lora_alpha <= 4096, "lora-alpha", self.lora_alpha, "must be in (0, 4096]")
        _require(0.0 <= self.lora_dropout < 1.0, "lora-dropout", self.lora_dropout, "must be in [0, 1)")
        _require(len(self.target_modules) > 0, "target-modules", self.target_modules, "must name at least one module")
        _require(self.adapter in catalog.ADAPTER_KINDS, "adapter", self.adapter,
                 f"must be one of {', '.join(sorted(catalog.ADAPTER_KINDS))}")
        _require(0.0 < self.sparse_density <= 1.0, "sparse-density", self.sparse_density, "must be in (0, 1]")
        _require(self.sparse_selection in catalog.SELECTIONS, "sparse-selection", self.sparse_selection,
                 f"must be one of {', '.join(catalog.SELECTIONS)}")
        _require(self.sparse_warmup >= 1, "sparse-warmup", self.sparse_warmup, "must be >= 1")
        _require(0.0 <= self.sparse_keep <= 1.0, "sparse-keep", self.sparse_keep, "must be in [0, 1]")
        catalog.check_device("device", self.device)
        catalog.check_device("server-device", self.server_device)
        _require(self.base_quant in catalog.BASE_QUANTS, "base-quant", self.base_quant, "must be none, nf4 or int8")
        _require(self.cpu_autocast in ("auto", "off"), "cpu-autocast", self.cpu_autocast, "must be auto or off")


HEAD_INIT_CHOICES = ("ncm", "ridge", "random")  # fedtune.head_init.HEAD_INITS, plus random (no query)
LOCAL_LOSS_CHOICES = ("ce", "logit-adjusted")  # ce, plus fedtune.training.LOGIT_OFFSETS


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 6  # optimizer steps per client per round (used when local-epochs = 0)
    local_epochs: float = 0.0  # > 0: passes over the local data instead of local-steps
    batch_size: int = 16
    lr: float = 2e-3  # AdamW learning rate of the adapter
    head_lr: float = 5e-3  # AdamW learning rate of the classification head
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up within each local run
    eval_batch_size: int = 64
    # before round 1: ridge = exact closed-form shrinkage-LDA head (Fed3R) | ncm = class centroids (FedNCM) | random
    head_init: str = "ridge"
    head_init_examples: int = 256  # per client, for the head's statistics
    head_logit_scale: float = 16.0  # ncm: logits = this x cosine-like scores (4 left the head under-confident: a dip)
    head_shrinkage: float | None = None  # ridge: weight of the identity in the shrunk covariance; unset = OAS
    head_ridge_scale: float = 0.3  # ridge: logits = this x the LDA log posterior (fitted LDA is over-confident)
    # the local training loss: ce (the task's own) | logit-adjusted = cross-entropy of logits + log(local
    # label prior) (Menon et al., ICLR 2021; FedLC, Zhang et al., ICML 2022): +1.1 points when clients hold
    # disjoint topics; on the default run -1.4 ± 1.7 and a round-1 dip (docs/benchmarks.md "accuracy-reading")
    local_loss: str = "ce"
    proximal_mu: float = 0.0  # > 0: FedProx's proximal term mu/2 ||w - w_global||^2 in local training
    prior_smoothing: float = 0.0  # logit-adjusted: weight of the uniform prior mixed into the local one (1 = ce)

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "local-steps", self.local_steps, "must be >= 1")
        _require(self.local_epochs >= 0, "local-epochs", self.local_epochs, "must be >= 0")
        _require(self.batch_size >= 1, "batch-size", self.batch_size, "must be >= 1")
        _require(0.0 < self.lr < 1.0, "lr", self.lr, "must be in (0, 1)")
        _require(0.0 < self.head_lr < 10.0, "head-lr", self.head_lr, "must be in (0, 10)")
        _require(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be >= 0")
        _require(self.warmup_steps >= 0, "warmup-steps", self.warmup_steps, "must be >= 0")
        _require(self.eval_batch_size >= 1, "eval-batch-size", self.eval_batch_size, "must be >= 1")
        _require(self.head_init in HEAD_INIT_CHOICES, "head-init", self.head_init,
                 f"must be one of {', '.join(HEAD_INIT_CHOICES)}")
        _require(self.head_init_examples >= 1, "head-init-examples", self.head_init_examples, "must be >= 1")
        _require(self.head_logit_scale > 0, "head-logit-scale", self.head_logit_scale, "must be > 0")
        _require(self.head_shrinkage is None or 0.0 <= self.head_shrinkage <= 1.0, "head-shrinkage",
                 self.head_shrinkage, "must be in [0, 1] (or unset: OAS)")
        _require(self.head_ridge_scale > 0, "head-ridge-scale", self.head_ridge_scale, "must be > 0")
        _require(self.local_loss in LOCAL_LOSS_CHOICES, "local-loss", self.local_loss,
                 f"must be one of {', '.join(LOCAL_LOSS_CHOICES)}")
        _require(self.proximal_mu >= 0, "proximal-mu", self.proximal_mu, "must be >= 0")
        _require(0.0 <= self.prior_smoothing <= 1.0, "prior-smoothing", self.prior_smoothing, "must be in [0, 1]")


WEIGHT_BOUNDS = catalog.WEIGHT_BOUNDS  # what the validate screen does with an example count above its bound


@dataclass(frozen=True)
class FederationConfig:
    strategy: str = "fedavg"
    rounds: int = 4
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.3
    min_train_nodes: int = 2
    server_lr: float = 1.0  # server optimiser step on the averaged update (FedOpt, Reddi et al., 2021)
    server_momentum: float = 0.9  # fedavgm's beta (Hsu et al., 2019); 0: FedAvg with a server-lr step
    seed: int = 0
    client_cpus: int = 2  # CPU cores per virtual client (Flower's client_resources.num_cpus)
    client_gpus: float = 0.0
    profiles: str = ""  # device profiles of the clients (fedtune/profiles.py): names, name:share, or auto
    profile_defs: tuple[str, ...] = ()  # the run's own profiles: "NAME lora-rank=4 layers=2 ..."
    # with several profiles, the model each one runs is evaluated on the test slice every N rounds
    # and at the last round (accuracy_rank_R in metrics.jsonl); 0 = at the last round only
    profile_eval_every: int = 1
    # where clients of a strategy with a personal part (fedsa's B) write client-<id>.safetensors
    # after each round, for ``fedtune export --client``; "" = nowhere (simulate: <run dir>/clients)
    client_state_dir: str = ""
    # update compression, client to server (fedtune/compression, docs/sparse.md)
    compression: str = "none"  # none | fp16 | int8 (per tensor) | int8-row (per row) | topk | dare
    topk_fraction: float = 0.01  # topk: share of each tensor's entries sent
    dare_p: float = 0.9  # dare: drop probability; kept entries are rescaled by 1/(1-p)
    error_feedback: bool = False  # clients add what compression lost to their next update
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies (and for nodes to connect)
    # bad updates (docs/robustness.md): a reply whose update norm is above this many times the
    # cohort's median is rejected; robust aggregation of the updates: none | norm-bound | median | trimmed-mean
    max_norm_ratio: float = 10.0
    robust: str = "none"
    robust_norm_bound: float = 1.0  # norm-bound: each update's L2 norm is clipped to this
    trim_fraction: float = 0.1  # trimmed-mean: share of the largest and of the smallest values dropped per coordinate
    ray_address: str = ""  # simulate: "" = a local Ray instance; "auto" or HOST:PORT = an existing Ray cluster
    # lying clients (docs/robustness.md): a stated example count above this many times the cohort's median (and,
    # in simulation, above the client's partition size) is clipped to the bound or the reply rejected
    max_weight_ratio: float = 10.0
    weight_bound: str = "clip"  # clip | reject
    # secure aggregation on Flower's SecAgg+ (fedtune/server/secagg.py, docs/privacy.md): none | secagg+
    secure_aggregation: str = "none"
    secagg_shares: float = 1.0  # shares of each client's keys: <= 1 a share of the sampled clients, > 1 a count
    secagg_threshold: float = 0.67  # shares needed to reconstruct: < 1 a share of secagg-shares, >= 2 a count
    secagg_clipping_range: float = 8.0  # values are clipped to [-R, R] before quantization
    secagg_quantization_range: int = 4194304  # 2**22 quantization levels
    secagg_max_weight: float = 1000.0  # the largest weight (example count) a client may state; bounded before masking
    # user modules imported before the config is checked: they register strategies, datasets, models or
    # adapter kinds (fedtune/plugins.py, docs/api.md); installed packages' `fedtune.plugins` entry points load too
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        catalog.check_name("strategy", self.strategy, tuple(catalog.STRATEGIES))
        _require(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, "fraction-train", self.fraction_train, "must be in (0, 1]")
        _require(0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        _require(self.min_train_nodes >= 1, "min-train-nodes", self.min_train_nodes, "must be >= 1")
        _require(self.profile_eval_every >= 0, "profile-eval-every", self.profile_eval_every, "must be >= 0")
        _require(self.server_lr > 0, "server-lr", self.server_lr, "must be > 0")
        _require(0.0 <= self.server_momentum < 1.0, "server-momentum", self.server_momentum, "must be in [0, 1)")
        _require(self.client_cpus >= 1, "client-cpus", self.client_cpus, "must be >= 1")
        _require(self.client_gpus >= 0, "client-gpus", self.client_gpus, "must be >= 0")
        _require(self.round_timeout > 0 and math.isfinite(self.round_timeout), "round-timeout", self.round_timeout,
                 "must be > 0 seconds")
        _require(self.max_norm_ratio > 1, "max-norm-ratio", self.max_norm_ratio, "must be > 1 (inf: no norm check)")
        _require(self.robust_norm_bound > 0 and math.isfinite(self.robust_norm_bound), "robust-norm-bound",
                 self.robust_norm_bound, "must be > 0")
        _require(0.0 <= self.trim_fraction < 0.5, "trim-fraction", self.trim_fraction, "must be in [0, 0.5)")
        _require(self.max_weight_ratio > 1, "max-weight-ratio", self.max_weight_ratio,
                 "must be > 1 (inf: no cohort bound)")
        _require(self.weight_bound in WEIGHT_BOUNDS, "weight-bound", self.weight_bound,
                 f"must be one of {', '.join(WEIGHT_BOUNDS)}")
        _require(self.secure_aggregation in catalog.SECURE_AGGREGATIONS, "secure-aggregation", self.secure_aggregation,
                 "must be none or secagg+")
        _require(self.secagg_shares > 0, "secagg-shares", self.secagg_shares, "must be > 0")
        _require(self.secagg_threshold > 0 and not 1 <= self.secagg_threshold < 2, "secagg-threshold",
                 self.secagg_threshold, "must be a share in (0, 1) or a count >= 2")
        _require(self.secagg_clipping_range > 0, "secagg-clipping-range", self.secagg_clipping_range, "must be > 0")
        _require(2 <= self.secagg_quantization_range < 2**32, "secagg-quantization-range",
                 self.secagg_quantization_range, "must be in [2, 2**32)")
        _require(self.secagg_max_weight > 0, "secagg-max-weight", self.secagg_max_weight, "must be > 0")
        check_profiles(self.profiles, self.profile_defs)
        compat.check_robust(self)
        _require(self.compression in catalog.CODECS, "compression", self.compression,
                 f"must be one of {', '.join(catalog.CODECS)}")
        _require(0.0 < self.topk_fraction <= 1.0, "topk-fraction", self.topk_fraction, "must be in (0, 1]")
        _require(0.0 <= self.dare_p < 1.0, "dare-p", self.dare_p, "must be in [0, 1)")


DP_MODES = catalog.DP_MODES


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of the federation (docs/privacy.md). ``dp``: none | sample (DP-SGD
    on each client, per-client accountant) | client-fixed / client-adaptive (Flower's DP
    strategy wrappers, fixed or adaptive clipping of whole updates, a server accountant)."""

    dp: str = "none"
    target_epsilon: float | None = None  # the whole budget (all rounds); exactly one of this and noise-multiplier
    noise_multiplier: float | None = None  # sigma (sample: per DP-SGD step; client-*: per round, on the sum)
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv
    max_grad_norm: float = 1.0  # dp=sample: per-example clipping bound
    dp_state_dir: str = ""  # dp=sample: where each client keeps its accountant (node config state-dir wins)
    dp_head_share: float = 0.8  # dp=sample + head-init=ncm: the head release alone spends this share of target-epsilon
    clip_norm: float = 1.0  # client-*: L2 bound of one client's update (adaptive: the initial bound)
    dp_clipping: str = "server"  # client-*: clip updates on the server or on the clients (Flower mod)
    target_clipped_quantile: float = 0.5  # client-adaptive
    clip_norm_lr: float = 0.2  # client-adaptive
    clipped_count_stddev: float = 0.0  # client-adaptive; 0 = Flower's default, sampled clients / 20
    # empirical privacy audit (Andrew et al., ICLR 2024; docs/privacy.md): K canary clients; 0 = off
    audit_canaries: int = 0

    def __post_init__(self) -> None:
        _require(self.dp in DP_MODES, "dp", self.dp, f"must be one of {', '.join(DP_MODES)}")
        for key, value in (("target-epsilon", self.target_epsilon), ("noise-multiplier", self.noise_multiplier)):
            _require(self.dp != "none" or value is None, key, value,
                     "only used with dp=sample|client-fixed|client-adaptive")
        if self.dp != "none":
            _require((self.target_epsilon is None) != (self.noise_multiplier is None), "dp", self.dp,
                     "set exactly one of target-epsilon (a budget) and noise-multiplier (a fixed sigma)")
            self.sample_dp()  # exactly one of target-epsilon / noise-multiplier; delta, accountant, max-grad-norm
        _require(0.0 < self.dp_head_share < 1.0, "dp-head-share", self.dp_head_share, "must be in (0, 1)")
        _require(self.clip_norm > 0 and math.isfinite(self.clip_norm), "clip-norm", self.clip_norm, "must be > 0")
        _require(self.dp_clipping in ("server", "client"), "dp-clipping", self.dp_clipping, "must be server or client")
        _require(0.0 <= self.target_clipped_quantile <= 1.0, "target-clipped-quantile", self.target_clipped_quantile,
                 "must be in [0, 1]")
        _require(self.clip_norm_lr > 0, "clip-norm-lr", self.clip_norm_lr, "must be > 0")
        _require(self.clipped_count_stddev >= 0, "clipped-count-stddev", self.clipped_count_stddev, "must be >= 0")
        _require(self.audit_canaries >= 0, "audit-canaries", self.audit_canaries, "must be >= 0 (0: no audit)")

    @property
    def client_level(self) -> bool:
        return self.dp in ("client-fixed", "client-adaptive")

    def sample_dp(self) -> DPConfig:
        """The budget, noise and accountant settings as the DP building blocks take them."""
        return DPConfig(target_epsilon=self.target_epsilon, delta=self.delta, noise_multiplier=self.noise_multiplier,
                        max_grad_norm=self.max_grad_norm, accountant=self.accountant)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD settings for one client's local training (PrivacyConfig.sample_dp()).
    Exactly one of ``target_epsilon`` (the noise is calibrated over the whole federation
    plan, and the client stops once the budget is spent) and ``noise_multiplier`` (a fixed
    sigma; epsilon is only reported, nothing stops) must be set."""

    target_epsilon: float | None = None  # total (epsilon, delta) budget of one client over all rounds
    delta: float = 1e-5  # should be well below 1 / (examples on the client)
    noise_multiplier: float | None = None  # sigma: noise std / max-grad-norm; 0 = clipping only, no privacy
    max_grad_norm: float = 1.0  # per-example L2 clipping bound C over all trainable (adapter + head) tensors
    accountant: str = "rdp"  # rdp | prv

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError(
                f"bad value target-epsilon={self.target_epsilon!r}, noise-multiplier={self.noise_multiplier!r}: "
                "set exactly one of the two"
            )
        if self.target_epsilon is not None:
            _require(_is_number(self.target_epsilon) and self.target_epsilon > 0,
                     "target-epsilon", self.target_epsilon, "must be a finite number > 0")
        if self.noise_multiplier is not None:
            _require(_is_number(self.noise_multiplier) and self.noise_multiplier >= 0,
                     "noise-multiplier", self.noise_multiplier, "must be a finite number >= 0")
        _require(_is_number(self.delta) and 0.0 < self.delta < 1.0, "delta", self.delta, "must be in (0, 1)")
        _require(_is_number(self.max_grad_norm) and self.max_grad_norm > 0,
                 "max-grad-norm", self.max_grad_norm, "must be a finite number > 0")
        catalog.check_name("privacy accountant", self.accountant, catalog.ACCOUNTANTS)  # as the registry says it


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        compat.check_run(self)  # every cross-section rule (fedtune/compat.py): refuse what does not compose

    # -- flat views -------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """{'lora-rank': 8, ...}: the form written to config.toml/json and sent to clients."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                out[_key(f.name)] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """The flat keys as JSON (config.json, and every message's ``fedtune-config``); ``plugins``
        only when the run has some, so runs without plugins carry exactly the keys they did before."""
        flat = self.to_flat()
        if not flat.get("plugins"):
            flat.pop("plugins", None)
        return json.dumps(flat, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return build_config(overrides=json.loads(text))

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with some flat keys changed, validated like any other input."""
        return build_config(base=self, overrides=flat)


SECTIONS = ("data", "partition", "model", "train", "federation", "privacy")


_key = key_of


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in SECTIONS:
        cls = RunConfig.__dataclass_fields__[section].default_factory  # type: ignore[misc]
        for f in fields(cls):
            assert _key(f.name) not in index, f"config key {f.name} defined twice"
            index[_key(f.name)] = (section, f)
    return index


FIELDS = _field_index()


def _coerce(key: str, raw: Any, f: dataclasses.Field) -> Any:
    """Turn a TOML/JSON value or a --set string into the field's type (fedtune.flat_keys)."""
    try:
        return coerce(raw, f.type)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {key}={raw!r}: expected {f.type.removesuffix(' | None')}") from None


def build_config(
    overrides: dict[str, Any] | None = None, base: RunConfig | None = None
) -> RunConfig:
    """Apply flat overrides to ``base`` (default: the built-in defaults) and validate."""
    base = base or RunConfig()
    _load_plugins(overrides or {}, base)
    changes: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, raw in (overrides or {}).items():
        norm = key.replace("_", "-")
        if norm not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(FIELDS))}")
        section, f = FIELDS[norm]
        changes[section][f.name] = _coerce(norm, raw, f)
    parts = {s: dataclasses.replace(getattr(base, s), **changes[s]) for s in SECTIONS}
    return RunConfig(**parts)


def _load_plugins(overrides: dict[str, Any], base: RunConfig) -> None:
    """Import the run's plugin modules (and installed ``fedtune.plugins`` entry points) before any
    name is checked: they add names to the catalog (fedtune/plugin_loader.py; no torch unless a plugin imports it)."""
    raw = next((v for k, v in overrides.items() if k.replace("_", "-") == "plugins"), None)
    names = base.federation.plugins if raw is None else _coerce("plugins", raw, FIELDS["plugins"][1])
    plugin_loader.load(names)


def parse_set(items: list[str]) -> dict[str, str]:
    """['rounds=3', 'lr=1e-3'] -> {'rounds': '3', 'lr': '1e-3'}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Flat keys at the top level; [sections] are accepted and flattened, except
    ``[profiles.NAME]`` tables, which define device profiles (``profile-defs``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "profiles" and isinstance(value, dict):
            flat["profile-defs"] = [to_def(n, t) for n, t in value.items() if isinstance(t, dict)]
            flat.update({k: v for k, v in value.items() if not isinstance(v, dict)})
        elif isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat
