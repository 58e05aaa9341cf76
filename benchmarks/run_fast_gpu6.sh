# Issue 23, the fused flow's GEMM epilogues in flowtok's Triton GEMMs, in one GPU call (one H200, <= 10 minutes):
# first the GEMMs alone in every form (gemm_epilogues.py, by 300 s: fc1 + GELU through cuBLAS with and without the
# GELU epilogue, flowtok's linear_gelu at ten launch shapes, each a program a tile, persistent and warp-specialised,
# then in FP8; fc2 into the residual stream through cuBLAS, _scaled_mm + addcmul_ and linear_residual; inductor
# default and max-autotune last; MLIR reproducers of launches that fail to compile are left out of the log), then
# the whole fast_inference.py run by 585 s with the fused flow timed both ways at batch 256 (the Triton GEMMs at
# the fastest launch and schedule of the first part) and the pipelines (one-step, latency, 20 steps against
# PixArt, FP8 decoder) on the faster one (--gemm-epilogues faster). gemm_epilogues.json stays in /tmp/keep for
# run_fast_gpu5.sh if the machine is still warm.
#   device run, carry [".whl"], timeout_s 600, command "OUT=$OUT bash benchmarks/run_fast_gpu6.sh"
# Files under $OUT: gemm_epilogues.json, fast.json, fast6.log, smi.csv.
set -o pipefail
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu6}
gpu_log fast6.log
BENCH_DEADLINE=$((start + 290)) timeout "$(left 300)" python3 benchmarks/gemm_epilogues.py \
  --out "$OUT/gemm_epilogues.json" 2>&1 | grep -v '^ \|^#\|^{-#\|^}\|^module' | tee -a "$LOG"
echo "gemm_epilogues done at $(( $(date +%s) - start )) s" | tee -a "$LOG"
mkdir -p /tmp/keep && cp "$OUT/gemm_epilogues.json" /tmp/keep/  # for run_fast_gpu5.sh on the same warm machine
BENCH_DEADLINE=$((start + 570)) timeout "$(left 585)" python3 benchmarks/fast_inference.py --gemm-epilogues faster \
  --gemm-launches "$OUT/gemm_epilogues.json" --out "$OUT/fast.json" 2>&1 | tee -a "$LOG"
kill $smi 2>/dev/null
echo "total $(( $(date +%s) - start )) s" | tee -a "$LOG"
