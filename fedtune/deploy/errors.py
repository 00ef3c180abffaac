"""Deployment errors a user can act on (missing certificates, bad addresses, unknown profiles)."""

from fedtune.errors import FedtuneError


class DeployError(FedtuneError):
    """A bad deployment input: a missing credential file, an address, a profile, a dead process."""
