"""Instance-level report views: score/image alignment, instance AUC against the synthetic truth,
montages, and the run report's new figures (a tiny synthetic run with stand-in features)."""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench import pipeline, plots, preparation
from milbench.config import RunConfig
from milbench.data import Cohort
from milbench.data.cohort import Patient
from milbench.instances import (
    instance_auc,
    join_truth,
    montage_patients,
    score_table,
    spread,
    within_bag_auc,
)
from milbench.synth import generate_cohort, load_truth


def patient(pid: str, names: list[str], split: str = "test", label: int | None = None) -> Patient:
    folder = Path("/cohort") / split / pid
    return Patient(id=pid, split=split, label=label, gender="F", dob=date(1950, 1, 1), age=70.0,
                   lymph_count=10.0, image_paths=tuple(folder / name for name in names))


@pytest.fixture
def cohort_and_truth():
    # P2's 000001.jpg was skipped by the loader: its bag has two rows, the truth lists three images.
    cohort = Cohort(Path("/cohort"), [patient("P1", ["000000.jpg", "000001.jpg", "000002.jpg"]),
                                      patient("P2", ["000000.jpg", "000002.jpg"])], date(2021, 1, 1))
    truth = pd.DataFrame({
        "patient_id": ["P1", "P1", "P1", "P2", "P2", "P2"],
        "image": ["000000.jpg", "000001.jpg", "000002.jpg", "000000.jpg", "000001.jpg", "000002.jpg"],
        "split": "test", "atypical": [0, 1, 0, 0, 0, 1], "variant": "x",
    })
    return cohort, truth


def test_auc_matches_scores_to_their_own_images(cohort_and_truth):
    cohort, truth = cohort_and_truth
    # High scores exactly on the atypical images (P1 row 1, P2 row 1 = 000002.jpg).
    scores = [np.array([0.1, 0.9, 0.2]), np.array([0.3, 0.8])]
    table = join_truth(score_table(cohort, scores), truth)
    assert table["atypical"].tolist() == [0, 1, 0, 0, 1]
    assert table["path"].tolist()[-1] == "/cohort/test/P2/000002.jpg"
    assert instance_auc(table) == 1.0 and within_bag_auc(table) == 1.0
    # The truth table's own row order does not matter: it is joined by (patient, file name).
    shuffled = truth.sample(frac=1, random_state=0)
    assert instance_auc(join_truth(score_table(cohort, scores), shuffled)) == 1.0
    # A bag whose images come in another order, with its scores in that order: same answer.
    permuted = Cohort(cohort.root, [patient("P1", ["000002.jpg", "000000.jpg", "000001.jpg"]),
                                    cohort.patients[1]], cohort.reference_date)
    assert instance_auc(join_truth(score_table(permuted, [np.array([0.2, 0.1, 0.9]), scores[1]]),
                                   truth)) == 1.0
    # Scores that do not follow their images (shifted within the bags): the AUC drops.
    shifted = [np.array([0.9, 0.2, 0.1]), np.array([0.8, 0.3])]
    assert instance_auc(join_truth(score_table(cohort, shifted), truth)) == pytest.approx(2 / 6)


def test_misaligned_scores_and_unknown_images_raise(cohort_and_truth):
    cohort, truth = cohort_and_truth
    with pytest.raises(ValueError, match="P2: \\(3,\\) instance scores for 2 images"):
        score_table(cohort, [np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="2 bags of instance scores for 3 patients"):
        score_table(Cohort(Path("/c"), [*cohort.patients, patient("P3", ["a.jpg"])], date(2021, 1, 1)),
                    [np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="not in the truth table"):
        join_truth(score_table(cohort, [np.zeros(3), np.zeros(2)]), truth[truth["patient_id"] == "P1"])


def test_auc_is_nan_with_one_class(cohort_and_truth):
    cohort, truth = cohort_and_truth
    table = join_truth(score_table(cohort, [np.zeros(3), np.zeros(2)]), truth.assign(atypical=0))
    assert math.isnan(instance_auc(table)) and math.isnan(within_bag_auc(table))


def test_montage_patients_are_deterministic_and_spread():
    assert spread(3, 12) == [0, 1, 2] and spread(10, 3) == [0, 4, 9]
    ids = [f"T{i}" for i in range(20)]
    scores = np.linspace(0, 1, 20)
    train = Cohort(Path("/c"), [patient(f"P{i}", ["a.jpg"], "train", i % 2) for i in range(9)],
                   date(2021, 1, 1))
    chosen_test, chosen_train = montage_patients(ids, scores, train, max_test=4, train_per_class=2)
    assert chosen_test == ["T19", "T13", "T6", "T0"]  # highest to lowest bag score, ends included
    assert chosen_train == ["P1", "P7", "P0", "P8"]
    assert montage_patients(ids, scores, train, max_test=4) == (chosen_test, chosen_train)


def test_montage_figure_has_one_row_per_patient():
    image = np.zeros((8, 8, 3), np.uint8)
    cell = plots.MontageCell
    rows = [plots.MontageRow("P1", [cell(image, 0.5, True), cell(image, 0.1, None)]),
            plots.MontageRow("P2", [cell(image, 0.2, False)])]
    figure = plots.instance_montage(rows, "title\nsecond line", n_columns=3)
    assert len(figure.axes) == 6
    assert [a.get_ylabel() for a in figure.axes[::3]] == ["P1", "P2"]
    assert figure.axes[0].spines["top"].get_visible() and not figure.axes[1].spines["top"].get_visible()
    assert not figure.axes[2].axison and not figure.axes[4].axison


class TruthFeatures:
    """Stand-in feature store: feature 0 is the image's atypical flag plus noise, found by file
    name (as the real store finds rows by path), so instance scores can recover the truth."""

    manifest = {"config": {"kind": "backbone", "name": "truth-stand-in"}, "dim": 3}

    def __init__(self, root: Path):
        instances = load_truth(root).instances
        self.flags = {(p, i): a for p, i, a in zip(instances["patient_id"], instances["image"],
                                                   instances["atypical"], strict=True)}

    def bags(self, cohort: Cohort) -> list[np.ndarray]:
        rng = np.random.default_rng(len(cohort))
        return [np.column_stack([[self.flags[(p.id, path.name)] for path in p.image_paths],
                                 rng.normal(0, 0.1, (p.n_images, 2))]) + rng.normal(0, 0.05, (p.n_images, 3))
                for p in cohort.patients]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    root = generate_cohort(work / "data" / "synthetic-tiny-seed0", preset="tiny", seed=0, workers=1,
                           progress=False)
    config = RunConfig.model_validate({
        "name": "tiny", "workdir": str(work), "data": {"synthetic": {"preset": "tiny"}},
        "features": {"extractor": {"kind": "backbone", "name": "resnet18", "input_size": 32}},
        "evaluation": {"n_splits": 2, "n_repeats": 1},
        "models": [{"name": "clinical_logreg"}, {"name": "misvm"},
                   {"name": "dmil", "params": {"max_epochs": 3}}],
        "submission": {"enabled": False},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preparation, "feature_store",
                      lambda cohort, extractor, config, progress=True, map_tasks=None: TruthFeatures(root))
        outcome = pipeline.run_pipeline(config, progress=False)
    return outcome


@pytest.mark.e2e
def test_run_writes_montages_and_instance_auc(tiny_run):
    run = tiny_run.run_dir
    for name in ("misvm", "dmil"):
        assert (run / "plots" / f"top_instances_{name}.png").stat().st_size > 10_000
        scores = pd.read_csv(run / "models" / name / "instance_scores.csv")
        assert set(scores.columns) >= {"patient_id", "image", "score", "atypical"}
    assert not (run / "plots" / "top_instances_clinical_logreg.png").exists()
    auc = pd.read_csv(run / "instance_auc.csv").set_index("model")
    assert list(auc.index) == ["clinical_logreg", "misvm", "dmil"]
    assert math.isnan(auc.loc["clinical_logreg", "instance_auc"])
    test_images = pd.read_csv(run / "cohort" / "patients.csv").query("split == 'test'")["n_images"].sum()
    assert auc["n_images"].dropna().eq(test_images).all()
    assert f",{test_images}," in (run / "instance_auc.csv").read_text()  # counts written as integers
    assert auc.loc[["misvm", "dmil"], "instance_auc"].between(0, 1).all()
    # Feature 0 is the truth: a witness SVM that read the right rows ranks atypical images first.
    assert auc.loc["misvm", "instance_auc"] > 0.9
    metrics = pd.read_csv(run / "metrics.csv").set_index("model")
    assert metrics.loc["misvm", "instance_auc"] == auc.loc["misvm", "instance_auc"]
    assert math.isnan(metrics.loc["clinical_logreg", "instance_auc"])


@pytest.mark.e2e
def test_report_links_every_figure(tiny_run):
    run = tiny_run.run_dir
    report = (run / "report.md").read_text()
    links = [part.split(")")[0] for part in report.split("](")[1:]]
    assert {"plots/top_instances_misvm.png", "plots/top_instances_dmil.png", "plots/bag_sizes_by_class.png",
            "plots/oof_scores_by_class.png", "plots/clinical_by_class.png"} <= set(links)
    for link in links:
        assert (run / link).stat().st_size > 1000, link
    assert "instance_auc" in report and "| –" in report
