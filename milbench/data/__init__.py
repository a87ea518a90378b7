"""Cohort data layer: the challenge loader and the cohort data model."""

from milbench.data.cohort import Cohort, Patient, SkipRecord

__all__ = ["Cohort", "Patient", "SkipRecord"]
