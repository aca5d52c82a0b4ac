"""Issue 8, bad input: random configs and CLI flags (hypothesis) are either accepted or refused with one
validation message, never a crash; bad data through `qtoy train` is one clear message naming the
problem and the fix, before any training step.

QTOY_FUZZ_EXAMPLES=2000 QTOY_FUZZ_RANDOM=1 python -m pytest tests/test_reliability_input.py
--hypothesis-show-statistics explores more (by default a fixed, derandomized set runs)."""

import json
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qtoy_core.errors import format_validation_error
from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.run_folder import read_metrics
from qtoy_registry import QtoyError
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from in_process import qtoy  # noqa: E402


FUZZ = settings(max_examples=int(os.environ.get("QTOY_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=not os.environ.get("QTOY_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_thread")




def assert_one_clear_message(output: str) -> None:
    assert "Traceback" not in output, output
    assert "Error" in output or "Usage" in output, output
    assert len(output.strip()) < 4000, output


# -- random config documents ---------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12),
                 st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
# Mostly plausible values (so that many documents are accepted and built), some edge cases, some junk.
PLAUSIBLE_SIZE = st.sampled_from([1, 2, 4, 8, 16, 32, 64])
SIZE = st.one_of(PLAUSIBLE_SIZE, PLAUSIBLE_SIZE, PLAUSIBLE_SIZE, st.integers(-2, 70), st.integers(2**31, 2**70), JUNK)
PLAUSIBLE_FLOAT = st.sampled_from([1e-3, 0.01, 0.1, 0.5])
FLOAT = st.one_of(PLAUSIBLE_FLOAT, PLAUSIBLE_FLOAT, PLAUSIBLE_FLOAT, st.floats(), st.sampled_from([1e30, -1.0, 1.0]),
                  JUNK)
MODEL_TYPE = st.one_of(st.sampled_from(["attention_only_1L", "attention_only_2L", "transformer_1L", "transformer_2L",
                                        "transformer_0L", "attention_only_L", "transformer_01L", "gpt2", ""]),
                       st.text(max_size=20), JUNK)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy = JUNK, one_in: int = 8) -> st.SearchStrategy:
    """`good`, except one draw in `one_in` from `bad` (one_of's branches are not drawn evenly)."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


def with_typo(options: dict, typo: str) -> st.SearchStrategy:
    """A section of options; one in six also has an unknown key."""
    return mostly(st.fixed_dictionaries({}, optional=options),
                  st.fixed_dictionaries({typo: JUNK}, optional=options), one_in=6)


def component(kind: str, names: list[str], options: dict) -> st.SearchStrategy:
    good = st.sampled_from(names)
    names_st = st.one_of(good, good, good, st.sampled_from(["nope", ""]), st.text(max_size=8), JUNK)
    options_st = mostly(st.fixed_dictionaries({"name": names_st}, optional=options),
                        st.fixed_dictionaries({"name": names_st, "bogus": JUNK}, optional=options), one_in=6)
    return st.one_of(good, good, options_st, options_st, st.fixed_dictionaries({}, optional=options), JUNK)


MODEL = with_typo(typo="unknown_key", options={
    "model_type": MODEL_TYPE, "vocab_size": SIZE, "d_model": SIZE, "n_head": SIZE, "d_head": SIZE, "n_ctx": SIZE,
    "d_mlp": SIZE, "dropout": FLOAT, "tie_embeddings": st.one_of(st.booleans(), JUNK),
    "attention": component("attention", ["quadratic", "bilinear", "softmax"],
                           {"impl": st.sampled_from(["auto", "plain", "chunked", "x"]), "bias": JUNK}),
    "mlp": component("mlp", ["none", "bilinear", "gelu"], {}),
    "positional": component("positional", ["rope", "learned", "none"], {"base": FLOAT}),
    "norm": component("norm", ["none", "rmsnorm"], {"eps": FLOAT}),
})
DATASET = component("dataset", ["synthetic", "text", "fineweb", "tinystories", "simplestories"], {
    "val_fraction": FLOAT, "split_seed": SIZE, "seed": SIZE, "n_stories": SIZE, "difficulty": FLOAT,
    "data_files": st.one_of(st.lists(st.text(max_size=8), max_size=2), JUNK), "tokenizer": JUNK})
DATA = with_typo(typo="extra", options={"dataset": DATASET, "shuffle_buffer": SIZE, "tokenize_batch": SIZE,
                                        "mode": st.one_of(st.sampled_from(["packed", "padded"]), JUNK)})
TRAIN = with_typo(typo="typo_key", options={
    **{k: SIZE for k in ("batch_size", "grad_accum", "warmup", "max_iters", "max_tokens", "eval_interval",
                         "eval_iters", "log_interval", "checkpoint_interval", "seed", "max_bad_steps")},
    **{k: FLOAT for k in ("learning_rate", "min_lr_frac", "grad_clip")},
    "precision": st.one_of(st.sampled_from(["auto", "fp32", "bf16", "fp16", "fp8"]), JUNK),
    "compile": st.one_of(st.booleans(), JUNK),
    "device": st.one_of(st.sampled_from(["auto", "cpu", "cuda:7", "tpu"]), JUNK),
})
OPTIMIZER = component("optimizer", ["adam", "muon"], {"lr": FLOAT, "betas": JUNK, "ns_steps": SIZE, "momentum": FLOAT})
CALLBACKS = st.one_of(st.lists(component("callback", ["dynamics"], {"every": SIZE, "top_k": SIZE}), max_size=2), JUNK)



DOCUMENT = mostly(with_typo(typo="surprise", options={
    "model": mostly(MODEL), "data": mostly(DATA), "train": mostly(TRAIN), "optimizer": OPTIMIZER,
    "callbacks": CALLBACKS}), one_in=10)


def _small(config) -> bool:
    m = config.model
    params = m.vocab_size * m.d_model + m.n_layers * (4 * m.d_model * m.n_head * m.d_head + 3 * m.d_model * m.d_mlp)
    return params <= 3_000_000 and m.n_ctx <= 4096


@FUZZ
@given(DOCUMENT)
def test_random_config_documents_are_accepted_or_refused_with_a_validation_message(doc):
    try:
        config = assemble_run_config(doc)
    except ValidationError as exc:
        message = format_validation_error(exc, exc.title)
        assert message.startswith("Invalid") and len(message.splitlines()) >= 2
        event("refused: validation")
        return
    except QtoyError as exc:
        assert str(exc)
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    json.loads(config.model_dump_json())  # round-trips as JSON
    if _small(config):  # an accepted config builds, and its model runs, without a torch error
        from qtoy_core.optim import build_optimizer
        from qtoy_core.training.trainer import build_model_or_explain

        model = build_model_or_explain(config.model, torch.device("cpu"))
        build_optimizer(model, config.optimizer)
        tokens = torch.randint(0, config.model.vocab_size, (1, min(config.model.n_ctx, 5) + 1))
        assert model.loss(tokens).ndim == 0
        event("accepted: built and ran")


# -- random CLI flags ------------------------------------------------------------------------------
class _Accepted(Exception):
    """Raised instead of training: the command got as far as a constructed Trainer."""


GOOD_INT = st.sampled_from(["1", "2", "4", "8", "16", "32", "64"])
INT_TEXT = st.one_of(GOOD_INT, GOOD_INT, GOOD_INT, st.integers(-5, 300).map(str),
                     st.sampled_from(["0", "-1", "1e3", "abc", "", "99999999999999999999", "2.5", " 7"]))
GOOD_FLOAT = st.sampled_from(["0.001", "0.1", "0.5", "1e-4"])
FLOAT_TEXT = st.one_of(GOOD_FLOAT, GOOD_FLOAT, st.floats().map(repr),
                       st.sampled_from(["nan", "inf", "-inf", "1e-400", "1e30", "x", "0"]))
NAME_TEXT = st.one_of(st.sampled_from(["quadratic", "bilinear", "softmax", "none", "rope", "learned", "rmsnorm", "gelu",
                                       "adam", "muon", "synthetic", "text", "dynamics", "nope"]), st.text(max_size=8))
SET_KEY = st.one_of(st.sampled_from(["d_model", "n_head", "model.d_head", "vocab_size", "attention.impl", "mlp",
                                     "train.warmup", "train.seed", "train.learning_rate", "data.mode", "data.dataset",
                                     "data.dataset.val_fraction", "data.dataset.split_seed", "optimizer.lr",
                                     "callbacks", "train", "model", "data", "nope", "model.", ".", "a..b",
                                     "train.max_iters", "positional.base", "norm.eps"]), st.text(max_size=10))
SET_VALUE = st.one_of(st.sampled_from(["1", "0", "-1", "64", "null", "true", "[]", "{}", "\"x\"", "1e999", "NaN",
                                       "{\"name\": \"quadratic\"}", "plain", "[1, 2]"]), st.text(max_size=10))
TRAIN_FLAGS = {
    **{f: INT_TEXT for f in ("--d-model", "--n-head", "--n-ctx", "--d-mlp", "--batch-size", "--grad-accum", "--warmup",
                             "--max-iters", "--max-tokens", "--eval-interval", "--eval-iters", "--seed")},
    **{f: FLOAT_TEXT for f in ("--learning-rate", "--min-lr-frac", "--grad-clip")},
    **{f: NAME_TEXT for f in ("--attn", "--mlp", "--pos", "--norm", "--optimizer", "--dataset", "--callback")},
    "--model-type": MODEL_TYPE.map(str), "--precision": st.sampled_from(["auto", "fp32", "bf16", "fp16", "fp8"]),
    "--device": st.sampled_from(["auto", "cpu", "cuda:3", "nonsense", ""]),
}
CONFIG_FILE = st.one_of(st.none(), st.tuples(st.sampled_from([".yaml", ".json", ".toml", ".txt"]),
                                             st.one_of(st.text(max_size=40), DOCUMENT.map(json.dumps))))


@st.composite
def train_argv(draw):
    argv = ["train"]
    for flag in draw(st.lists(st.sampled_from(sorted(TRAIN_FLAGS)), max_size=5, unique=True)):
        argv += [flag, draw(TRAIN_FLAGS[flag])]
    for _ in range(draw(st.integers(0, 2))):
        argv += ["--set", f"{draw(SET_KEY)}={draw(SET_VALUE)}" if draw(st.booleans()) else draw(st.text(max_size=8))]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--compile", "--no-compile", "--quiet", "--bogus-flag"])))
    return argv, draw(CONFIG_FILE)


@FUZZ
@given(train_argv())
def test_random_train_flags_are_accepted_or_refused_with_one_message(tmp_path, monkeypatch, args):
    from qtoy_core.training import trainer as trainer_mod

    def accept(self):
        raise _Accepted

    monkeypatch.setattr(trainer_mod.Trainer, "fit", accept)
    argv, config_file = args
    argv = argv + ["--out", str(tmp_path / "run")]
    if config_file is not None:
        path = tmp_path / f"config{config_file[0]}"
        path.write_text(config_file[1], encoding="utf-8", errors="surrogatepass")
        argv += ["--config", str(path)]
    try:
        code, output = qtoy(*argv)
    except _Accepted:
        event("accepted (a Trainer was constructed)")
        return
    assert code == 2, (code, output)
    assert_one_clear_message(output)
    event("refused")
    assert not (tmp_path / "run").exists()  # nothing written before the input was validated


@FUZZ
@given(model_type=mostly(st.sampled_from([None, "attention_only_2L", "transformer_1L"]), MODEL_TYPE.map(str), 3),
       attn=mostly(st.sampled_from([None, "quadratic", "softmax"]), NAME_TEXT, 3),
       mlp=mostly(st.sampled_from([None, "bilinear", "none"]), NAME_TEXT, 3),
       sets=st.lists(st.tuples(SET_KEY, SET_VALUE), max_size=2))
def test_random_config_command_flags_print_a_config_or_one_message(model_type, attn, mlp, sets):
    argv = ["config"] + ([model_type] if model_type is not None else [])
    argv += (["--attn", attn] if attn is not None else []) + (["--mlp", mlp] if mlp is not None else [])
    for key, value in sets:
        argv += ["--set", f"{key}={value}"]
    code, output = qtoy(*argv)
    if code == 0:
        assert json.loads(output)["model_type"]
        event("accepted")
    else:
        assert code == 2, (code, output)
        assert_one_clear_message(output)
        event("refused")


@pytest.mark.parametrize("argv, needle", [
    (["--set", "train.seed=99999999999999999999999"], "train.seed"),
    (["--set", "data.dataset.split_seed=99999999999999999999999"], "split_seed"),
    (["--learning-rate", "inf"], "train.learning_rate"),
    (["--grad-clip", "nan"], "train.grad_clip"),
    (["--set", "callbacks=5"], "callbacks"),
    (["--set", "model=transformer_1L"], "model: Input should be a valid dictionary"),
    (["--config", "{cfg}", "--d-model", "32"], "The config's 'model' must be a mapping"),
    (["--set", "model.model_type=5", "--mlp", "bilinear"], "model_type"),
    (["--set", "attention={\"name\": [1]}"], "attention name must be a string"),
    (["--n-ctx", "0"], "model.n_ctx"),
    (["--d-model", "65", "--n-head", "2"], "not divisible by n_head"),
    (["--model-type", "transformer_0L"], "does not parse"),
    (["--attn", "flash"], "Unknown attention 'flash'"),
    (["--set", "trian.warmup=3"], "unknown option 'trian'"),
    (["--set", "train.warmpu=3"], "train.warmpu: unknown option"),
    (["--device", "cuda:3"], "--device cuda:3 asked for CUDA"),
])
def test_each_bad_train_flag_is_one_message(tmp_path, argv, needle):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "c.json").write_text('{"model": "transformer_1L"}')
    argv = [a.replace("{cfg}", str(tmp_path / "c.json")) for a in argv]
    code, output = qtoy("train", *argv, "--max-iters", "2", "--out", tmp_path / "run")
    assert code == 2 and needle in output, output
    assert_one_clear_message(output)


@pytest.mark.parametrize("argv, needle", [
    (["--attn", "softmax", "--set", "attn=quadratic"], "option 'attention' given twice"),
    (["--set", "mlp=1"], "a mlp is given as a name"),
    (["transformer_1L", "--set", "d_model=0"], "d_model: Input should be greater than 0"),
])
def test_each_bad_config_command_is_one_message(argv, needle):
    code, output = qtoy("config", *argv)
    assert code == 2 and needle in output, output
    assert_one_clear_message(output)


def test_a_model_too_big_for_memory_is_one_message(tmp_path):
    code, output = qtoy("train", "--d-model", "1000000000000", "--n-head", "1", "--max-iters", "2", "--out",
                        tmp_path / "run", "--precision", "fp32", "--no-compile")
    assert code == 2 and "does not fit in memory" in output and "d_model=1000000000000" in output, output
    assert_one_clear_message(output)


# -- bad data through `qtoy train` ---------------------------------------------------------------------
TINY = ["--d-model", "16", "--n-head", "2", "--n-ctx", "16", "--batch-size", "2", "--precision", "fp32", "--no-compile",
        "--eval-iters", "1", "--eval-interval", "2", "--max-iters", "2", "--quiet"]
WORDS = "the cat sat on a mat and the dog ran far away to see a big red sun".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import random

    from qtoy_core.data import Tokenizer, train_bpe

    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    stories = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(200)]
    (d / "good.txt").write_text("\n\n".join(stories))
    (d / "short_docs.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
                                                  for _ in range(400)))
    (d / "three_docs.txt").write_text("hi\n\nyo\n\nok\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("   \n\n \t \n\n")
    (d / "latin1.txt").write_bytes("caf\u00e9 au lait\n\nsecond paragraph\n".encode("latin-1"))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "story_column.jsonl").write_text(json.dumps({"story": "once upon a time"}) + "\n")
    (d / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (d / "not_json.json").write_text("garbage")
    (d / "json_not_tokenizer.json").write_text('{"a": 1}')
    (d / "tokenizers").mkdir()
    Tokenizer(train_bpe(stories, vocab_size=300)).save(d / "tok300.json")
    return d


@pytest.mark.parametrize("files, extra, needle", [
    ("missing.txt", [], "data file '{d}/missing.txt' does not exist"),
    ("*.parquet", [], "no file matches"),
    ("empty.txt", [], "the data file is empty"),
    ("blank.txt", [], "no documents in the train split"),
    ("latin1.txt", [], "is not UTF-8 text (byte 0xe9 at offset 3). Convert it to UTF-8"),
    ("binary.txt", [], "is not UTF-8 text"),
    ("three_docs.txt", [], "The validation split of dataset 'text' is empty"),
    ("story_column.jsonl", [], "there is no column 'text'"),
    ("broken.jsonl", [], "could not read"),
    ("tokenizers", [], "holds no data files"),
    ("good.txt", ["--tokenizer", "{d}/not_json.json"], "is not a tokenizers JSON file"),
    ("good.txt", ["--tokenizer", "{d}/json_not_tokenizer.json"], "could not be read by the tokenizers library"),
    ("good.txt", ["--tokenizer", "{d}/nope.json"], "Tokenizer file '{d}/nope.json' does not exist"),
    ("good.txt", ["--tokenizer", "{d}"], "it is a folder"),
    ("good.txt", ["--tokenizer", "{d}/tok300.json", "--set", "vocab_size=4096"],
     "The model's vocab_size is 4096 but the tokenizer ({d}/tok300.json) has 300 tokens. "
     "Set the model's vocab_size to 300"),
])
def test_bad_data_is_one_clear_message_before_training(tmp_path, data, files, extra, needle):
    run = tmp_path / "run"
    extra = [e.format(d=data) for e in extra]
    code, output = qtoy("train", "--dataset", "text", "--data-files", f"{data}/{files}", *extra, *TINY, "--out", run)
    assert code == 2, output
    assert needle.format(d=data) in output, output
    assert_one_clear_message(output)
    assert not read_metrics(run)  # refused before the first step: no work to lose


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_documents_shorter_than_the_context_train(tmp_path, data, mode):
    run = tmp_path / "run"
    code, output = qtoy("train", "--dataset", "text", "--data-files", data / "short_docs.txt", "--tokenizer",
                        data / "tok300.json", "--set", f"data.mode={mode}", "--set", "data.dataset.val_fraction=0.2",
                        *TINY, "--out", run)
    assert code == 0, output
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2]


def test_config_file_problems_are_one_message(tmp_path):
    cases = {"missing.yaml": None, "bad.yaml": "model: [unclosed", "list.json": "[1, 2]",
             "latin1.toml": "caf\xe9".encode("latin-1"), "config.ini": "[model]\nd_model=3",
             "typo.yaml": "model:\n  d_modle: 64\n", "date.yaml": "train:\n  seed: 2024-01-01\n"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        code, output = qtoy("train", "--config", path, "--max-iters", "2", "--out", tmp_path / "run")
        assert code == 2, (name, output)
        assert_one_clear_message(output)
        assert str(path) in output or "d_modle" in output or "seed" in output, (name, output)
