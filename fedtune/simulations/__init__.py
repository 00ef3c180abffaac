"""Ways to run a federation on one machine: Flower's simulation runtime and the baselines."""
