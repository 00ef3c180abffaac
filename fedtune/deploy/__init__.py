"""Deployment on Flower's deployment engine: credentials, SuperLink, SuperNodes (docs/deploying.md)."""
