"""Benchmarks that double as tests: `pytest bench/ --benchmark-only` times them, plain `pytest` checks them."""
