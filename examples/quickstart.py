"""milbench from a notebook: run a config, read the results, reload a saved model and predict.

    python examples/quickstart.py            # the tiny generated cohort: about a minute on CPU

The same calls work on the real challenge folder: ``milbench.run(config, data="/path/to/challenge")``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import milbench
from milbench.config import load_config
from milbench.preparation import prepare_data

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml"


def main(workdir: Path) -> None:
    overrides = [
        "data.synthetic.preset=tiny", f"workdir={workdir}", "submission.enabled=false",
        "evaluation.n_splits=2",
        "features.extractor={kind: backbone, name: resnet18, weights: null, input_size: 32}",
        "models=[{name: clinical_logreg}, {name: dmil, params: {max_epochs: 5, validation_fraction: 0}}]",
    ]
    # 1. Train and evaluate: cross-validation, refit on all training patients, saved models.
    result = milbench.run(CONFIG, overrides=overrides)
    print(result.metrics[["model", "balanced_accuracy", "hidden_test_balanced_accuracy"]])
    print(result.comparisons[["model", "reference", "mean_difference", "ci_low", "ci_high"]])

    # 2. Another day: reload the saved model and predict bags (here the run's own test patients).
    model = milbench.load_model(result.run_dir, "dmil")
    config = load_config(CONFIG, overrides)
    data = prepare_data(config, progress=False)  # cached: the run's own features
    test_bags = data.bags_for(config.models[1])[1]
    probabilities = model.predict_proba(test_bags, data.test_clinical)[:, 1]
    written = result.test_predictions("dmil")["score"].to_numpy()
    assert (probabilities == written).all(), "a reloaded model predicts what the run wrote"
    print(f"reloaded dmil: P(tumoral) of {len(test_bags)} test patients", probabilities.round(3))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="milbench-quickstart-") as folder:
        main(Path(folder))
