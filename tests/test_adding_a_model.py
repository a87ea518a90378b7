"""docs/adding-a-model.md, followed to the letter: its model (read from the page) is registered
as a plug-in, runs in the contract suite and in a run next to the clinical baseline."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from recipe_model import NAME, recipe_code, recipe_model_class, register_recipe_model

from milbench.config import load_config
from milbench.models import Tag, model_tags, unregister_model
from milbench.models.base import tags_of

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def registered():
    """Step 3, the plug-in way; undone afterwards unless the contract suite registered it."""
    from milbench.models import list_models

    already = NAME in list_models()
    if not already:
        register_recipe_model()
    yield NAME
    if not already:
        unregister_model(NAME)


def test_the_pages_model_declares_its_tags_in_one_place(registered):
    cls = recipe_model_class()
    assert "mil_tags = frozenset({Tag.INSTANCES, Tag.INSTANCE_SCORES})" in recipe_code()
    assert model_tags(registered) == cls.mil_tags == {Tag.INSTANCES, Tag.INSTANCE_SCORES}
    assert tags_of(cls()) == {Tag.INSTANCES, Tag.INSTANCE_SCORES}


def test_the_contract_suite_runs_the_pages_model():
    import test_model_contract

    assert test_model_contract.CASES[NAME] == (NAME, {})


def test_a_bad_parameter_is_named_when_the_config_loads(registered, tmp_path):
    from milbench.config import ConfigError

    with pytest.raises(ConfigError, match=f"model '{NAME}': unknown parameter 'c'"):
        load_config(CONFIGS / "pipeline.yaml", [f"models=[clinical_logreg, {{name: {NAME}, "
                                                 "params: {c: 1}}]"])


@pytest.mark.e2e
def test_the_pages_model_runs_beside_the_baseline(registered, tmp_path):
    from milbench.pipeline import run_pipeline

    config = load_config(CONFIGS / "pipeline.yaml", [
        f"models=[clinical_logreg, {NAME}, {{name: {NAME}, label: maxpool_c10, params: {{C: 10}}}}]",
        "features.extractor={kind: pixels, input_size: 8}", "data.synthetic.preset=tiny",
        "evaluation.n_splits=2", "evaluation.n_repeats=1", "execution.jobs=1",
        f"workdir={tmp_path / 'work'}", f"submission.dir={tmp_path / 'subs'}"])
    outcome = run_pipeline(config, progress=False)
    assert list(outcome.table["model"]) == ["clinical_logreg", NAME, "maxpool_c10"]
    compared = outcome.comparisons.set_index("model")
    assert compared.loc[NAME, "reference"] == "clinical_logreg"
    predictions = pd.read_csv(outcome.run_dir / "models" / NAME / "test_predictions.csv")
    assert predictions["score"].between(0, 1).all() and len(predictions) > 0
