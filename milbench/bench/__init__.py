"""Benchmark suites: classic MIL datasets and digit bags against published figures."""
