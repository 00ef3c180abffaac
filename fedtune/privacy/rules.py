"""Which privacy settings compose with the rest of a run: the rules live in fedtune.compat
(every cross-section rule, torch-free, checked once by RunConfig); this module keeps their
old names for the privacy package and its callers."""

from fedtune.compat import (  # noqa: F401
    CLIENT_LEVEL_STRATEGIES,
    SECAGG_STRATEGIES,
    check_audit,
    check_composition,
    check_secagg,
    num_sampled_clients,
)
