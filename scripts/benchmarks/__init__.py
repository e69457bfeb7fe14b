"""Benchmark cases, one module per family; `scripts/benchmark.py` is the command."""
