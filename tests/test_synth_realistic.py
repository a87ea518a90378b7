"""The realistic preset and the generator's knobs: each knob changes what it claims, the same seed
gives the same bytes, and truth/difficulty.json agrees with the truth files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from milbench.config import ConfigError, load_config
from milbench.core.clinical import clinical_design_matrix
from milbench.data import load_challenge
from milbench.synth import KNOBS, PRESETS, generate_cohort, resolve_knobs
from milbench.synth.difficulty import best_threshold, clinical_only, combined_oracle
from milbench.synth.layout import AGE_REFERENCE_DATE
from milbench.synth.plan import plan_cohort
from milbench.synth.render import TRAITS, render_cell, sample_stain

SMALL_BAGS = {"tumoral_median": 5, "reactive_median": 4, "sigma": 0.2, "low": 3, "high": 7}
# A realistic cohort small enough to render in seconds.
SHRUNK = {"n_train_tumoral": 14, "n_train_reactive": 8, "n_test_tumoral": 4, "n_test_reactive": 3,
          "train_bags": SMALL_BAGS, "test_bags": SMALL_BAGS, "label_noise": 0.1}


def plan(knobs: dict | None = None, seed: int = 0):
    spec = resolve_knobs("realistic", knobs)
    patients, stains = plan_cohort(
        spec, np.random.SeedSequence(seed).spawn(1)[0], spec.witness_rate,
        spec.clinical_informativeness)
    return spec, patients, stains


def test_realistic_plan_has_the_challenge_size_and_difficulty() -> None:
    _, patients, stains = plan()
    train = [p for p in patients if p.split == "train"]
    test = [p for p in patients if p.split == "test"]
    assert len(train) == 163 and len(test) == 42 and len(stains) == 4
    assert sum(p.observed_label for p in train) == 113  # the observed class counts stay real
    sizes = np.array([len(p.variants) for p in train])
    labels = np.array([p.label for p in train])
    assert sizes.min() >= 16 and sizes.max() <= 198 and 55 <= np.median(sizes) <= 78
    assert np.median(sizes[labels == 1]) > np.median(sizes[labels == 0])
    tumoral = np.array([p.witness_fraction for p in patients if p.label == 1])
    assert 0.1 <= np.mean(tumoral < 0.05) <= 0.35  # about a fifth with under 5 % witnesses
    reactive = np.array([p.witness_fraction for p in patients if p.label == 0])
    assert reactive.max() > 0.05 and np.mean(reactive) < np.mean(tumoral)
    # Reactive-variant (confounder) cells in both classes at overlapping rates.
    confounders = {label: [np.mean([v == "reactive" for v in p.variants])
                           for p in patients if p.label == label] for label in (0, 1)}
    assert max(confounders[1]) > min(confounders[0]) and max(confounders[0]) > 0.05
    # Every count above the cap is tumoral in the observed labels, as in the real data.
    assert all(p.observed_label == 1 for p in train if p.lymph_count > 8)
    flipped = [p for p in train if p.observed_label != p.label]
    assert len(flipped) == 6 and sum(p.label for p in flipped) == 3


def test_sites_shift_between_train_and_test_and_prevalence_differs_by_site() -> None:
    _, patients, _ = plan()
    frame = pd.DataFrame({"site": [p.site for p in patients], "split": [p.split for p in patients],
                          "label": [p.label for p in patients]})
    mix = frame.groupby("split")["site"].value_counts(normalize=True).unstack(fill_value=0)
    assert mix.loc["train", 0] > mix.loc["test", 0] and mix.loc["train", 3] < mix.loc["test", 3]
    prevalence = frame.groupby("site")["label"].mean()
    assert prevalence[0] - prevalence[3] > 0.2


def test_cell_traits_scatter_and_typical_cells_can_look_atypical() -> None:
    _, patients, _ = plan()
    traits = np.concatenate([p.traits for p in patients])
    variants = np.concatenate([p.variants for p in patients])
    assert traits.shape[1] == len(TRAITS) and traits.min() >= 0 and traits.max() <= 1
    typical = traits[variants == "typical"]
    assert (typical.max(axis=1) >= 0.6).mean() > 0.01  # a few typical cells with a strong trait
    atypical = traits[variants == "atypical"]
    assert atypical.std(axis=0).min() > 0.1  # spread per cell on every trait
    assert (traits[variants == "reactive"] == 0).all()
    atypia = np.concatenate([p.atypia() for p in patients])
    assert 0.75 < roc_auc_score(variants == "atypical", atypia) < 0.97  # oracle well below 1


@pytest.mark.parametrize(("knobs", "check"), [
    ({"label_noise": 0.0}, lambda ps: all(p.observed_label == p.label for p in ps)),
    ({"label_noise": 0.2}, lambda ps: sum(p.observed_label != p.label for p in ps) == 32),
    ({"n_sites": 0, "site_tumoral_odds": [], "site_mix_train": [], "site_mix_test": []},
     lambda ps: {p.site for p in ps} == {-1}),
    ({"reactive_atypical_rate": 0.0},
     lambda ps: all(p.witness_fraction == 0 for p in ps if p.label == 0)),
    ({"signal_spread": 0.0}, lambda ps: {p.signal_strength for p in ps} == {0.4}),
    ({"cell_spread": 0.0, "typical_atypia_rate": 0.0},
     lambda ps: all((p.traits[[v == "typical" for v in p.variants]] == 0).all() for p in ps)),
    ({"reactive_count_cap": 5.0},
     lambda ps: all(p.lymph_count <= 5.0 for p in ps if p.label == 0)),
])
def test_each_knob_changes_what_it_claims(knobs, check) -> None:
    _, patients, _ = plan(knobs)
    assert check(patients)


def test_witness_rate_moves_the_witness_fractions() -> None:
    low = [p.witness_fraction for p in plan({"witness_rate": 0.1})[1] if p.label == 1]
    high = [p.witness_fraction for p in plan({"witness_rate": 0.6})[1] if p.label == 1]
    assert np.mean(high) > np.mean(low) + 0.3


def test_traits_at_zero_render_a_typical_cell() -> None:
    stain = sample_stain(np.random.default_rng(3))
    typical = render_cell(np.random.default_rng(1), stain, "typical", 0.0)
    zeros = render_cell(np.random.default_rng(1), stain, "atypical", 1.0, traits=np.zeros(len(TRAITS)))
    assert np.array_equal(typical.image, zeros.image)
    with pytest.raises(ValueError, match="traits"):
        render_cell(np.random.default_rng(1), stain, "atypical", 1.0, traits=np.zeros(3))


@pytest.mark.parametrize(("knobs", "message"), [
    ({"label_nosie": 0.1}, "label_nosie.*valid knobs"),
    ({"label_noise": 1.5}, "label_noise"),
    ({"site_mix_test": [1, 1]}, "site_mix_test.*one number per site"),
    ({"train_bags": {"tumoral_median": 5}}, "train_bags"),
    ({"n_train_reactive": 1}, "n_train_reactive"),
])
def test_bad_knobs_fail_naming_the_knob(knobs, message, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        generate_cohort(tmp_path / "cohort", "realistic", knobs=knobs)
    assert list(tmp_path.iterdir()) == []


def test_every_field_but_the_name_is_a_knob() -> None:
    assert "name" not in KNOBS and {"label_noise", "n_sites", "witness_rate", "masks"} <= set(KNOBS)
    assert resolve_knobs("tiny") == PRESETS["tiny"]


def test_config_knobs_are_checked_on_load_and_key_the_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="label_nosie"):
        load_config(None, ["models=[{name: clinical_logreg}]", "data.synthetic.knobs.label_nosie=0.1"])
    from milbench.data_roots import synthetic_cohort_path

    plain = load_config(None, ["models=[{name: clinical_logreg}]"])
    noisy = load_config(None, ["models=[{name: clinical_logreg}]", "data.synthetic.knobs.label_noise=0.1"])
    other = load_config(None, ["models=[{name: clinical_logreg}]", "data.synthetic.knobs.label_noise=0.2"])
    paths = {synthetic_cohort_path(c.data, tmp_path) for c in (plain, noisy, other)}
    assert len(paths) == 3
    assert synthetic_cohort_path(plain.data, tmp_path).name == "synthetic-realistic-seed0"


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("realistic") / "c", "realistic", seed=0,
                           knobs=SHRUNK)


def test_same_seed_same_bytes(shrunk: Path, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", "realistic", seed=0, knobs=SHRUNK, workers=2)
    files = sorted(p.relative_to(shrunk) for p in shrunk.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((shrunk / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = generate_cohort(tmp_path / "other", "realistic", seed=1, knobs=SHRUNK)
    name = "clinical_annotation.csv"
    assert (other / name).read_bytes() != (shrunk / name).read_bytes()


def test_difficulty_agrees_with_the_truth_files(shrunk: Path) -> None:
    difficulty = json.loads((shrunk / "truth" / "difficulty.json").read_text())
    patients = pd.read_csv(shrunk / "truth" / "patients.csv", dtype={"patient_id": str})
    instances = pd.read_csv(shrunk / "truth" / "instances.csv", dtype={"patient_id": str})
    fractions = instances.groupby("patient_id")["atypical"].mean()
    assert np.allclose(patients.set_index("patient_id")["witness_fraction"],
                       fractions.loc[patients["patient_id"]])
    assert difficulty["oracle_instance_auc"] == pytest.approx(
        roc_auc_score(instances["atypical"], instances["atypia"]))
    upper, _ = best_threshold(patients["witness_fraction"], patients["label"])
    assert difficulty["oracle_bag"]["best_threshold_balanced_accuracy"] == pytest.approx(upper)
    train_csv = pd.read_csv(shrunk / "trainset" / "trainset_true.csv", dtype={"ID": str})
    truth = patients.set_index("patient_id").loc[train_csv["ID"], "label"].to_numpy()
    assert difficulty["labels_flipped"] == int((train_csv["LABEL"].to_numpy() != truth).sum()) == 2
    test_labels = pd.read_csv(shrunk / "truth" / "test_labels.csv", dtype={"ID": str})
    assert (patients.set_index("patient_id").loc[test_labels["ID"], "label"].to_numpy()
            == test_labels["LABEL"].to_numpy()).all()
    for split, sites in difficulty["site_mix"].items():
        for site, counts in sites.items():
            rows = patients[(patients["split"] == split) & (patients["site"] == int(site))]
            assert counts == {"patients": len(rows), "tumoral": int(rows["label"].sum())}
    assert 0 <= difficulty["clinical_only"]["cv_balanced_accuracy_mean"] <= 1
    # The combined oracle: the clinical-only CV with the true witness fraction beside the
    # attributes, and the same model fitted on every training patient, scored on the test set.
    combined = difficulty["combined_oracle"]
    train_ids = train_csv["ID"].tolist()
    table = load_challenge(shrunk, AGE_REFERENCE_DATE).clinical_table()
    witness = patients.set_index("patient_id")["witness_fraction"]
    design = lambda ids: np.column_stack([  # noqa: E731
        clinical_design_matrix(table.loc[ids].to_numpy(dtype=float)), witness.loc[ids]])
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    model.fit(design(train_ids), train_csv.set_index("ID").loc[train_ids, "LABEL"])
    test_ids = test_labels["ID"].tolist()
    assert combined["hidden_test_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(
        test_labels["LABEL"], model.predict(design(test_ids))))
    assert combined["n_splits"] == difficulty["clinical_only"]["n_splits"]


def test_best_threshold_by_hand() -> None:
    assert best_threshold([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == (1.0, 0.3)
    assert best_threshold([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1]) == (0.75, 0.2)


def test_the_combined_oracle_shares_the_clinical_folds() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 15)
    design = np.column_stack([rng.normal(size=30), rng.normal(size=30) + labels, rng.integers(0, 2, 30)])
    # A witness fraction that says nothing (constant) leaves every fold's model as it was.
    assert combined_oracle(design, np.full(30, 0.2), labels) == clinical_only(design, labels)
    # One that separates the classes lifts every fold to the top.
    perfect = combined_oracle(design, 0.3 * labels, labels)
    assert perfect["cv_balanced_accuracy_mean"] == 1.0
    assert perfect["cv_balanced_accuracy_mean"] > clinical_only(design, labels)["cv_balanced_accuracy_mean"]
