"""Instance-level views of a run's final models (refit on all training patients): the images each
model scores highest per patient (a montage), and, on synthetic cohorts, how well its instance
scores find the truly atypical images (instance-level ROC AUC on the test patients).

Alignment: bag ``b`` of a cohort holds one row per image of ``cohort.patients[b].image_paths``, in
that order (the feature store looks rows up by path), so instance ``i`` is image ``i`` of that
tuple. The synthetic truth is joined by (patient ID, file name), never by position, because the
loader may skip files and the truth table has its own order. Truth is read only after the final
models predicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from milbench import plots
from milbench.data import Cohort
from milbench.models.base import has_capability, take_bags
from milbench.models.registry import Tag
from milbench.runs import Run

if TYPE_CHECKING:  # pipeline imports this module
    from milbench.preparation import PreparedData

log = logging.getLogger(__name__)

TOP_K = 8  # images per patient in a montage
MAX_TEST_PATIENTS = 12  # test patients per montage (spread over the range of bag scores)
TRAIN_PATIENTS_PER_CLASS = 2  # labelled training patients added to each montage (in-sample)
THUMBNAIL = 64  # pixels; images are downscaled for the figure
AUC_COLUMNS = ["model", "instance_auc", "within_bag_auc", "n_patients", "n_images", "n_atypical"]


def has_instance_scores(model) -> bool:
    return has_capability(model, Tag.INSTANCE_SCORES)


def score_table(cohort: Cohort, scores: list[np.ndarray]) -> pd.DataFrame:
    """One row per image of ``cohort`` (patient_id, position, path, image, score), scores given
    per bag in ``cohort.patients`` order; a bag whose length differs from its image count raises."""
    if len(scores) != len(cohort):
        raise ValueError(f"{len(scores)} bags of instance scores for {len(cohort)} patients")
    for patient, bag_scores in zip(cohort.patients, scores, strict=True):
        if np.ndim(bag_scores) != 1 or len(bag_scores) != patient.n_images:
            raise ValueError(f"patient {patient.id}: {np.shape(bag_scores)} instance scores for "
                             f"{patient.n_images} images")
    table = cohort.image_table()
    table["image"] = [Path(p).name for p in table["path"]]
    table["score"] = np.concatenate([np.asarray(s, dtype=float) for s in scores]) if len(table) else []
    return table


def join_truth(table: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``table`` plus the truth's ``atypical`` flag, matched on (patient_id, image); an image the
    truth does not list raises."""
    flags = truth.loc[:, ["patient_id", "image", "atypical"]].astype({"patient_id": str, "image": str})
    joined = table.merge(flags, on=["patient_id", "image"], how="left", validate="many_to_one")
    missing = joined[joined["atypical"].isna()]
    if len(missing):
        raise ValueError(f"images not in the truth table: {missing['path'].head(5).tolist()}")
    return joined.astype({"atypical": int})


def instance_auc(table: pd.DataFrame) -> float:
    """ROC AUC of ``score`` against ``atypical`` over all rows; NaN when one class is absent."""
    if table["atypical"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(table["atypical"], table["score"]))


def within_bag_auc(table: pd.DataFrame) -> float:
    """Mean over patients (with both kinds of image) of the AUC within the patient's bag: what
    a per-bag ranking such as attention (weights sum to 1 per bag) is meant to get right."""
    values = [instance_auc(group) for _, group in table.groupby("patient_id", sort=False)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def montage_patients(test_ids: list[str], test_scores: np.ndarray, train: Cohort,
                     max_test: int = MAX_TEST_PATIENTS,
                     train_per_class: int = TRAIN_PATIENTS_PER_CLASS) -> tuple[list[str], list[str]]:
    """Deterministic rows of a montage: up to ``max_test`` test patients spread over the range of
    their bag scores, and ``train_per_class`` training patients of each class spread over the
    cohort order."""
    order = np.argsort(-np.asarray(test_scores, dtype=float), kind="stable")
    chosen_test = [test_ids[order[i]] for i in spread(len(test_ids), max_test)]
    chosen_train = []
    for label in (1, 0):
        ids = [p.id for p in train.patients if p.label == label]
        chosen_train += [ids[i] for i in spread(len(ids), train_per_class)]
    return chosen_test, chosen_train


@dataclass
class InstanceViews:
    """What :func:`write_instance_views` wrote: montage paths per model (run-relative) and, on
    synthetic cohorts, the instance AUC table (``instance_auc.csv``)."""

    montages: dict[str, str]
    auc: pd.DataFrame | None

    def add_to(self, table: pd.DataFrame) -> pd.DataFrame:
        """The metrics table with an ``instance_auc`` column (NaN for models without instance
        scores); unchanged without truth."""
        if self.auc is None:
            return table
        return table.assign(instance_auc=table["model"].map(self.auc.set_index("model")["instance_auc"]))


def _thumbnail(path: str) -> np.ndarray:
    from preprocessing.images import CorruptImageError, read_rgb, resize

    try:
        return resize(read_rgb(path), THUMBNAIL)
    except (OSError, CorruptImageError) as error:  # the figure must not cost the run
        log.warning("montage: cannot read %s (%s)", path, error)
        return np.full((THUMBNAIL, THUMBNAIL, 3), 200, np.uint8)


def _row(table: pd.DataFrame, caption: str, top_k: int) -> plots.MontageRow:
    top = table.iloc[np.argsort(-table["score"].to_numpy(), kind="stable")[:top_k]]
    atypical = top["atypical"].tolist() if "atypical" in top else [None] * len(top)
    cells = [plots.MontageCell(_thumbnail(path), float(score), flag)
             for path, score, flag in zip(top["path"], top["score"], atypical, strict=True)]
    return plots.MontageRow(caption, cells)


def _class_name(label) -> str:
    return {0: "reactive", 1: "tumoral"}.get(label, "?")


def _auc_row(name: str, table: pd.DataFrame) -> dict:
    return {"model": name, "instance_auc": instance_auc(table), "within_bag_auc": within_bag_auc(table),
            "n_patients": table["patient_id"].nunique(), "n_images": len(table),
            "n_atypical": int(table["atypical"].sum())}


def _montage(name: str, model, data: PreparedData, bags: tuple, test_table: pd.DataFrame,
             truth: pd.DataFrame | None, test_labels: dict[str, int], top_k: int):
    """The montage figure of one model: chosen test patients (by descending bag score), then the
    chosen training patients, scored in-sample. ``bags``: the (train, test) bags it reads."""
    all_train_bags, test_bags = bags
    bag_scores = model.predict_proba(test_bags, data.test_clinical)[:, 1]
    test_ids, train_ids = montage_patients(data.test.ids, bag_scores, data.train)
    score_of = dict(zip(data.test.ids, bag_scores, strict=True))
    shown_train = data.train.subset(train_ids)
    positions = [data.train.ids.index(pid) for pid in train_ids]
    train_bags = take_bags(all_train_bags, positions)
    train_clinical = data.train_clinical.iloc[positions]
    train_table = score_table(shown_train, model.instance_scores(train_bags, train_clinical))
    if truth is not None:
        train_table = join_truth(train_table, truth)
    score_of.update(zip(train_ids, model.predict_proba(train_bags, train_clinical)[:, 1], strict=True))
    rows = []
    for pid in sorted(test_ids, key=lambda p: -score_of[p]):
        truth_note = f"\ntruth {_class_name(test_labels.get(pid))}" if truth is not None else ""
        caption = f"{pid} · test\nscore {score_of[pid]:.2f}{truth_note}"
        rows.append(_row(test_table[test_table["patient_id"] == pid], caption, top_k))
    for patient in shown_train.patients:
        caption = (f"{patient.id} · train*\nscore {score_of[patient.id]:.2f}"
                   f"\nlabel {_class_name(patient.label)}")
        rows.append(_row(train_table[train_table["patient_id"] == patient.id], caption, top_k))
    title = (f"{name}: top {top_k} images per patient by instance score, final model (refit on all "
             f"training patients)\n{len(test_ids)} of {len(data.test)} test patients (by bag score), then "
             f"{len(train_ids)} training patients* (*in-sample: the model saw their labels)"
             + ("\nred frame: truly atypical image (synthetic truth)" if truth is not None else ""))
    return plots.instance_montage(rows, title, top_k)


def write_instance_views(run: Run, data: PreparedData, finals: dict, specs: dict,
                         top_k: int = TOP_K) -> InstanceViews:
    """For every final model with instance scores: ``models/<name>/instance_scores.csv`` (test
    patients' images) and the montage ``plots/top_instances_<name>.png``; on synthetic cohorts,
    ``instance_auc.csv`` (one row per final model, NaN without instance scores). ``specs``: each
    final model's spec, which says which features it reads."""
    truth_path = data.root / "truth" / "instances.csv"
    truth, test_labels = None, {}
    montages, rows = {}, []
    for name, model in finals.items():
        if not has_instance_scores(model) or not len(data.test):
            rows.append({"model": name})
            continue
        if truth is None and truth_path.is_file():  # read only once the models have predicted
            from milbench.synth import load_truth

            hidden = load_truth(data.root)
            truth, test_labels = hidden.instances, hidden.test_labels
        bags = data.bags_for(specs[name])
        test_table = score_table(data.test, model.instance_scores(bags[1], data.test_clinical))
        if truth is not None:
            test_table = join_truth(test_table, truth)
            rows.append(_auc_row(name, test_table))
        run.write_csv(f"models/{name}/instance_scores.csv", test_table)
        path = f"plots/top_instances_{name}.png"
        run.save_figure(path, _montage(name, model, data, bags, test_table, truth, test_labels,
                                       top_k))
        montages[name] = path
    auc = None
    if truth_path.is_file():
        counts = {column: "Int64" for column in AUC_COLUMNS[3:]}  # empty, not NaN floats, when unscored
        auc = pd.DataFrame(rows).reindex(columns=AUC_COLUMNS).astype(counts)
        run.write_csv("instance_auc.csv", auc)
    return InstanceViews(montages=montages, auc=auc)
