"""Which privacy settings compose with the rest of a run: refuse what would break a guarantee.

Called from ``RunConfig.__post_init__`` (every config is checked once, wherever it is
built), so it must stay cheap: no opacus, no torch. Checks that need the noise calibrated
or the partitions built run in :func:`fedtune.privacy.federation.preflight`.

Refused (one-line ConfigError):

- any ``dp`` with ``head-init=ridge``: the closed-form head needs each client's d x d feature
  scatter, a second moment released without noise (a private version would need its own
  noise on a d x d matrix and its own accounting, which fedtune does not implement);
- client-level ``dp`` with ``head-init=ncm``: the FedNCM head is built from per-class feature
  sums of the clients' private examples, outside the clipped and noised updates (under
  ``dp=sample`` the head is released with its own Gaussian noise and accounted:
  :mod:`fedtune.privacy.head`);
- ``dp=client-*`` with a strategy other than ``fedavg``: Flower's wrappers calibrate the
  noise to a *uniform mean of clipped updates*; FedAvgM/FedAdam apply their server
  optimiser to the un-noised mean inside the wrapper (the momentum / moment buffers would
  carry un-noised updates into later rounds), and rank-heterogeneous strategies do not
  aggregate whole ArrayRecords of one shape (so ``profiles`` is refused too);
- ``dp=sample`` with ``adapter=sparse`` and a data-dependent ``sparse-selection``
  (``magnitude``, ``ks``): the mask itself is computed from private data without noise
  (``random`` is allowed: its entries come from the run's seed).

- ``audit-canaries`` (the one-shot empirical audit, :mod:`fedtune.privacy.canaries`) with
  ``dp=sample`` (a canary *client* measures client-level privacy; DP-SGD's guarantee is per
  example and per client accountant, see docs/privacy.md), or with a strategy other than
  ``fedavg``, ``profiles``, or ``adapter=sparse``: a canary's contribution to the aggregate is
  modelled as one more update in a mean of whole updates of one shape.

- ``secure-aggregation=secagg+`` (Flower's SecAgg+, :mod:`fedtune.server.secagg`) wherever the
  server step needs more than the weighted sum of the replies (``check_secagg``: flexlora,
  flora, fedex, fedsa, hetlora; robust aggregation; profiles; sparse adapters with a strategy other than fedavg; any
  compression; the FedNCM head; client-level DP with server-side clipping).

Allowed as post-processing (documented in docs/privacy.md): any server strategy with
``dp=sample`` (it only sees DP outputs), server-side evaluation, the saved adapter and its
edge export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import RunConfig

CLIENT_LEVEL_STRATEGIES = ("fedavg",)


def num_sampled_clients(cfg: RunConfig) -> int:
    """Clients Flower's FedAvg samples per training round (its own formula), i.e. the ``m``
    the client-level noise is divided by."""
    n, fed = cfg.partition.num_clients, cfg.federation
    return max(int(n * fed.fraction_train), min(fed.min_train_nodes, n))


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
    elif cfg.model.adapter != "lora" or getattr(cfg.federation, "profiles", ""):
        why = "with adapter=sparse or profiles: a canary is modelled as one more whole update of one shape"
    if why:
        raise ConfigError(f"bad value audit-canaries={p.audit_canaries} {why}")


SECAGG_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "ffa")  # the server step needs only the weighted sum
_SECAGG_REFUSED = {  # strategy -> why it needs individual updates
    "flexlora": "it takes the SVD of each client's product B A",
    "flora": "it stacks the clients' factors",
    "fedex": "it needs each client's factors for the residual",
    "fedsa": "it keeps per-group B matrices from individual replies",
    "hetlora": "it zero-pads and prunes per client rank",
}


def check_secagg(cfg: RunConfig) -> None:
    """Where ``secure-aggregation=secagg+`` (Flower's SecAgg+, fedtune.server.secagg) composes:
    only where the server step needs nothing but the weighted sum of the replies."""
    fed = cfg.federation
    if fed.secure_aggregation == "none":
        return
    key = f"bad value secure-aggregation={fed.secure_aggregation!r}"
    why = None
    if fed.strategy not in SECAGG_STRATEGIES:
        reason = _SECAGG_REFUSED.get(fed.strategy, "it needs more than the weighted sum of the updates")
        why = f"with strategy={fed.strategy!r}: {reason}; use one of {', '.join(SECAGG_STRATEGIES)}"
    elif fed.robust != "none":
        why = f"with robust={fed.robust!r}: it screens individual updates, which the server no longer sees"
    elif getattr(fed, "profiles", ""):
        why = f"with profiles={fed.profiles!r}: clients of several ranks send arrays of different shapes"
    elif cfg.model.adapter == "sparse" and fed.strategy != "fedavg":
        why = f"with adapter='sparse' and strategy={fed.strategy!r}: sparse adapters aggregate with fedavg"
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
    selection = cfg.model.sparse_selection
    if p.dp == "sample" and cfg.model.adapter == "sparse" and selection != "random":
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
