"""fedtune: federated and edge fine-tuning of low-rank adapters with Flower."""

__version__ = "0.1.0"
