"""Ensembles of bag models: the clinical stacker and the voting ensemble (both bag models)."""
