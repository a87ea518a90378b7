"""Evaluation: stratified patient splits, metrics, repeated cross-validation."""
