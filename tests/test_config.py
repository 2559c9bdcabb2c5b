from pathlib import Path

import pytest
import yaml

from urd.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.dataset.name == "demo"
    assert params.dataset.image_size % 32 == 0


def test_the_schema_defaults_are_the_embedded_default(tmp_path):
    # A params file that names only the dataset trains what `make demo` trains.
    short = tmp_path / "params.yaml"
    short.write_text(yaml.safe_dump({"dataset": {"root": "data/raw/demo", "categories": ["tiles", "widget"]}}))
    shipped = load_params(REPO / "params.yaml").model_dump(exclude={"synthesis": {"foreground"}})
    assert load_params(short).model_dump(exclude={"synthesis": {"foreground"}}) == shipped
    p = Params()
    assert (p.model.backbone, p.model.weights, p.model.expert, p.dataset.image_size, p.train.iterations) == (
        "efficientnet_lite0", "imagenet", False, 96, 300)
    # the paper's optimiser and synthesis
    assert (p.train.lr_student, p.train.lr_teacher, p.train.betas) == (0.005, 0.0001, (0.5, 0.999))
    assert p.model.gii == "gii" and p.synthesis.beta_range == (0.15, 1.0)


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        ({"train": {"iterations": "many"}}, "train.iterations", "valid integer"),
        ({"model": {"backbone": "resnet19"}}, "model.backbone", "'wide_resnet50_2'"),
        ({"train": {"lr_teachr": 0.1}}, "train.lr_teachr", "lr_teacher"),
        ({"dataset": {"image_size": 100}}, "dataset.image_size", "multiple of 32"),
        ({"model": {"gii": "yes"}}, "model.gii", "'skip'"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"synthesis": {"beta_range": [0.9, 0.1]}}, "synthesis.beta_range", "lo <= hi"),
        ({"model": {"expert": True, "denoising": False}}, "model", "denoising: true"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(raw, key, hint):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert key in message and hint in message
    assert "Traceback" not in message


def test_per_category_override_is_merged_and_validated():
    params = parse_params({"dataset": {"categories": ["a", "b"]}, "overrides": {"b": {"train": {"iterations": 7}}}})
    assert params.for_category("b").train.iterations == 7
    assert params.for_category("a").train.iterations == params.train.iterations
    assert params.for_category("b").train.batch_size == params.train.batch_size
    with pytest.raises(ConfigError, match="Unknown category 'c'"):
        params.for_category("c")


def test_bad_override_is_refused_with_its_path():
    with pytest.raises(ConfigError) as err:
        parse_params({"dataset": {"categories": ["a"]}, "overrides": {"a": {"train": {"iterations": -1}}}})
    assert "overrides.a" in str(err.value) and "train.iterations" in str(err.value)


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"train": {"iterations": 3}}))
    assert load_params(ok).train.iterations == 3
