# Issue 23's fast-inference benchmark in one GPU call (one H200 or H100, <= 9 minutes wall, compile included).
#   device run, carry [".whl"], timeout_s 560, command "bash benchmarks/run_fast_gpu.sh"
# .whl/ holds the diffusers wheel (docs/benchmarks.md says how to get it); without it the PixArt rows are
# recorded as skipped. The script writes $OUT/fast.json after every measurement and skips what no longer
# fits its deadline (500 s after start), so a slow compile costs the last items, never the measured ones.
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/fast.log"
BENCH_DEADLINE=$((start + 500)) timeout 530 python3 benchmarks/fast_inference.py $FAST_ARGS --out "$OUT/fast.json" \
  2>&1 | tee -a "$OUT/fast.log"
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/fast.log"
