"""The plan of a synthetic cohort, drawn before any pixel: who the patients are (split, label,
clinical attributes in the real file's quirky formats), how many cells each bag holds and which
are atypical, each cell's trait strengths, the acquisition sites and the flipped training labels.

Every draw comes from one generator seeded by the cohort's seed, in a fixed order, so a plan
(and the cohort rendered from it) is the same whatever else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from milbench.synth.layout import AGE_REFERENCE_DATE
from milbench.synth.presets import BagSizes, SynthPreset
from milbench.synth.render import TRAITS, Stain, sample_site_stain


@dataclass(frozen=True)
class Patient:
    """One planned patient: the truth, what the files will say, and each cell's variant."""

    patient_id: str
    split: str  # "train" or "test"
    label: int  # the truth
    gender: str
    dob: str
    lymph_count: float
    variants: tuple[str, ...]
    observed_label: int  # what the training CSV says (label noise flips a few)
    site: int = -1  # acquisition site; -1 without sites
    signal_strength: float = 0.0
    traits: np.ndarray | None = None  # (n_images, len(TRAITS)) strengths, realistic renderer only

    @property
    def witness_fraction(self) -> float:
        return sum(v == "atypical" for v in self.variants) / len(self.variants)

    def atypia(self) -> np.ndarray:
        """Each cell's true atypia: the mean of its trait strengths (0 for reactive cells)."""
        if self.traits is not None:
            return self.traits.mean(axis=1)
        return np.array([self.signal_strength if v == "atypical" else 0.0 for v in self.variants])


def _bag_sizes(rng: np.random.Generator, labels: np.ndarray, sizes: BagSizes) -> np.ndarray:
    medians = np.where(labels == 1, sizes.tumoral_median, sizes.reactive_median)
    drawn = medians * np.exp(sizes.sigma * rng.standard_normal(labels.size))
    return np.clip(np.round(drawn), sizes.low, sizes.high).astype(int)


def _clinical(
    rng: np.random.Generator, labels: np.ndarray, informativeness: float,
    reactive_count_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ages (years) and lymphocyte counts (G/L) whose link to the label grows with the knob.

    Counts mix a reactive-like component (median ~4.6, rarely above 8) and a high, wide
    component (above 8, median ~28, up to 295). At informativeness 0 both labels share one
    mixture; as it grows, tumoral patients move to the high component and reactive ones leave
    it (cubically, so that at the default 0.5 a count above 8 already points strongly to
    tumoral, as in the real data, while many tumoral patients still have low counts). Tumoral
    patients also get older.

    With ``reactive_count_cap`` (the realistic cohorts), reactive patients never leave the low
    component and stay at or below the cap, and fewer tumoral patients reach the high one
    (0.25 + 0.4 x informativeness), so a high count is proof but a low one says little.
    """
    n = labels.size
    tumoral = labels == 1
    if reactive_count_cap is None:
        p_high = np.where(tumoral, 0.5 + 0.4 * informativeness, 0.5 * (1 - informativeness) ** 3)
    else:
        p_high = np.where(tumoral, 0.25 + 0.4 * informativeness, 0.0)
    high = rng.uniform(size=n) < p_high
    low_counts = 4.6 * np.exp(0.3 * rng.standard_normal(n))
    high_counts = 8.0 + 20.0 * np.exp(1.0 * rng.standard_normal(n))
    counts = np.where(high, high_counts, low_counts)
    if reactive_count_cap is not None:
        over = ~tumoral & (counts > reactive_count_cap)
        counts[over] = reactive_count_cap * rng.uniform(0.85, 1.0, int(over.sum()))
    counts = np.round(np.clip(counts, 2.28, 295.0), 2)
    age_mean = np.where(tumoral, 64 + 10 * informativeness, 64 - 8 * informativeness)
    ages = np.clip(age_mean + 13.0 * rng.standard_normal(n), 18, 99)
    return ages, counts


def _dates_of_birth(rng: np.random.Generator, ages: np.ndarray) -> list[str]:
    """``M/D/YYYY`` strings, except a contiguous block in ``DD-MM-YYYY`` (a quirk of the data)."""
    n = ages.size
    days = np.round(ages * 365.25 + rng.uniform(0, 365, n)).astype(int)
    births = [AGE_REFERENCE_DATE - timedelta(days=int(d)) for d in days]
    block = max(1, round(0.12 * n))
    start = int(rng.integers(0, n - block + 1))
    dobs = []
    for i, born in enumerate(births):
        if start <= i < start + block:
            dobs.append(f"{born.day:02d}-{born.month:02d}-{born.year}")
        else:
            dobs.append(f"{born.month}/{born.day}/{born.year}")
    return dobs


def _genders(rng: np.random.Generator, n: int) -> list[str]:
    genders = np.where(rng.uniform(size=n) < 0.55, "M", "F").astype(object)
    females = np.flatnonzero(genders == "F")
    if females.size == 0:
        females = np.array([int(rng.integers(n))])
        genders[females] = "F"
    # The real file has a few lowercase "f" entries; keep at least one.
    lowercase = rng.uniform(size=females.size) < 0.04
    lowercase[int(rng.integers(females.size))] = True
    genders[females[lowercase]] = "f"
    return [str(g) for g in genders]


def _instance_variants(
    rng: np.random.Generator, label: int, n_images: int, preset: SynthPreset, witness_rate: float
) -> tuple[str, ...]:
    variants = np.full(n_images, "typical", dtype=object)
    if label == 1 and preset.witness_concentration is not None:
        concentration = preset.witness_concentration
        fraction = rng.beta(witness_rate * concentration, (1 - witness_rate) * concentration)
        # Binomial: a tumoral bag may hold no witness at all, as real ones do.
        n_atypical = int(rng.binomial(n_images, fraction))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_tumoral)
    elif label == 1:
        fraction = float(np.clip(rng.normal(witness_rate, 0.15), 0.1, 0.95))
        n_atypical = max(1, int(round(fraction * n_images)))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_tumoral)
    else:
        n_atypical = int(rng.binomial(n_images, rng.uniform(0, preset.reactive_atypical_rate)))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_reactive)
    order = rng.permutation(n_images)
    variants[order[:n_atypical]] = "atypical"
    rest = order[n_atypical:]
    n_reactive = int(rng.binomial(rest.size, confounder_rate))
    variants[rest[:n_reactive]] = "reactive"
    return tuple(str(v) for v in variants)


def _cell_traits(rng: np.random.Generator, variants: tuple[str, ...], signal: float,
                 preset: SynthPreset) -> np.ndarray:
    """Per cell and trait, a strength in [0, 1]: atypical cells scatter around their patient's
    signal, typical ones around 0, and a few typical ones carry one strong atypical trait (a
    nucleolus or a notched nucleus). Reactive cells are drawn separately (zeros here)."""
    n = len(variants)
    atypical = np.array([v == "atypical" for v in variants])
    typical = np.array([v == "typical" for v in variants])
    # Each atypical cell is atypical to its own degree (some barely), then each trait moves
    # around that degree on its own.
    centre = np.where(atypical, np.clip(signal + preset.cell_spread * rng.standard_normal(n), 0, 1),
                      0.0)[:, None]
    traits = np.clip(centre + preset.cell_spread * rng.standard_normal((n, len(TRAITS))), 0.0, 1.0)
    mimic = typical & (rng.uniform(size=n) < preset.typical_atypia_rate)
    which = rng.choice([TRAITS.index("outline"), TRAITS.index("nucleoli")], size=n)
    strong = rng.uniform(0.6, 1.0, n)
    traits[mimic, which[mimic]] = strong[mimic]
    traits[~(atypical | typical)] = 0.0
    return traits


def _assign_sites(rng: np.random.Generator, labels: np.ndarray, splits: list[str],
                  preset: SynthPreset) -> np.ndarray:
    """Each patient's site given its label and split: the split's site mix, tilted towards the
    sites with more tumoral patients for tumoral ones (so prevalence differs by site)."""
    odds = np.asarray(preset.site_tumoral_odds)
    sites = np.empty(labels.size, dtype=int)
    for i, (label, split) in enumerate(zip(labels, splits, strict=True)):
        weights = np.asarray(preset.site_mix_train if split == "train" else preset.site_mix_test)
        weights = weights * (odds if label == 1 else 1.0)
        sites[i] = rng.choice(preset.n_sites, p=weights / weights.sum())
    return sites


def _flip_labels(rng: np.random.Generator, labels: np.ndarray, counts: np.ndarray, n_train: int,
                 preset: SynthPreset) -> np.ndarray:
    """Observed training labels: as many tumoral as reactive ones flipped (class counts stay as
    the preset says); with a count cap only patients under it, so a high count stays tumoral."""
    observed = labels.copy()
    per_class = int(round(preset.label_noise * n_train / 2))
    if per_class == 0:
        return observed
    eligible = np.arange(n_train)
    if preset.reactive_count_cap is not None:
        eligible = eligible[counts[:n_train] <= preset.reactive_count_cap]
    for label in (0, 1):
        candidates = eligible[labels[eligible] == label]
        chosen = rng.choice(candidates, size=min(per_class, candidates.size), replace=False)
        observed[chosen] = 1 - label
    return observed


def plan_cohort(
    preset: SynthPreset, seed_seq: np.random.SeedSequence, witness_rate: float,
    clinical_informativeness: float,
) -> tuple[list[Patient], list[Stain]]:
    rng = np.random.default_rng(seed_seq)
    n = preset.n_patients
    id_pool = max(300, 3 * n)
    ids = [f"P{i}" for i in rng.choice(id_pool, size=n, replace=False)]
    train_labels = rng.permutation(
        np.array([1] * preset.n_train_tumoral + [0] * preset.n_train_reactive, dtype=int)
    )
    test_labels = rng.permutation(
        np.array([1] * preset.n_test_tumoral + [0] * preset.n_test_reactive, dtype=int)
    )
    labels = np.concatenate([train_labels, test_labels])
    splits = ["train"] * train_labels.size + ["test"] * test_labels.size
    sizes = np.concatenate([
        _bag_sizes(rng, train_labels, preset.train_bags),
        _bag_sizes(rng, test_labels, preset.test_bags),
    ])
    ages, counts = _clinical(rng, labels, clinical_informativeness, preset.reactive_count_cap)
    dobs = _dates_of_birth(rng, ages)
    genders = _genders(rng, n)
    variants = [_instance_variants(rng, int(labels[i]), int(sizes[i]), preset, witness_rate)
                for i in range(n)]
    # Everything below draws only when its knob is on, so the easy presets keep their bytes.
    observed = _flip_labels(rng, labels, counts, train_labels.size, preset)
    site_stains = [sample_site_stain(rng) for _ in range(preset.n_sites)]
    sites = _assign_sites(rng, labels, splits, preset) if preset.n_sites else np.full(n, -1)
    signals = np.full(n, preset.signal_strength)
    if preset.signal_spread > 0:
        signals = np.clip(preset.signal_strength + preset.signal_spread * rng.standard_normal(n),
                          0.0, 1.0)
    traits = [_cell_traits(rng, variants[i], float(signals[i]), preset)
              if preset.per_cell_traits else None for i in range(n)]
    patients = [
        Patient(
            patient_id=ids[i], split=splits[i], label=int(labels[i]), gender=genders[i],
            dob=dobs[i], lymph_count=float(counts[i]), variants=variants[i],
            observed_label=int(observed[i]), site=int(sites[i]), signal_strength=float(signals[i]),
            traits=traits[i],
        )
        for i in range(n)
    ]
    return patients, site_stains
