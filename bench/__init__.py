"""Benchmarks (not tests): scripts and their results; see bench/README.md."""
