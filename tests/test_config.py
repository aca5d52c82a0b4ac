"""ModelConfig: validation before any tensor, JSON round trip, the seed's loading recipe."""

import json
import sys

import pytest
from pydantic import ValidationError

from qtoy_core import ModelConfig, make_model_config, parse_model_type
from qtoy_core.errors import format_validation_error
from qtoy_core.overrides import OverrideError, apply_overrides


@pytest.mark.parametrize("model_type, expected", [
    ("attention_only_1L", (1, False)), ("attention_only_2L", (2, False)),
    ("transformer_1L", (1, True)), ("transformer_2L", (2, True)), ("transformer_12L", (12, True)),
])
def test_model_types_parse(model_type, expected):
    assert parse_model_type(model_type) == expected
    config = ModelConfig(model_type=model_type)
    assert (config.n_layers, config.has_mlp) == expected
    assert config.mlp.name == ("bilinear" if expected[1] else "none")


@pytest.mark.parametrize("bad, needle", [
    ({"model_type": "transformer_0L"}, "does not parse"),
    ({"model_type": "gpt2"}, "does not parse"),
    ({"d_model": 65}, "not divisible by n_head"),
    ({"d_model": 60, "n_head": 2, "d_head": 15}, "rope needs an even d_head"),
    ({"vocab_size": 0}, "greater than 0"),
    ({"n_ctx": -1}, "greater than 0"),
    ({"dropout": 1.5}, "less than 1"),
    ({"attention": "foo"}, "Unknown attention 'foo'. Available: bilinear, quadratic, softmax"),
    ({"attention": {"name": "quadratic", "impl": "fast"}}, "attention.impl"),
    ({"attention": {"name": "quadratic", "typo": 1}}, "attention.typo"),
    ({"model_type": "attention_only_2L", "mlp": "bilinear"}, "use model_type 'transformer_2L'"),
    ({"model_type": "transformer_1L", "mlp": "none"}, "use model_type 'attention_only_1L'"),
    ({"d_modle": 64}, "d_modle: unknown option"),
    ({"norm": 3}, "given as a name"),
])
def test_invalid_configs_are_refused_with_a_clear_message(bad, needle):
    with pytest.raises(ValidationError) as info:
        ModelConfig(**bad)
    assert needle in format_validation_error(info.value)


def test_validation_happens_before_torch_is_needed():
    # Config validation is pure pydantic + registry: it must not need torch at all.
    import subprocess

    code = ("import sys, qtoy_core\n"
            "try:\n    qtoy_core.ModelConfig(attention='nope')\nexcept Exception:\n    pass\n"
            "qtoy_core.ModelConfig(model_type='transformer_2L')\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_json_round_trip_is_exact(tmp_path):
    config = make_model_config("transformer_2L", attn={"name": "bilinear", "bias": True}, pos="learned",
                               norm="rmsnorm", d_model=96, n_head=3, d_mlp=200, vocab_size=321, dropout=0.1)
    text = config.model_dump_json()
    again = ModelConfig.model_validate_json(text)
    assert again == config and again.model_dump_json() == text
    path = tmp_path / "config.json"
    path.write_text(text)
    with open(path) as f:
        assert ModelConfig(**json.load(f)) == config  # the seed's loading recipe
    assert again.attention.bias is True and again.norm.eps == 1e-6


def test_run_document_loads_as_model_config():
    config = make_model_config("attention_only_2L", d_model=64)
    doc = {"format": "qtoy-model/1", "model": config.model_dump(mode="json"), "train": {"lr": 1}, "data": {}}
    assert ModelConfig(**doc) == config


def test_make_model_config_aliases_and_mlp_selects_transformer():
    config = make_model_config(attn="softmax", mlp="bilinear")
    assert config.model_type == "transformer_1L" and config.attention.name == "softmax"
    assert make_model_config(mlp="none").model_type == "attention_only_1L"
    assert make_model_config("transformer_2L", attn="quadratic").d_head == 64
    with pytest.raises(ValueError, match="given twice"):
        make_model_config(attn="softmax", attention="quadratic")


@pytest.mark.parametrize("given, model_type, mlp", [
    ({}, "attention_only_1L", "none"),
    ({"model_type": "transformer_3L"}, "transformer_3L", "bilinear"),
    ({"mlp": "gelu"}, "transformer_1L", "gelu"),
    ({"mlp": {"name": "bilinear", "bias": True}}, "transformer_1L", "bilinear"),
    ({"mlp": "none"}, "attention_only_1L", "none"),
])
def test_model_type_and_mlp_follow_one_rule_everywhere(given, model_type, mlp):
    """ModelConfig, make_model_config and the CLI's run assembly resolve the pair the same way."""
    from qtoy_core.training.config import assemble_run_config

    flat = {k: v for k, v in given.items() if isinstance(v, str)}
    configs = [ModelConfig(**given), make_model_config(**given), assemble_run_config({"model": given}).model]
    if len(flat) == len(given):
        configs.append(assemble_run_config({}, flat).model)  # as flags: --model-type / --mlp
    assert {(c.model_type, c.mlp.name) for c in configs} == {(model_type, mlp)}


def test_a_contradiction_of_model_type_and_mlp_is_one_message_everywhere():
    from qtoy_core.training.config import ConfigFileError, assemble_run_config

    given = {"model_type": "attention_only_2L", "mlp": "bilinear"}
    messages = []
    for build in (lambda: ModelConfig(**given), lambda: make_model_config(**given)):
        with pytest.raises(ValidationError) as info:
            build()
        messages.append(format_validation_error(info.value).split("\n", 1)[1].strip())
    with pytest.raises(ConfigFileError) as info:
        assemble_run_config({}, given)
    messages.append(str(info.value))
    assert len(set(messages)) == 1, messages
    assert "contradicts mlp 'bilinear'" in messages[0] and "use model_type 'transformer_2L'" in messages[0]


def test_polynomial_flag_follows_components():
    assert make_model_config("transformer_1L", attn="quadratic", mlp="bilinear", norm="none").is_polynomial
    assert not make_model_config(attn="softmax").is_polynomial
    assert not make_model_config(norm="rmsnorm").is_polynomial
    assert not make_model_config("transformer_1L", mlp="gelu").is_polynomial


def test_overrides_set_nested_options():
    data = apply_overrides({"attention": "quadratic"}, ["attention.impl=plain", "d_model=128", "dropout=0.1"])
    assert data == {"attention": {"name": "quadratic", "impl": "plain"}, "d_model": 128, "dropout": 0.1}
    with pytest.raises(OverrideError, match="key=value"):
        apply_overrides({}, ["d_model"])
