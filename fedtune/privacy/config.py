"""Sample-level DP-SGD settings for one client's local training: ``DPConfig``, declared with
the rest of the run's configuration in fedtune.config (``PrivacyConfig.sample_dp()`` builds it)."""

from fedtune.config import DPConfig

__all__ = ["DPConfig"]
