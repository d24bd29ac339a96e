"""Benchmarks of p2pdist, run as ``python -m bench``."""
