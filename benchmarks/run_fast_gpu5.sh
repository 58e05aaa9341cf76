# Issue 23, the flow in FP8 through the fused path, in one GPU call (one H200, <= 10 minutes): first the flow's
# attention alone in every form PyTorch offers (attention_variants.py, by 150 s), then fast_inference.py --fp8-flow
# (numerics; the flow in bf16, FP8 and FP8 with bf16 output Linears at batch 256, the fastest FP8 form again with
# its GEMM epilogues in flowtok's Triton GEMMs, at the launches run_fast_gpu6.sh found fastest if it ran on this
# warm machine before (/tmp/keep/gemm_epilogues.json); the 20-step pipelines with the faster FP8 flow, and with the
# FP8 decoder too, against PixArt at its best; the flows at batch 64), by 585 s.
#   device run, carry [".whl"], timeout_s 600, command "OUT=$OUT bash benchmarks/run_fast_gpu5.sh"
# .whl/ holds the diffusers wheel (docs/benchmarks.md says how to get it). Files under $OUT: attention.json,
# fp8flow.json, fast5.log, smi.csv. The shapes accuracy with --fast --fp8 is a second call:
#   PROFILE=0 MODEL=.carry/t2i MINILM=/tmp/keep/minilm OUT=$OUT FAST_ARGS="--fast --fp8 --fp8-layers L" \
#     bash benchmarks/run_fast_gpu2.sh        (L: the fastest form's Linears, e.g. qkv,fc1,fc2)
set -o pipefail
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu5}
gpu_log fast5.log
timeout "$(left 150)" python3 benchmarks/attention_variants.py --out "$OUT/attention.json" 2>&1 | tee -a "$LOG"
echo "attention done at $(( $(date +%s) - start )) s" | tee -a "$LOG"
# the Triton GEMMs' fastest launches: $GEMM_LAUNCHES (a gemm_epilogues.py JSON carried along), else the one
# run_fast_gpu6.sh left if it ran on this warm machine before
GEMM_LAUNCHES=${GEMM_LAUNCHES:-/tmp/keep/gemm_epilogues.json}
launches=()
if [ -f "$GEMM_LAUNCHES" ]; then launches=(--gemm-launches "$GEMM_LAUNCHES"); fi
BENCH_DEADLINE=$((start + 570)) timeout "$(left 585)" python3 benchmarks/fast_inference.py --fp8-flow \
  "${launches[@]}" --out "$OUT/fp8flow.json" 2>&1 | tee -a "$LOG"
kill $smi 2>/dev/null
echo "total $(( $(date +%s) - start )) s" | tee -a "$LOG"
