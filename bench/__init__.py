"""Benchmarks: rerunnable scripts whose results are recorded in docs/benchmarks.md."""
