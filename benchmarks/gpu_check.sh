#!/usr/bin/env bash
# The whole GPU check in one go, under 8 minutes on one H200. Each part runs under its own time limit
# (110 + 130 + 190 + 40 s = 470 s at most, plus a few seconds of set-up), so one that hangs or fails
# does not stop the others:
#   1. the cuda-marked tests (`pytest -m cuda tests`: tests/test_cuda.py, the fused kernel's cuda tests);
#   2. attention_scaling.py --device cuda: quadratic attention plain / chunked / fused against softmax
#      SDPA, forward + backward, T = 256 .. 16384, d_head 64, bf16, batch 4 x 8 heads;
#   3. train_throughput.py --device cuda: transformer_2L at d_model 512, n_ctx 1024, batch 32 / 64 / 128,
#      qtoy (impl auto: the fused kernel) and the softmax SDPA reference, bf16 eager and compiled;
#      tokens/s and MFU against the card's datasheet bf16 peak (looked up by name) and the measured one;
#   4. data_throughput.py --shards-only --device cuda: prepared shards, pinned and copied to the GPU.
# Everything goes to ONE file, $OUT/gpu_check.txt (OUT defaults to ./gpu_check_out; a path given as
# the last argument wins): machine and versions, each part's full output and exit status, a summary.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # here, on CPU: every part at tiny sizes, to prove
#                                                     # the plumbing (figures meaningless; ~2-3 min on 2 cores)
#
# The GPU machine has torch and Triton but not all of qtoy's dependencies, and no network: run
# benchmarks/gpu_wheels.sh here first (it fills .whl/ with the missing wheels and a qtoy wheel), carry
# .whl, and this script installs them into /tmp/site before anything else (benchmarks/README.md).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.txt"
: > "$REPORT"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
STATUS=()

say() { echo "$*" | tee -a "$REPORT"; }

part() {  # part NAME SECONDS COMMAND...: run under a time limit; full output into the report
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  say ""
  say "===== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >> "$REPORT" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (time limit: the figures above are what it printed before)"
  say "===== $name: exit $rc after $((SECONDS - start)) s$note"
  STATUS+=("$name: exit $rc, $((SECONDS - start)) s$note")
}

# wheels carried to the GPU machine (benchmarks/gpu_wheels.sh, CPython 3.12): installed beside the image's
# packages (not in --dry-run: they are not for this machine's Python)
if [ $DRY -eq 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$REPORT" 2>&1 && export PYTHONPATH="/tmp/site:$PYTHONPATH" || say "warning: installing .whl/ failed (see above)"
fi

say "gpu_check $( [ $DRY -eq 1 ] && echo '--dry-run (CPU, tiny sizes: plumbing only, no figures)' ) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  git log -1 --format='commit %h %s' 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: none"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable (the fused kernel will be skipped)"
  "$PY" benchmarks/machine.py
  # every dependency the parts need, so that a missing one is named here and not as a traceback later
  "$PY" - <<'PY'
import importlib
missing = []
for name in ("qtoy_registry", "qtoy_core", "qtoy_plugins", "pydantic", "pluggy", "datasets", "tokenizers", "quimb",
             "cotengra", "rich", "click", "safetensors", "huggingface_hub", "matplotlib", "platformdirs", "yaml",
             "pytest"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every failure, whatever it is
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
print("dependencies: all importable" if not missing else "MISSING (run benchmarks/gpu_wheels.sh and carry .whl): "
      + "; ".join(missing))
PY
} >> "$REPORT" 2>&1
cat "$REPORT"

if [ $DRY -eq 0 ]; then
  part cuda_tests 110 "$PY" -m pytest -q -m cuda -p no:cacheprovider -x --durations=10 tests

  part attention_scaling 130 "$PY" benchmarks/attention_scaling.py --device cuda --T 256 512 1024 2048 4096 8192 16384 \
    --d 64 --dtypes bf16 --batch 4 --heads 8 --impl plain chunked fused sdpa --repeats 5 --no-accuracy

  part train_throughput 190 "$PY" benchmarks/train_throughput.py --device cuda --models transformer_2L --shapes large \
    --shape n_ctx=1024 --sweep batch=32,64,128 --impls qtoy,sdpa --modes bf16,bf16+compile --bf16 on \
    --repeats 3 --steps 5

  part data_throughput 40 "$PY" benchmarks/data_throughput.py --shards-only --quick --device cuda
else
  # the same four parts on CPU at tiny sizes; the fused kernel under Triton's interpreter
  part cuda_tests 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

  part attention_scaling 120 env TRITON_INTERPRET=1 "$PY" benchmarks/attention_scaling.py --device cpu --T 32 64 \
    --d 16 --dtypes fp32 --impl plain chunked fused sdpa --repeats 1 --no-accuracy

  part train_throughput 120 "$PY" benchmarks/train_throughput.py --device cpu --models transformer_2L --shapes base \
    --shape vocab_size=256,d_model=64,n_head=2,n_ctx=64 --sweep batch=2,4 --impls qtoy,sdpa --modes fp32 \
    --quick --repeats 1 --steps 1

  part data_throughput 120 "$PY" benchmarks/data_throughput.py --shards-only --quick --device cpu
fi

say ""
say "===== summary ($((SECONDS - START)) s in all)"
for line in "${STATUS[@]}"; do say "  $line"; done
# the lines that carry the figures, gathered at the end of the report
FIGURES=$(grep -E "default path|bf16 peak used|matmul peak|tokens/s, MFU|^\[ *[0-9.]+s\]|slowest:|deliver |passed|failed|skipped" \
  "$REPORT" | grep -v "^=====" | head -150)
printf '%s\n%s\n' "----- figures (the lines that carry them, from above)" "$FIGURES" >> "$REPORT"
echo "report: $REPORT"
