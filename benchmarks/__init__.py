"""Benchmarks: `python -m benchmarks.NAME` prints a table; figures are recorded in benchmarks/README.md."""
