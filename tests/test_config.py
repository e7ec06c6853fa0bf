import pytest

from ftdeploy.config import load_config
from ftdeploy.errors import ConfigError


def test_the_shipped_configs_validate():
    from conftest import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epocs' \(allowed here: epochs, mode,"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(None, ["trian.epochs=3"])


def test_bad_values_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"train.mixed_precision: Input should be 'no', 'fp16' or 'bf16' \(got 'fp8'\)"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.name=imagefolder"])


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=1e-4", "train.log_with=[tensorboard]", "data.root=/x", "preprocessing.mean=[0.1,0.2,0.3]"])
    assert cfg.train.lr == 1e-4 and cfg.train.log_with == ["tensorboard"]
    assert str(cfg.data.root) == "/x" and cfg.preprocessing.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match="not of the form section.field=value"):
        load_config(None, ["train.lr"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_text_field_gets_the_text_typed():
    """YAML reads `no` as False; mixed_precision is a choice of words, so it must stay 'no'."""
    cfg = load_config(None, ["train.mixed_precision=no", "model.weights=none", "data.name=digits",
                             "train.epochs=3", "export.output_dir=null"])
    assert cfg.train.mixed_precision == "no" and cfg.model.weights == "none"
    assert cfg.train.epochs == 3 and cfg.export.output_dir is None


def test_bilinear_interpolation_can_be_chosen_over_the_weights_default():
    from ftdeploy.preprocessing import resolve_preprocessing

    defaults = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": 32, "resize_size": 36, "interpolation": "bicubic"}
    chosen = load_config(None, ["preprocessing.interpolation=bilinear"]).preprocessing
    assert resolve_preprocessing(chosen, defaults).interpolation == "bilinear"
    assert resolve_preprocessing(load_config(None).preprocessing, defaults).interpolation == "bicubic"
