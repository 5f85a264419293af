"""Benchmarks of ssrl: `python -m bench.serving`, `python bench/bench_local_index.py`."""
