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


def check_composition(cfg: RunConfig) -> None:
    p = cfg.privacy
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
