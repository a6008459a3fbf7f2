"""Benchmarks (pytest-benchmark). A package so its test modules do not clash with tests/ by basename."""
