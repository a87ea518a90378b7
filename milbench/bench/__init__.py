"""Benchmarks behind `milbench bench`: speed and accuracy figures measured, never asserted."""
