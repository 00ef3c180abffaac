"""Which sparse-adapter and compression settings compose with the rest of a run.

Called from ``RunConfig.__post_init__``: cheap, no torch. Refused (one-line ConfigError):

- ``adapter=sparse`` with a strategy other than ``fedavg`` (its mask-aware mean; the
  rank-aware strategies and the server optimisers work on LoRA factors / dense averages);
- ``adapter=sparse`` with ``topk`` / ``dare``: the update is already sparse; its values
  take ``fp16``, ``int8`` or ``int8-row``;
- ``topk`` / ``dare`` with strategies whose clients train tensors the server did not send
  (``flora``: fresh adapters; ``fedsa``: local B): those codecs need the sent shape;
- compression or a sparse adapter with ``dp-clipping=client``: Flower's client mod clips the
  reply's arrays, which are then encoded bytes, not an update;
- a sparse adapter with client-level DP: the noise is calibrated to a uniform mean of
  clipped updates, not to a mask-aware mean.

Data-dependent selection under ``dp=sample`` is refused in fedtune.privacy.rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import RunConfig

SHAPELESS = ("topk", "dare")  # codecs that need the shape of what the server sent


def check_compression(cfg: RunConfig) -> None:
    fed, model, dp = cfg.federation, cfg.model, cfg.privacy
    if model.adapter == "sparse":
        if fed.strategy != "fedavg":
            raise ConfigError(f"bad value strategy={fed.strategy!r} with adapter=sparse: sparse updates are "
                              "aggregated by fedavg's mask-aware mean; use strategy=fedavg")
        if fed.compression in SHAPELESS:
            raise ConfigError(f"bad value compression={fed.compression!r} with adapter=sparse: the update is "
                              "already sparse; use compression=none, fp16, int8 or int8-row")
        if dp.client_level:
            raise ConfigError(f"bad value adapter='sparse' with dp={dp.dp}: client-level DP noise is calibrated "
                              "to a uniform mean of clipped updates, not a mask-aware mean")
    if fed.compression in SHAPELESS and fed.strategy in ("flora", "fedsa"):
        raise ConfigError(f"bad value compression={fed.compression!r} with strategy={fed.strategy}: its clients "
                          "train tensors the server did not send; use compression=fp16, int8 or int8-row")
    if (fed.compression != "none" or model.adapter == "sparse") and dp.client_level and dp.dp_clipping == "client":
        raise ConfigError(f"bad value dp-clipping='client' with compression={fed.compression}: the client mod "
                          "would clip the encoded reply; use dp-clipping=server")
