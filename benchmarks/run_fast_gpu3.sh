# Issue 23 in one GPU call (one H200, <= 10 minutes): the Triton passes alone, then the kernel profile of the
# fused flow beside its variants (at batch 256 and 64), then the whole fast-inference run against the
# PixArt-shaped baseline.
#   device run, carry [".whl"], timeout_s 600, command "bash benchmarks/run_fast_gpu3.sh"
# .whl/ holds the diffusers wheel (docs/benchmarks.md says how to get it). Every part writes its JSON as it
# goes and ends by its own deadline (the parts end by 50, 295, 345 and 585 s after start), so a slow compile
# costs the last items, never the measured ones. Files under $OUT: triton_ops.json, profile.json, profile64.json,
# fast.json, fast3.log, smi.csv.
set -o pipefail
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu3}
gpu_log fast3.log
timeout "$(left 50)" python3 benchmarks/triton_ops_bench.py --out "$OUT/triton_ops.json" 2>&1 | tee -a "$LOG"
BENCH_DEADLINE=$((start + 280)) timeout "$(left 295)" python3 benchmarks/fast_inference.py --profile \
  --variants "${VARIANTS:-per-group,no-triton,fold-in}" --out "$OUT/profile.json" 2>&1 | tee -a "$LOG"
BENCH_DEADLINE=$((start + 335)) timeout "$(left 345)" python3 benchmarks/fast_inference.py --profile --batch 64 \
  --variants "${VARIANTS64:-per-group}" --out "$OUT/profile64.json" 2>&1 | tee -a "$LOG"
echo "profiles done at $(( $(date +%s) - start )) s" | tee -a "$LOG"
BENCH_DEADLINE=$((start + 570)) timeout "$(left 585)" python3 benchmarks/fast_inference.py --out "$OUT/fast.json" \
  2>&1 | tee -a "$LOG"
# KEEP=DIR: copy that folder to /tmp/keep/ for a later call on this warm machine (the 64 MiB carry limit).
if [ -n "$KEEP" ]; then mkdir -p /tmp/keep && cp -r "$KEEP" /tmp/keep/ && echo "kept $KEEP in /tmp/keep" | tee -a "$LOG"; fi
kill $smi 2>/dev/null
echo "total $(( $(date +%s) - start )) s" | tee -a "$LOG"
