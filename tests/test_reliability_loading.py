"""Issue 8, checkpoints and safe loading: damaged, foreign or unloadable run folders give one clear
message through `ToyTransformer.from_pretrained`, `qtoy eval`, `qtoy generate` and `qtoy train
--resume`; a crafted pickle in a run folder is refused, never executed; weights load only from
safetensors and every torch.load is weights_only=True."""

import ast
import json
import os
import sys
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from qtoy_core import ToyTransformer
from qtoy_core.checkpoint import CheckpointError, MissingPluginError
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from in_process import FAST, qtoy  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real `qtoy train` run (4 steps on the synthetic data): config.json, tokenizer.json, checkpoints."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "run"
    code, output = qtoy("train", *FAST, "--max-iters", "4", "--out", run)
    torch.set_num_threads(before)
    assert code == 0, output
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def weight_files(run: Path) -> list[Path]:
    return [run / "model.safetensors", *sorted((run / "checkpoints").glob("step_*/model.safetensors"))]


def config_files(run: Path) -> list[Path]:
    return [run / "config.json", *sorted((run / "checkpoints").glob("step_*/config.json"))]


def rewrite(paths, change) -> None:
    """Replace each file with change(old bytes) (a new inode: the top-level weights are a hard link)."""
    for path in paths:
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(change(data))


def edit_config(change):
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _missing_plugin(doc):
    doc["model"]["attention"] = {"name": "fancy"}
    doc["plugins"]["attention"] = {"name": "fancy", "distribution": "qtoy-fancy", "version": "1.2"}


def _wrong_shape(doc):
    doc["model"].update(d_model=64, d_head=32, d_mlp=256)


def _foreign(doc):
    doc.clear()
    doc.update({"architectures": ["GPT2LMHeadModel"], "n_embd": 768, "model_type": "gpt2"})


DAMAGE = {
    # name: (files, change, error class, words the message must hold)
    "truncated weights": (weight_files, lambda b: b[: len(b) // 2], CheckpointError, ["truncated or corrupt"]),
    "weights cut by one byte": (weight_files, lambda b: b[:-1], CheckpointError, ["truncated or corrupt"]),
    "empty weights": (weight_files, lambda b: b"", CheckpointError, ["truncated or corrupt"]),
    "garbage weights header": (weight_files, lambda b: b"\xff" * 8 + b[8:], CheckpointError, ["truncated or corrupt"]),
    "zeroed weights header": (weight_files, lambda b: b[:8] + b"\0" * (_header_len(b) - 8) + b[_header_len(b):],
                              CheckpointError, ["truncated or corrupt"]),
    "newer format": (config_files, edit_config(lambda d: d.update(format="qtoy-model/2", qtoy_version="9.0")),
                     CheckpointError, ["format 'qtoy-model/2'", "Upgrade qtoy"]),
    "foreign config": (config_files, edit_config(_foreign), CheckpointError, ["config.json", "not"]),
    "missing plugin": (config_files, edit_config(_missing_plugin), MissingPluginError,
                       ["needs the attention 'fancy'", "pip install qtoy-fancy"]),
    "wrong shapes": (config_files, edit_config(_wrong_shape), CheckpointError,
                     ["wrong shape", "file (32, 32) vs model (64, 64)"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_run_folders_are_one_clear_message_everywhere(run, damage):
    files, change, error, words = DAMAGE[damage]
    rewrite(files(run), change)
    with pytest.raises(error) as raised:
        ToyTransformer.from_pretrained(run)
    for word in words:
        if damage != "foreign config":  # (resume words it differently: it needs a *training run* config)
            assert word in str(raised.value), str(raised.value)
    for argv in (["eval", run, "--eval-iters", "1"], ["generate", run, "--max-new-tokens", "3"],
                 ["train", "--resume", run, "--max-iters", "6", "--quiet"]):
        code, output = qtoy(*argv)
        assert code == 2, (argv[0], output)
        assert output.startswith("Error: ") and "Traceback" not in output, (argv[0], output)
        assert str(run) in output, (argv[0], output)  # the message names the folder or file
        if damage != "foreign config":
            assert all(word in output for word in words), (argv[0], output)


def test_corrupt_config_json_is_one_message_in_the_cli(run):
    rewrite(config_files(run), lambda b: b"{not json")
    for argv in (["eval", run], ["generate", run], ["train", "--resume", run]):
        code, output = qtoy(*argv)
        assert code == 2 and "Traceback" not in output, output
        assert f"{run}/config.json" in output and "corrupt" in output, output


def test_corrupt_config_json_through_from_pretrained(run):
    rewrite(config_files(run), lambda b: b"{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ToyTransformer.from_pretrained(run)


@pytest.mark.parametrize("damage, words", [
    ("state truncated", ["trainer_state.pt is truncated or corrupt", "best checkpoint"]),
    ("state missing", ["is incomplete", "checkpoint.json"]),
    ("pointer corrupt", ["checkpoint.json is corrupt", "by hand"]),
    ("no checkpoint", ["no complete checkpoint to resume from", "without --resume"]),
])
def test_damaged_training_state_refuses_resume_with_one_message(run, damage, words):
    states = list((run / "checkpoints").glob("step_*/trainer_state.pt"))
    if damage == "state truncated":
        rewrite(states, lambda b: b[:100])
    elif damage == "state missing":
        for p in states:
            p.unlink()
    elif damage == "pointer corrupt":
        (run / "checkpoint.json").write_text("{")
    else:
        (run / "checkpoint.json").unlink()
    code, output = qtoy("train", "--resume", run, "--max-iters", "6", "--quiet")
    assert code == 2 and "Traceback" not in output, output
    assert all(w in output for w in words), output
    ToyTransformer.from_pretrained(run)  # the published weights are untouched and still load


# -- pickles -----------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("how", ["pickle.dump", "torch.save"])
def test_a_crafted_pickle_in_a_run_folder_is_refused_never_executed(run, tmp_path, how):
    live = tmp_path / "proof-the-payload-works"
    pickle.loads(pickle.dumps(Exploit(live)))
    assert live.exists()  # a plain unpickle would run it

    marker = tmp_path / "pwned"
    for state in (run / "checkpoints").glob("step_*/trainer_state.pt"):
        state.unlink()
        if how == "pickle.dump":
            state.write_bytes(pickle.dumps({"step": 4, "optimizer": Exploit(marker)}))
        else:
            torch.save({"step": 4, "optimizer": Exploit(marker)}, state)
    code, output = qtoy("train", "--resume", run, "--max-iters", "6", "--quiet")
    assert code == 2 and "Traceback" not in output, output
    assert "Refusing to load" in output and "could run code" in output, output
    assert not marker.exists()


def _calls(tree: ast.AST, module: str, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    sources = [p for folder in ("qtoy_core", "cli", "plugins", "registry") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 20
    offenders = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, "torch", "load"):
            flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True")
        for attr in ("load", "loads", "Unpickler"):
            for call in _calls(tree, "pickle", attr):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: pickle.{attr}")
    assert not offenders, offenders


def test_weights_are_read_only_from_safetensors(run):
    """Model weights come from model.safetensors; a pickled weights file beside it is never read."""
    marker = run.parent / "pwned"
    torch.save(Exploit(marker), run / "pytorch_model.bin")
    model = ToyTransformer.from_pretrained(run)
    assert not marker.exists() and model.config.d_model == 32
    (run / "model.safetensors").unlink()
    for p in (run / "checkpoints").glob("step_*/model.safetensors"):
        p.unlink()
    with pytest.raises(CheckpointError, match="No model.safetensors"):
        ToyTransformer.from_pretrained(run)
    assert not marker.exists()
    code, output = qtoy("eval", run)
    assert code == 2 and "No model.safetensors" in output and not marker.exists()


def test_run_folder_files_keep_the_usual_permissions(finished_run):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700): the results must still follow the umask,
    so colleagues on a shared machine can read a run."""
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.json", "model.safetensors", "checkpoint.json", "metrics.jsonl", "tokenizer.json"):
        assert (finished_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    latest = (finished_run / "latest").resolve()
    assert latest.stat().st_mode & 0o777 == 0o777 & ~mask

