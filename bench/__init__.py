"""Benchmark of the connector: `python -m bench` (see bench/README.md)."""
