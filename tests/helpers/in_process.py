"""Shared by the reliability tests: run the `qtoy` entry point in this process, and a tiny, fast,
deterministic `qtoy train` on the synthetic data (a checkpoint every 2 steps)."""

import io
from contextlib import redirect_stderr, redirect_stdout

FAST = ["--d-model", "32", "--n-head", "2", "--n-ctx", "32", "--batch-size", "4", "--precision", "fp32",
        "--no-compile", "--warmup", "2", "--eval-interval", "4", "--eval-iters", "1",
        "--set", "train.checkpoint_interval=2", "--set", "data.shuffle_buffer=8", "--set", "data.tokenize_batch=8",
        "--set", "data.dataset.val_fraction=0.2", "--set", "data.dataset.val_documents=8", "--quiet"]


def qtoy(*argv) -> tuple[int, str]:
    """Run the `qtoy` entry point in this process: (exit code, stdout + stderr)."""
    from qtoy_cli.main import main

    buffer = io.StringIO()
    code = 0
    with redirect_stdout(buffer), redirect_stderr(buffer):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, buffer.getvalue()
