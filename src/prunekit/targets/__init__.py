"""Targets: what a prune aims at, one module per kind that needs more than a number (``latency``: a measured
speedup, found by a search over prunes)."""
