"""Every cross-section rule of a run: which combinations are refused, and why.

Cheap and torch-free: it reads a config (``fedtune.config``, only as a type) and the catalog
of names and capabilities (``fedtune.catalog``, strategy flags included). ``RunConfig``
calls :func:`check_run` once, wherever a config is built; ``FederationConfig`` calls
:func:`check_robust`. Checks that need the noise calibrated or the partitions built run in
:func:`fedtune.privacy.federation.preflight`. Each refusal is a one-line ConfigError.

Privacy (docs/privacy.md):

- any ``dp`` with ``head-init=ridge`` (the closed-form head's feature second moment is not
  privatised); client-level ``dp`` with ``head-init=ncm``: the FedNCM head is built from per-class feature
  sums of the clients' private examples, outside the clipped and noised updates (under
  ``dp=sample`` the head is released with its own Gaussian noise and accounted:
  :mod:`fedtune.privacy.head`);
- ``dp=client-*`` with a strategy whose ``client_dp`` flag is off (all but ``fedavg``): Flower's
  wrappers calibrate the noise to a *uniform mean of clipped updates*; FedAvgM/FedAdam apply
  their server optimiser to the un-noised mean inside the wrapper, and rank-heterogeneous
  strategies do not aggregate whole ArrayRecords of one shape (so ``profiles`` is refused too);
- ``dp=sample`` with ``adapter=sparse`` and a data-dependent ``sparse-selection``
  (``magnitude``, ``ks``): the mask itself is computed from private data without noise;
- ``audit-canaries`` with ``dp=sample``, a strategy other than ``fedavg``, ``profiles``, or
  ``adapter=sparse``: a canary is modelled as one more update in a mean of whole updates;
- ``secure-aggregation=secagg+`` wherever the server step needs more than the weighted sum of
  the replies (a strategy's ``secagg`` flag says why; robust aggregation; profiles; any
  compression; any head statistics (ncm, ridge); client-level DP with server-side clipping).

Adapter kinds read their catalog flags (``fedtune.catalog.AdapterKindInfo``), never their names:

- an adapter with a strategy that lacks the flag the kind names (``strategies``): ``sparse``
  needs ``sparse`` (fedavg's mask-aware mean); ``""`` (LoRA) takes every strategy;
- ``profiles`` with a kind without the ``profiles`` flag; ``base-quant`` with a kind whose
  ``base_quant`` says why not; ``dp=sample`` with a kind whose ``sample_dp`` says why not;
- client-level DP and canaries need ``uniform_mean``.

Sparse adapters (``reply=entries``) and compression (docs/sparse.md):

- ``adapter=sparse`` with ``topk`` / ``dare`` (the update is already sparse);
- ``topk`` / ``dare`` with strategies whose clients train tensors the server did not send;
- compression or a sparse adapter with ``dp-clipping=client`` (the mod would clip encoded bytes);
- a sparse adapter with client-level DP (noise calibrated to a uniform mean).

Robust aggregation (docs/robustness.md): only strategies with the ``robust`` flag, clients of
one adapter shape; not with client-level DP (checked when the strategy is built).

Tasks and models: FedNCM heads need a classifier; a quantized base takes LoRA only;
gradient checkpointing does not compose with dp=sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.catalog import ROBUST, SHAPELESS, STRATEGIES, adapter_kind, strategies_where
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import FederationConfig, RunConfig

CLIENT_LEVEL_STRATEGIES = strategies_where("client_dp")  # ("fedavg",)
SECAGG_STRATEGIES = strategies_where("secagg")  # the server step needs only the weighted sum
ROBUST_STRATEGIES = strategies_where("robust")  # a mean of same-shape updates
SPARSE_STRATEGIES = strategies_where("sparse")  # the mask-aware mean


def adapter_strategies(adapter: str) -> tuple[str, ...]:
    """The strategies that aggregate adapter kind ``adapter`` (its catalog flag ``strategies``)."""
    flag = adapter_kind(adapter).strategies
    return tuple(STRATEGIES) if not flag else strategies_where(flag)


def num_sampled_clients(cfg: RunConfig) -> int:
    """Clients Flower's FedAvg samples per training round (its own formula), i.e. the ``m``
    the client-level noise is divided by."""
    n, fed = cfg.partition.num_clients, cfg.federation
    return max(int(n * fed.fraction_train), min(fed.min_train_nodes, n))


# -- federation section ------------------------------------------------------------------
def check_robust(fed: FederationConfig) -> None:
    """Refuse a robust mode with a strategy it does not apply to."""
    if fed.robust not in ROBUST:
        raise ConfigError(f"bad value robust={fed.robust!r}: must be one of {', '.join(sorted(ROBUST))}")
    if fed.robust == "none":
        return
    if fed.strategy not in ROBUST_STRATEGIES or fed.profiles.strip():
        raise ConfigError(f"bad value robust={fed.robust}: robust aggregation needs clients of one adapter shape "
                          f"and one of strategy={'|'.join(ROBUST_STRATEGIES)} (got strategy={fed.strategy}"
                          f"{', profiles=' + fed.profiles if fed.profiles.strip() else ''})")


def check_robust_dp(cfg: RunConfig) -> None:
    """Robust aggregation with client-level DP (checked when the strategy is built)."""
    if cfg.federation.robust != "none" and cfg.privacy.client_level:
        raise ConfigError(f"bad value robust={cfg.federation.robust}: client-level DP calibrates its noise to the "
                          f"mean of clipped updates; it does not compose with robust aggregation")


# -- privacy ----------------------------------------------------------------------------
def check_audit(cfg: RunConfig) -> None:
    """Where the one-shot canary audit (``audit-canaries``) measures what it claims to."""
    p = cfg.privacy
    if not p.audit_canaries:
        return
    why = None
    if p.dp == "sample":
        why = ("with dp=sample: canary clients measure client-level privacy, DP-SGD's guarantee is per example "
               "(see docs/privacy.md); use dp=client-fixed|client-adaptive or dp=none")
    elif cfg.federation.strategy != "fedavg":
        why = f"with strategy={cfg.federation.strategy!r}: a canary is modelled as one more update in a plain mean"
    elif not adapter_kind(cfg.model.adapter).uniform_mean or getattr(cfg.federation, "profiles", ""):
        why = (f"with adapter={cfg.model.adapter} or profiles: a canary is modelled as one more whole update "
               "of one shape")
    if why:
        raise ConfigError(f"bad value audit-canaries={p.audit_canaries} {why}")


def check_secagg(cfg: RunConfig) -> None:
    """Where ``secure-aggregation=secagg+`` (Flower's SecAgg+, fedtune.server.secagg) composes:
    only where the server step needs nothing but the weighted sum of the replies."""
    fed = cfg.federation
    if fed.secure_aggregation == "none":
        return
    key = f"bad value secure-aggregation={fed.secure_aggregation!r}"
    why = None
    if fed.strategy not in SECAGG_STRATEGIES:
        info = STRATEGIES.get(fed.strategy)
        reason = info.secagg if info else "it needs more than the weighted sum of the updates"
        why = f"with strategy={fed.strategy!r}: {reason}; use one of {', '.join(SECAGG_STRATEGIES)}"
    elif fed.robust != "none":
        why = f"with robust={fed.robust!r}: it screens individual updates, which the server no longer sees"
    elif getattr(fed, "profiles", ""):
        why = f"with profiles={fed.profiles!r}: clients of several ranks send arrays of different shapes"
    elif fed.strategy not in adapter_strategies(cfg.model.adapter):
        why = (f"with adapter={cfg.model.adapter!r} and strategy={fed.strategy!r}: {cfg.model.adapter} adapters "
               f"aggregate with {', '.join(adapter_strategies(cfg.model.adapter))}")
    elif fed.compression != "none":
        why = f"with compression={fed.compression!r}: SecAgg+ quantizes the dense update itself"
    elif cfg.train.head_init != "random":
        why = (f"with head-init={cfg.train.head_init!r}: each client's head statistics (class sums; for ridge also "
               "its feature second moment) would be sent in the clear; set head-init=random")
    elif cfg.privacy.client_level and cfg.privacy.dp_clipping != "client":
        why = (f"with dp={cfg.privacy.dp} and dp-clipping=server: the server cannot clip updates it never sees; "
               "set dp-clipping=client")
    if why:
        raise ConfigError(f"{key} {why}")


def check_composition(cfg: RunConfig) -> None:
    """The privacy rules: refuse what would break a guarantee."""
    p = cfg.privacy
    check_audit(cfg)
    check_secagg(cfg)
    if p.dp == "none":
        return
    if cfg.train.head_init == "ridge":
        raise ConfigError(
            f"bad value head-init='ridge' with dp={p.dp}: the closed-form head needs each client's feature "
            "second moment, which is released without noise; use head-init=ncm (dp=sample privatises it) or random"
        )
    if cfg.train.head_init == "ncm" and p.client_level:
        raise ConfigError(
            f"bad value head-init='ncm' with dp={p.dp}: the FedNCM class centroids would be released outside "
            "the clipped, noised client updates; set head-init=random (or use dp=sample, which privatises them)"
        )
    selection, kind = cfg.model.sparse_selection, adapter_kind(cfg.model.adapter)
    if p.dp == "sample" and kind.sample_dp:
        raise ConfigError(f"bad value adapter={kind.name!r} with dp=sample: {kind.sample_dp}")
    if p.dp == "sample" and kind.reply == "entries" and selection != "random":
        raise ConfigError(
            f"bad value sparse-selection={selection!r} with dp=sample: {selection} chooses the trained entries "
            "from the client's private data (gradients / a warm-up), and that choice is not privatised; "
            "use sparse-selection=random (seeded, data-independent)"
        )
    profiles = getattr(cfg.federation, "profiles", "")
    if p.client_level and profiles:
        raise ConfigError(
            f"bad value profiles={profiles!r} with dp={p.dp}: client-level DP clips and averages whole updates "
            "of one shape; clients of several adapter profiles are not supported"
        )
    if p.client_level and cfg.federation.strategy not in CLIENT_LEVEL_STRATEGIES:
        raise ConfigError(
            f"bad value strategy={cfg.federation.strategy!r} with dp={p.dp}: client-level DP noise is calibrated "
            f"to a uniform mean of clipped updates; use strategy={' or '.join(CLIENT_LEVEL_STRATEGIES)}"
        )


# -- sparse adapters and compression -------------------------------------------------------
def check_compression(cfg: RunConfig) -> None:
    fed, model, dp = cfg.federation, cfg.model, cfg.privacy
    kind = adapter_kind(model.adapter)
    if fed.strategy not in adapter_strategies(model.adapter):
        how = "fedavg's mask-aware mean" if kind.aggregation == "mask-aware" else "a mean of whole states"
        raise ConfigError(f"bad value strategy={fed.strategy!r} with adapter={model.adapter}: {model.adapter} "
                          f"updates are aggregated by {how}; use strategy="
                          f"{' or '.join(adapter_strategies(model.adapter))}")
    if kind.reply == "entries" and fed.compression in SHAPELESS:
        raise ConfigError(f"bad value compression={fed.compression!r} with adapter={model.adapter}: the update is "
                          "already sparse; use compression=none, fp16, int8 or int8-row")
    if not kind.uniform_mean and dp.client_level:
        raise ConfigError(f"bad value adapter={model.adapter!r} with dp={dp.dp}: client-level DP noise is calibrated "
                          f"to a uniform mean of clipped updates, not a {kind.aggregation} mean")
    if not kind.profiles and getattr(fed, "profiles", "").strip():
        raise ConfigError(f"bad value profiles={fed.profiles!r} with adapter={model.adapter}: {model.adapter} "
                          "adapters have no rank or layer set to differ by; every client trains the same tensors")
    info = STRATEGIES.get(fed.strategy)
    if fed.compression in SHAPELESS and info is not None and not info.shapeless_codecs:
        raise ConfigError(f"bad value compression={fed.compression!r} with strategy={fed.strategy}: its clients "
                          "train tensors the server did not send; use compression=fp16, int8 or int8-row")
    if (fed.compression != "none" or kind.reply == "entries") and dp.client_level and dp.dp_clipping == "client":
        raise ConfigError(f"bad value dp-clipping='client' with compression={fed.compression}: the client mod "
                          "would clip the encoded reply; use dp-clipping=server")


# -- tasks and models ----------------------------------------------------------------------
def check_task(cfg: RunConfig) -> None:
    """What a task or a base cannot do (FedNCM heads for causal LMs, ...)."""
    m = cfg.model
    if m.task == "causal-lm" and cfg.train.head_init != "random":
        raise ConfigError(f"bad value head-init={cfg.train.head_init!r}: a causal LM has no classification head; "
                          "set head-init=random with task=causal-lm (the llm preset does)")
    if m.task == "causal-lm" and cfg.train.local_loss == "logit-adjusted":
        raise ConfigError(f"bad value local-loss={cfg.train.local_loss!r}: a causal LM has no label prior to "
                          "adjust its logits by; use local-loss=ce with task=causal-lm")
    if cfg.train.local_loss == "logit-adjusted" and cfg.privacy.dp == "sample":
        raise ConfigError(f"bad value local-loss={cfg.train.local_loss!r} with dp=sample: the local label prior "
                          "makes every example's loss depend on the others, which per-example clipping does not "
                          "bound; use local-loss=ce (client-level dp takes it)")
    if cfg.train.prior_smoothing > 0 and cfg.train.local_loss == "ce":
        raise ConfigError(f"bad value prior-smoothing={cfg.train.prior_smoothing}: it mixes the uniform prior into "
                          "the label prior of local-loss=logit-adjusted; with local-loss=ce there is none")
    if cfg.train.proximal_mu > 0 and cfg.privacy.dp == "sample":
        raise ConfigError(f"bad value proximal-mu={cfg.train.proximal_mu} with dp=sample: the proximal term is not "
                          "a per-example loss, so per-example clipping would not bound it; use proximal-mu=0")
    if m.base_quant != "none" and (why := adapter_kind(m.adapter).base_quant):
        raise ConfigError(f"bad value base-quant={m.base_quant!r}: a quantized base takes LoRA only "
                          f"(adapter={m.adapter!r} {why})")
    if m.gradient_checkpointing and cfg.privacy.dp == "sample":
        raise ConfigError("bad value gradient-checkpointing=True: dp=sample computes per-example gradients from "
                          "forward hooks, which a recomputed forward would fire twice; turn one of them off")


def check_run(cfg: RunConfig) -> None:
    """Every cross-section rule, in the order the run has always checked them."""
    check_composition(cfg)
    check_compression(cfg)
    check_task(cfg)
