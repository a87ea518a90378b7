"""Cohort data layer: the challenge loader and the cohort data model."""

from milbench.data.challenge import ChallengeDataError, load_challenge, parse_dob
from milbench.data.cohort import Cohort, Patient, SkipRecord

__all__ = ["ChallengeDataError", "Cohort", "Patient", "SkipRecord", "load_challenge", "parse_dob"]
