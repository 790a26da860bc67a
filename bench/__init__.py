"""Benchmarks that double as tests: `pytest bench/ --benchmark-only` times, `--benchmark-disable` checks."""
