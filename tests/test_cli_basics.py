"""`qtoy list`, `qtoy plugins`, `qtoy config`, and that they need no torch."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qtoy_cli.main import cli


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, standalone_mode=False)
    return result


def _qtoy(*args, check=True):
    code = "import sys; from qtoy_cli.main import main; main(sys.argv[1:]); print('TORCH', 'torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=check)


def test_list_json_filters_by_kind_and_wildcard():
    out = json.loads(run("list", "attention", "*a*", "--json").output)
    assert {r["name"] for r in out} == {"quadratic", "bilinear", "softmax"}
    assert all(r["provider"] == "qtoy" and r["description"] for r in out)
    out = json.loads(run("list", "*linear", "--json").output)
    assert {(r["kind"], r["name"]) for r in out} == {("attention", "bilinear"), ("mlp", "bilinear")}


def test_plugins_lists_distributions_with_hooks():
    data = json.loads(run("plugins").output)
    qtoy = next(d for d in data if d["name"] == "qtoy")
    assert "register_attentions" in qtoy["hooks"] and qtoy["version"]


def test_config_resolves_and_validates():
    data = json.loads(run("config", "transformer_2L", "--attn", "softmax", "--set", "d_model=128",
                          "--set", "attention.bias=true").output)
    assert data["d_head"] == 32 and data["attention"] == {"name": "softmax", "bias": True}
    assert data["mlp"]["name"] == "bilinear"


@pytest.mark.parametrize("args, needle", [
    (["config", "--attn", "foo"], "Unknown attention 'foo'. Available: bilinear, quadratic, softmax"),
    (["config", "--set", "d_model=65"], "not divisible by n_head"),
    (["config", "attention_only_2L", "--mlp", "bilinear"], "use model_type 'transformer_2L'"),
    (["config", "--set", "nope"], "is not key=value"),
])
def test_bad_input_is_one_clear_message(args, needle):
    proc = _qtoy(*args, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_list_do_not_import_torch():
    assert "TORCH False" in _qtoy("list").stdout
    proc = _qtoy("--help", check=False)  # click exits after help; the import state shows in -X importtime
    assert proc.returncode == 0
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c",
                             "from qtoy_cli.main import main; main(['--help'])"], capture_output=True, text=True)
    assert " torch" not in timing.stderr.replace("torchvision", "")
