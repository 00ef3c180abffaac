"""The run directory: its layout and writes live in fedtune.artifacts (the contract between
training and export); the old name stays for the server and its callers."""

from fedtune.artifacts import (  # noqa: F401
    ADAPTER_DIR,
    BASE_DELTA_FILE,
    CLIENTS_DIR,
    CONFIG,
    METRICS,
    SUMMARY,
    RunDir,
    _atomic_write,
    client_state_file,
)
