from pathlib import Path

import pytest
import yaml

from t3d.config import ConfigError, PretrainConfig, load_config, parse_overrides, save_config, to_dict


def test_defaults_and_dotted_overrides(tmp_path):
    cfg = load_config(PretrainConfig, None, ["--train.lr", "1e-3", "--crops.size=[32,48,64]", "--method", "vssl"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.crops.size == (32, 48, 64)
    assert cfg.method == "vssl"


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.5, "steps": 7}, "preprocess": {"spacing": "native"}}))
    cfg = load_config(PretrainConfig, path, ["--train.steps", "9"])
    assert cfg.train.lr == 0.5 and cfg.train.steps == 9
    assert cfg.preprocess.spacing is None


def test_unknown_key_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rate'.*valid keys.*\blr\b"):
        load_config(PretrainConfig, None, ["--train.learning_rate", "1"])
    with pytest.raises(ConfigError, match="valid keys at the top level"):
        load_config(PretrainConfig, None, ["--nope", "1"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(PretrainConfig, None, ["--train.steps", "many"])
    with pytest.raises(ConfigError, match="method"):
        load_config(PretrainConfig, None, ["--method", "simclr"])
    with pytest.raises(ConfigError, match="crops.size"):
        load_config(PretrainConfig, None, ["--crops.size", "[4,4]"])
    with pytest.raises(ConfigError):
        parse_overrides(["--train.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["--crops.windows", "[[-160, 240], [-1000, 200]]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.crops.channels == 2


def test_every_config_file_loads():
    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    for path in files:
        load_config(PretrainConfig, path)


@pytest.mark.parametrize(
    "old, new", [("t3d-tiles", "use method t3d "), ("t3d-sentence-tiles", "use method t3d-sentence ")]
)
def test_renamed_methods_are_errors_that_name_the_new_method(old, new):
    with pytest.raises(ConfigError, match=f"{old}.*renamed.*{new}"):
        load_config(PretrainConfig, None, ["--method", old])
    assert load_config(PretrainConfig, None, ["--method", "t3d-crops"]).method == "t3d-crops"
