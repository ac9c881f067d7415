"""Benchmarks: run with `make bench` or `python -m bench.<name>`; results in docs/benchmarks.md."""
