"""How hard a cohort is: figures that bound or anchor what a bag model can reach on it.

- ``clinical_only``: repeated stratified CV balanced accuracy of a standardised, class-balanced
  logistic regression on age, log lymphocyte count and gender, the floor every model that reads
  the clinical attributes should clear. It is the one figure a real challenge folder allows.
- With a synthetic cohort's hidden truth (``truth/``), also:
  - ``oracle_bag``: balanced accuracy of thresholding the true witness fraction (the share of
    atypical cells) against the true labels, at the best threshold over all patients (an upper
    bound) and at the threshold chosen on the training patients, scored on the test patients;
  - ``combined_oracle``: the clinical-only CV (same folds) with the true witness fraction added
    to the attributes, and its hidden-test figure: the ceiling of a model that fuses perfect
    cell reading with the clinical data; its gain over clinical-only is the room images leave;
  - ``oracle_instance_auc``: AUC of each cell's true atypia (the mean of its trait strengths)
    against its atypical flag: how far the best possible instance scorer is from perfect;
  - the site mix per split, the labels flipped, and the spread of witness fractions.

The generator writes these into ``truth/difficulty.json``; ``milbench bench cohort`` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from milbench.core.clinical import clinical_design_matrix


def pixel_ceiling_path(root: str | os.PathLike, input_size: int) -> Path:
    return Path(root) / "truth" / f"pixel_ceiling_{int(input_size)}px.json"


def _clinical_model():
    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))


def clinical_only(design: np.ndarray, labels: np.ndarray, n_splits: int = 5, n_repeats: int = 5,
                  seed: int = 0) -> dict[str, float]:
    """CV balanced accuracy (pooled over each repeat's folds, then mean and std over repeats) of
    the clinical logistic regression on ``design`` (age, log count, male)."""
    return _repeated_cv(design, labels, n_splits, n_repeats, seed)


def combined_oracle(design: np.ndarray, witness_fraction: np.ndarray, labels: np.ndarray,
                    n_splits: int = 5, n_repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """The same CV (same folds) as :func:`clinical_only` with the true witness fraction beside
    the clinical attributes: what a model that read every cell right and fused it with the
    clinical data could reach. Its gain over clinical-only is the room the images leave."""
    return _repeated_cv(_with_witness_fraction(design, witness_fraction), labels, n_splits,
                        n_repeats, seed)


def _with_witness_fraction(design: np.ndarray, witness_fraction) -> np.ndarray:
    return np.column_stack([design, np.asarray(witness_fraction, dtype=float)])


def _repeated_cv(design: np.ndarray, labels: np.ndarray, n_splits: int, n_repeats: int,
                 seed: int) -> dict[str, float]:
    labels = np.asarray(labels, dtype=int)
    n_splits = min(n_splits, int(np.bincount(labels, minlength=2).min()))
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    predicted = np.empty((n_repeats, labels.size), dtype=int)
    for index, (train, val) in enumerate(splitter.split(design, labels)):
        model = _clinical_model().fit(design[train], labels[train])
        predicted[index // n_splits, val] = model.predict(design[val])
    scores = [balanced_accuracy_score(labels, row) for row in predicted]
    return {"cv_balanced_accuracy_mean": float(np.mean(scores)),
            "cv_balanced_accuracy_std": float(np.std(scores, ddof=1)) if n_repeats > 1 else 0.0,
            "n_splits": n_splits, "n_repeats": n_repeats}


def best_threshold(score: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(balanced accuracy, threshold)`` of the best rule ``score >= threshold`` → positive."""
    score, labels = np.asarray(score, dtype=float), np.asarray(labels, dtype=int)
    candidates = np.unique(score)
    best = (-1.0, float(candidates[0]))
    for threshold in candidates:
        value = balanced_accuracy_score(labels, (score >= threshold).astype(int))
        if value > best[0]:
            best = (float(value), float(threshold))
    return best


def cohort_difficulty(root: str | os.PathLike, n_repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """The difficulty figures of the challenge folder ``root`` (oracles only with ``truth/``)."""
    from milbench.data import load_challenge
    from milbench.synth.layout import AGE_REFERENCE_DATE

    root = Path(root)
    cohort = load_challenge(root, AGE_REFERENCE_DATE)
    train = cohort.train()
    design = clinical_design_matrix(train.clinical_table().to_numpy(dtype=float))
    clinical = clinical_only(design, train.labels(), n_repeats=n_repeats, seed=seed)
    figures: dict[str, Any] = {"clinical_only": clinical,
                               "patients": {"train": len(train), "test": len(cohort.test())}}
    truth = root / "truth"
    if not (truth / "patients.csv").is_file():
        return figures
    patients = pd.read_csv(truth / "patients.csv", dtype={"patient_id": str})
    instances = pd.read_csv(truth / "instances.csv", dtype={"patient_id": str})
    by_id = patients.set_index("patient_id")
    witness = by_id.loc[train.ids, "witness_fraction"].to_numpy()
    combined = combined_oracle(design, witness, train.labels(), n_repeats=n_repeats, seed=seed)
    test = cohort.test()
    if len(test):
        true_test = by_id.loc[test.ids, "label"].to_numpy()
        test_design = clinical_design_matrix(test.clinical_table().to_numpy(dtype=float))
        for figure, train_design, held_out in (
                (clinical, design, test_design),
                (combined, _with_witness_fraction(design, witness),
                 _with_witness_fraction(test_design, by_id.loc[test.ids, "witness_fraction"]))):
            model = _clinical_model().fit(train_design, train.labels())
            figure["hidden_test_balanced_accuracy"] = float(
                balanced_accuracy_score(true_test, model.predict(held_out)))
    figures["combined_oracle"] = combined

    upper, _ = best_threshold(patients["witness_fraction"], patients["label"])
    is_train = patients["split"] == "train"
    oracle = {"best_threshold_balanced_accuracy": upper}
    if (~is_train).any():
        _, threshold = best_threshold(patients.loc[is_train, "witness_fraction"],
                                      patients.loc[is_train, "label"])
        held_out = patients.loc[~is_train]
        oracle["train_threshold"] = threshold
        oracle["test_balanced_accuracy"] = float(balanced_accuracy_score(
            held_out["label"], (held_out["witness_fraction"] >= threshold).astype(int)))
    figures["oracle_bag"] = oracle
    figures["oracle_instance_auc"] = (float(roc_auc_score(instances["atypical"], instances["atypia"]))
                                      if instances["atypical"].nunique() == 2 else None)
    tumoral = patients.loc[patients["label"] == 1, "witness_fraction"]
    figures["witness_fraction_tumoral"] = {
        "median": float(tumoral.median()), "p10": float(tumoral.quantile(0.1)),
        "share_under_0.05": float((tumoral < 0.05).mean()),
    }
    reactive = patients.loc[patients["label"] == 0, "witness_fraction"]
    figures["witness_fraction_reactive"] = {"median": float(reactive.median()),
                                            "max": float(reactive.max())}
    figures["labels_flipped"] = int(patients["label_flipped"].sum())
    figures["site_mix"] = {
        split: {str(site): {"patients": int(len(group)), "tumoral": int(group["label"].sum())}
                for site, group in frame.groupby("site")}
        for split, frame in patients.groupby("split")
    }
    return figures
