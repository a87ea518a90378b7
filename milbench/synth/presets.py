"""Synthetic cohort presets and their knobs: plain data, checked without loading the renderer.

A ``SynthPreset`` holds a cohort's size and every generator knob; ``resolve_knobs`` applies
overrides and checks each value, naming the knob. Configs validate ``data.synthetic`` with it
when they load, so this module imports nothing heavier than numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BagSizes:
    """Log-normal bag sizes per class, clipped to ``[low, high]``."""

    tumoral_median: float
    reactive_median: float
    sigma: float
    low: int
    high: int


@dataclass(frozen=True)
class SynthPreset:
    """Cohort size and default knobs of a synthetic cohort."""

    name: str
    n_train_tumoral: int
    n_train_reactive: int
    n_test_tumoral: int
    n_test_reactive: int
    train_bags: BagSizes
    test_bags: BagSizes
    masks: bool
    witness_rate: float = 0.5
    signal_strength: float = 0.7
    clinical_informativeness: float = 0.5
    # Upper bound of the per-patient atypical rate in reactive patients (keeps MIL non-trivial).
    reactive_atypical_rate: float = 0.04
    # Range of the per-patient fraction of reactive-variant cells, by label.
    reactive_variant_rate_reactive: tuple[float, float] = (0.15, 0.4)
    reactive_variant_rate_tumoral: tuple[float, float] = (0.0, 0.08)
    # Realistic difficulty; the defaults leave the easy presets exactly as they were.
    # Per tumoral patient, the atypical share is Beta(mean c, (1 - mean) c) with mean
    # witness_rate (skewed: many patients with few witnesses); None: a normal clipped to [0.1, 0.95].
    witness_concentration: float | None = None
    signal_spread: float = 0.0  # standard deviation of each patient's signal strength
    cell_spread: float = 0.0  # standard deviation of each cell's strength per trait (TRAITS)
    typical_atypia_rate: float = 0.0  # share of typical cells with one atypical trait
    n_sites: int = 0  # acquisition sites; 0: an independent stain per patient
    site_tumoral_odds: tuple[float, ...] = ()  # per site: odds factor of tumoral patients
    site_mix_train: tuple[float, ...] = ()  # per site: weight among training patients
    site_mix_test: tuple[float, ...] = ()  # per site: weight among test patients
    label_noise: float = 0.0  # share of training labels flipped (half each way) against the truth
    # Reactive patients' counts stay at or below this (the real data: every count above 8 is
    # tumoral); None: the informativeness knob alone shapes the counts.
    reactive_count_cap: float | None = None

    @property
    def n_patients(self) -> int:
        train = self.n_train_tumoral + self.n_train_reactive
        return train + self.n_test_tumoral + self.n_test_reactive

    @property
    def per_cell_traits(self) -> bool:
        """Whether cells draw their own strength per trait (the realistic renderer)."""
        return self.signal_spread > 0 or self.cell_spread > 0 or self.typical_atypia_rate > 0


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset(
        name="tiny", n_train_tumoral=6, n_train_reactive=3, n_test_tumoral=2, n_test_reactive=1,
        train_bags=BagSizes(6.5, 5.5, 0.25, 4, 8), test_bags=BagSizes(6.5, 5.5, 0.25, 4, 8),
        masks=True,
    ),
    "small": SynthPreset(
        name="small", n_train_tumoral=28, n_train_reactive=12, n_test_tumoral=8,
        n_test_reactive=4, train_bags=BagSizes(20.0, 14.0, 0.35, 8, 30),
        test_bags=BagSizes(18.0, 13.0, 0.35, 8, 30), masks=True,
    ),
    # Matches the real challenge (docs/data.md): 163 train (113 tumoral) + 42 test patients, train
    # bags 16-198 (median 85 tumoral, 52.5 reactive), test bags 26-180; ~16.7k images.
    "challenge": SynthPreset(
        name="challenge", n_train_tumoral=113, n_train_reactive=50, n_test_tumoral=29,
        n_test_reactive=13, train_bags=BagSizes(85.0, 52.5, 0.5, 16, 198),
        test_bags=BagSizes(70.0, 48.0, 0.6, 26, 180), masks=False,
    ),
    # The real challenge's size with its real difficulty: few witnesses in many tumoral
    # patients, weak and variable morphology, look-alike cells in both classes, four sites with
    # their own acquisition and prevalence, a shifted test site mix, noisy labels, and clinical
    # attributes that alone give about 0.70-0.78 balanced accuracy.
    "realistic": SynthPreset(
        name="realistic", n_train_tumoral=113, n_train_reactive=50, n_test_tumoral=29,
        n_test_reactive=13, train_bags=BagSizes(78.0, 50.0, 0.55, 16, 198),
        test_bags=BagSizes(66.0, 48.0, 0.6, 26, 180), masks=False,
        witness_rate=0.25, witness_concentration=3.0, signal_strength=0.4, signal_spread=0.25,
        cell_spread=0.2, typical_atypia_rate=0.03, clinical_informativeness=0.6,
        reactive_atypical_rate=0.10, reactive_variant_rate_reactive=(0.05, 0.3),
        reactive_variant_rate_tumoral=(0.0, 0.2), n_sites=4,
        site_tumoral_odds=(2.0, 1.0, 0.7, 0.4), site_mix_train=(0.35, 0.3, 0.2, 0.15),
        site_mix_test=(0.15, 0.2, 0.3, 0.35), label_noise=0.04, reactive_count_cap=8.0,
    ),
}
# The realistic cohort at demo size (64 patients, ~900 images): the README's main job.
PRESETS["realistic_small"] = replace(
    PRESETS["realistic"], name="realistic_small", n_train_tumoral=34, n_train_reactive=14,
    n_test_tumoral=11, n_test_reactive=5, train_bags=BagSizes(16.0, 11.0, 0.4, 6, 36),
    test_bags=BagSizes(16.0, 11.0, 0.4, 6, 36))
# Every field but the name can be overridden per cohort (``knobs``).
KNOBS = tuple(f.name for f in fields(SynthPreset) if f.name != "name")


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve_preset(preset: str | SynthPreset) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be a [low, high] pair in [0, 1], got {value!r}")
    low, high = (_check_unit(name, v) for v in value)
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return low, high


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_bag_sizes(name: str, value: Any) -> BagSizes:
    if isinstance(value, BagSizes):
        value = asdict(value)
    if not isinstance(value, dict) or set(value) != {f.name for f in fields(BagSizes)}:
        raise ValueError(f"{name} must be a mapping with keys {[f.name for f in fields(BagSizes)]}, "
                         f"got {value!r}")
    low, high = _check_count(f"{name}.low", value["low"], 1), _check_count(f"{name}.high", value["high"], 1)
    if low > high:
        raise ValueError(f"{name}: low must not exceed high, got {low} > {high}")
    return BagSizes(_check_positive(f"{name}.tumoral_median", value["tumoral_median"]),
                    _check_positive(f"{name}.reactive_median", value["reactive_median"]),
                    _check_unit(f"{name}.sigma", value["sigma"]), low, high)


def parse_knob_assignments(assignments) -> dict[str, Any]:
    """``["key=value", ...]`` (values read as YAML, e.g. ``site_mix_test=[1,1,1]``) → knobs; the
    names are checked by :func:`resolve_knobs`."""
    import yaml

    knobs: dict[str, Any] = {}
    for assignment in assignments or ():
        key, separator, raw = assignment.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--knob {assignment!r} must look like key=value")
        try:
            knobs[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"--knob {assignment!r}: the value is not valid YAML ({error})") from None
    return knobs


def resolve_knobs(preset: str | SynthPreset, knobs: dict[str, Any] | None = None) -> SynthPreset:
    """The preset with ``knobs`` (any field but ``name``) replaced, every value checked; an
    unknown knob or a bad value is an error that names it."""
    spec = _resolve_preset(preset)
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown synthetic knob(s) {unknown}; valid knobs: {list(KNOBS)}")
    spec = replace(spec, **knobs)
    checked: dict[str, Any] = {}
    for name in ("n_train_tumoral", "n_train_reactive", "n_test_tumoral", "n_test_reactive"):
        checked[name] = _check_count(name, getattr(spec, name), 0)
    for name in ("n_train_tumoral", "n_train_reactive"):
        if checked[name] < 2:
            raise ValueError(f"{name} must be at least 2, got {checked[name]}")
    for name in ("train_bags", "test_bags"):
        checked[name] = _check_bag_sizes(name, getattr(spec, name))
    for name in ("witness_rate", "signal_strength", "clinical_informativeness",
                 "reactive_atypical_rate", "signal_spread", "cell_spread", "typical_atypia_rate",
                 "label_noise"):
        checked[name] = _check_unit(name, getattr(spec, name))
    for name in ("reactive_variant_rate_reactive", "reactive_variant_rate_tumoral"):
        checked[name] = _check_range(name, getattr(spec, name))
    if not isinstance(spec.masks, bool):
        raise ValueError(f"masks must be true or false, got {spec.masks!r}")
    if spec.witness_concentration is not None:
        checked["witness_concentration"] = _check_positive("witness_concentration",
                                                           spec.witness_concentration)
        if not 0 < checked["witness_rate"] < 1:
            raise ValueError("witness_rate must lie strictly inside (0, 1) with witness_concentration")
    if spec.reactive_count_cap is not None:
        checked["reactive_count_cap"] = _check_positive("reactive_count_cap", spec.reactive_count_cap)
    checked["n_sites"] = _check_count("n_sites", spec.n_sites, 0)
    for name in ("site_tumoral_odds", "site_mix_train", "site_mix_test"):
        value = getattr(spec, name)
        if not isinstance(value, (list, tuple)) or len(value) != checked["n_sites"]:
            raise ValueError(f"{name} must hold one number per site ({checked['n_sites']}), got {value!r}")
        checked[name] = tuple(_check_positive(f"{name}[{i}]", v) for i, v in enumerate(value))
    return replace(spec, **checked)
