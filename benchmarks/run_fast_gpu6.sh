# Issue 23, fc1 and its GELU in flowtok's Triton GEMM, in one GPU call (one H200, <= 10 minutes): first the GEMM
# alone in every form (gelu_gemm.py, by 200 s: cuBLAS with and without the GELU epilogue, inductor default and
# max-autotune, flowtok's linear_gelu at eight launch shapes), then the whole fast_inference.py run by 585 s with
# the fused flow timed both ways at batch 256 and the pipelines (one-step, latency, 20 steps against PixArt, FP8
# decoder) on the faster one (--gelu-gemm faster).
#   device run, carry [".whl"], timeout_s 600, command "OUT=$OUT bash benchmarks/run_fast_gpu6.sh"
# Files under $OUT: gelu_gemm.json, fast.json, fast6.log, smi.csv.
set -o pipefail
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu6}
gpu_log fast6.log
timeout "$(left 200)" python3 benchmarks/gelu_gemm.py --out "$OUT/gelu_gemm.json" 2>&1 | tee -a "$LOG"
echo "gelu_gemm done at $(( $(date +%s) - start )) s" | tee -a "$LOG"
BENCH_DEADLINE=$((start + 570)) timeout "$(left 585)" python3 benchmarks/fast_inference.py --gelu-gemm faster \
  --out "$OUT/fast.json" 2>&1 | tee -a "$LOG"
kill $smi 2>/dev/null
echo "total $(( $(date +%s) - start )) s" | tee -a "$LOG"
