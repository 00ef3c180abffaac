"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class FedtuneError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(FedtuneError):
    """A bad preset, key or value in the run configuration."""


class DataError(FedtuneError):
    """A dataset that cannot be found or read."""


class ModelError(FedtuneError):
    """A model that cannot be found or loaded."""
