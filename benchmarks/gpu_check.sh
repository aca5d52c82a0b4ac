#!/usr/bin/env bash
# The whole GPU check in one go, under 8 minutes on one H200 (each part has its own time limit,
# 120 + 180 + 120 + 60 s at most, so one that hangs or fails does not stop the others):
#   1. the cuda-marked tests (tests/test_cuda.py and any other test marked `cuda`);
#   2. train_throughput.py --device cuda: transformer_2L at d_model 512 (8 heads, n_ctx 1024, batch 64:
#      65k tokens a step, enough to fill the card), qtoy vs the hand-written reference vs SDPA, fp32,
#      bf16 and bf16 + compile, tokens/s and MFU against the bf16 matmul peak it measures on the card;
#   3. attention_scaling.py --device cuda: quadratic attention plain / chunked (/ fused, where the
#      script offers --impl fused) against softmax SDPA, forward + backward, T = 256 .. 16384, d_head 64, bf16;
#   4. data_throughput.py --shards-only --device cuda: prepared shards delivered to the training loop,
#      pinned and copied to the GPU.
# Figures go to $OUT (default ./gpu_check_out): one .txt (and .json where the script has one) per part,
# and summary.txt with each part's exit status and seconds.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the project's venv
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

part() {  # part NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt, status to the summary
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.txt"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
  python benchmarks/machine.py
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"

part cuda_tests 120 python -m pytest -q -m cuda -p no:cacheprovider tests

part train_throughput 180 python benchmarks/train_throughput.py --device cuda --models transformer_2L --shapes large \
  --shape n_ctx=1024,batch=64 --impls qtoy,ref,sdpa --repeats 3 --steps 5 --bf16 on
python - "$OUT/train_throughput.txt" <<'PY' || true
import sys
text = open(sys.argv[1]).read()
print("\n".join(line for line in text.splitlines() if "default path" in line or "matmul peak" in line))
PY

IMPLS=""
HELP=$(python benchmarks/attention_scaling.py --help 2>/dev/null)
if grep -q -- "--impl" <<<"$HELP" && grep -q -- "--device" <<<"$HELP"; then
  IMPLS="--impl plain chunked sdpa"
  grep -q "fused" <<<"$HELP" && IMPLS="--impl plain chunked fused sdpa"
  part attention_scaling 120 python benchmarks/attention_scaling.py --device cuda --T 256 512 1024 2048 4096 8192 16384 \
    --d 64 --dtypes bf16 $IMPLS --repeats 3 --no-accuracy
else
  echo "== attention_scaling: skipped (this attention_scaling.py has no --impl / --device cuda)" | tee -a "$SUMMARY"
fi

part data_throughput 60 python benchmarks/data_throughput.py --shards-only --quick --device cuda

echo "figures in $OUT" | tee -a "$SUMMARY"
