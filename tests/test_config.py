"""Run configs: YAML + overrides, strict validation with messages naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from milbench.config import ConfigError, load_config, resolved_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_validate(path):
    config = load_config(path)
    assert config.models and config.evaluation.n_splits >= 2


def test_overrides_parse_yaml_values_and_index_lists():
    config = load_config(CONFIGS / "clinical.yaml", [
        "evaluation.n_repeats=2", "seed=7", "models.1.params.max_depth=5", "data.root=/data/x"])
    assert config.evaluation.n_repeats == 2 and config.seed == 7
    assert config.models[1].params["max_depth"] == 5
    assert config.data.root == "/data/x"
    assert resolved_dict(config)["data"]["reference_date"] == "2021-01-01"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluation.n_folds=3"], r"evaluation.n_folds: Extra inputs are not permitted"),
        (["evaluation.n_splits=1"], r"evaluation.n_splits: Input should be greater than or equal to 2"),
        (["models=[]"], r"models: List should have at least 1 item"),
        (["models.5.name=x"], r"'5' is not an index of a 2-item list"),
        (["seed"], r"must look like key.sub=value"),
        (["models=[{name: clinical_logreg}, {name: clinical_logreg}]"],
         r"repeated: \['clinical_logreg'\]"),
        (["models=[{name: dmill}]"], r"models.0: Value error, unknown model 'dmill'; registered models"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "clinical.yaml", overrides)


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_extractor_names_resolve_to_their_mapping(tmp_path):
    config = load_config(CONFIGS / "clinical.yaml", ["features.extractor=resnet18"])
    assert config.features.extractor["kind"] == "backbone"
    assert config.features.extractor["name"] == "resnet18"
    assert config.features.source.endswith("configs/features/resnet18.yaml")
    custom = tmp_path / "mine.yaml"
    custom.write_text("kind: backbone\nname: vgg19\ninput_size: 64\n")
    assert load_config(CONFIGS / "clinical.yaml", [f"features.extractor={custom}"]).features.extractor == {
        "kind": "backbone", "name": "vgg19", "input_size": 64}
    with pytest.raises(ConfigError, match=r"'nope': no such file, and not one of \[.*'resnet18'"):
        load_config(CONFIGS / "clinical.yaml", ["features.extractor=nope"])


def test_a_bare_model_name_is_a_spec_at_the_defaults_wherever_a_spec_is_read(tmp_path):
    config_path = tmp_path / "bare.yaml"
    config_path.write_text("name: bare\ndata: {root: null, synthetic: {preset: tiny, seed: 0}}\n"
                           "models: [clinical_logreg, {name: clinical_xgb},\n"
                           "  {name: voting, params: {members: [clinical_logreg, clinical_xgb]}}]\n")
    config = load_config(config_path)
    assert [(m.name, m.params) for m in config.models[:2]] == [("clinical_logreg", {}),
                                                                 ("clinical_xgb", {})]
    assert config.models[2].params["members"] == ["clinical_logreg", "clinical_xgb"]
    with pytest.raises(ConfigError, match=r"models\.0: .*unknown model 'misvmm'"):
        load_config(config_path, ["models.0=misvmm"])
