"""Client side: the ClientApp and the per-process worker it reuses across rounds."""
