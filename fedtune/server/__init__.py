"""Server side: the ServerApp, round metering and the run directory."""
