"""Typed configs: YAML round trip, error texts, keyword construction."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from cmsmlkit.config import (
    ConvertConfig,
    PipelineConfig,
    SkimConfig,
    TrainConfig,
    build_config,
    config_hash,
    load_config,
    validate,
)
from cmsmlkit.errors import ConfigError

DEMO_YAML = resources.files("cmsmlkit") / "resources" / "demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_demo_pipeline_loads_and_round_trips():
    text = DEMO_YAML.read_text()
    cfg = load_config(DEMO_YAML)
    assert cfg.skim.selection.objects["GoodJet"].from_ == "Jet"
    assert cfg.convert.collections["GoodJet"].max_len == 6
    assert cfg.source.datasets["ttbar"].label == "signal"
    # dumped YAML is the same mapping as the file, and loads into an equal config
    assert yaml.safe_load(cfg.to_yaml()) == yaml.safe_load(text)
    again = PipelineConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict(full=True) == cfg.to_dict(full=True)


def test_full_dump_has_every_default_and_reloads_equal():
    cfg = PipelineConfig(train=TrainConfig(inputs=["a.h5"]))
    full = yaml.safe_load(cfg.to_yaml(full=True))
    assert full["train"]["max_epochs"] == 20
    assert full["train"]["model"]["hidden"] == [64, 64]
    assert full["cluster"]["type"] == "local"
    assert PipelineConfig.model_validate(full) == cfg


def test_unknown_key_names_file_path_and_closest_key(tmp_path):
    path = write(tmp_path, "train:\n  model:\n    hiden: [32]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "'train.model.hiden'" in text
    assert "Did you mean 'hidden'?" in text


def test_unknown_key_inside_a_dict_of_models(tmp_path):
    path = write(
        tmp_path,
        "skim:\n  selection:\n    objects:\n      GoodJet: {form: Jet, where: 'pt > 30'}\n",
    )
    with pytest.raises(
        ConfigError, match=r"skim\.selection\.objects\.GoodJet\.form'\. Did you mean 'from'\?"
    ):
        load_config(path)


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "trian:\n  max_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'\. Did you mean 'train'\?"):
        load_config(path)


def test_wrong_type_names_the_expected_type(tmp_path):
    path = write(tmp_path, "train:\n  max_epochs: three\n  model: {dropout: high}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "'train.max_epochs' must be an integer (got 'three', a str)" in text
    assert "'train.model.dropout' must be a number (got 'high', a str)" in text


def test_literal_choices_are_listed(tmp_path):
    path = write(tmp_path, "cluster: {type: condor}\n")
    with pytest.raises(
        ConfigError,
        match=r"'cluster.type' must be one of 'local', 'slurm', 'htcondor' or 'address'",
    ):
        load_config(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "source:\n  datasets:\n    tt: {files: a.root}\n")
    with pytest.raises(ConfigError, match=r"missing required key 'source.datasets.tt.label'"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, "train:\n  max_epochs: 3\n  max_epochs: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'max_epochs' at line 3"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_keywords_override_config_and_are_validated():
    base = TrainConfig(max_epochs=3)
    cfg = build_config(TrainConfig, base, {"learning_rate": 0.01})
    assert (cfg.max_epochs, cfg.learning_rate) == (3, 0.01)
    with pytest.raises(ConfigError, match=r"unknown key 'max_epoch'\. Did you mean 'max_epochs'\?"):
        build_config(TrainConfig, None, {"max_epoch": 3})


def test_section_from_a_yaml_file(tmp_path):
    path = write(tmp_path, "convert: {output: x.h5, compression: gzip}\n")
    assert ConvertConfig.from_yaml(path, section="convert").compression == "gzip"
    with pytest.raises(ConfigError, match="no 'skim:' section"):
        SkimConfig.from_yaml(path, section="skim")


def test_cross_field_check_on_split_fractions():
    with pytest.raises(ConfigError, match="leaves less than 10% for training"):
        validate(TrainConfig, {"val_fraction": 0.5, "test_fraction": 0.45})


def test_assignment_is_validated():
    cfg = TrainConfig()
    with pytest.raises(Exception, match="max_epochs"):
        cfg.max_epochs = "many"


def test_config_hash_follows_content():
    a, b = TrainConfig(max_epochs=3), TrainConfig(max_epochs=3)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(TrainConfig(max_epochs=4))
    assert config_hash(a, None) != config_hash(a)


def test_repr_shows_the_fields_that_matter():
    assert "max_epochs=3" in repr(TrainConfig(max_epochs=3))
