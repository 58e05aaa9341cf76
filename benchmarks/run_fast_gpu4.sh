# Issue 23, the FP8 decoder, in one GPU call (one H200, <= 10 minutes): the whole fast-inference run (now with the
# rows of the decoder's blocks in FP8 after PixArt's), then the shapes tokenizer's reconstruction PSNR in bf16
# against bf16 + FP8 decoder (static and dynamic scales), worlds v1 and v2, n = 300 each.
#   device run, carry [".whl", ".carry/t2i"], timeout_s 600,
#   command "MODEL=.carry/t2i OUT=$OUT KEEP=.carry/t2i bash benchmarks/run_fast_gpu4.sh"
# .whl/ holds the diffusers wheel (docs/benchmarks.md says how to get it); MODEL: a pipeline folder with the
# bundled model's tokenizer/ (its text-to-image part, run_fast_gpu2.sh says why). The benchmark ends by 470 s,
# the PSNR runs by 585 s. Files under $OUT: fast.json, recon_{v1,v2}_{bf16,fp8,fp8dyn}.json, fast4.log, smi.csv.
set -o pipefail
: "${MODEL:?set MODEL to a pipeline folder with the bundled tokenizer}"
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu4}
gpu_log fast4.log
BENCH_DEADLINE=$((start + 455)) timeout "$(left 470)" python3 benchmarks/fast_inference.py --out "$OUT/fast.json" \
  2>&1 | tee -a "$LOG"
kill $smi 2>/dev/null
echo "benchmark done at $(( $(date +%s) - start )) s" | tee -a "$LOG"
for world in v1 v2; do
  for kind in bf16 fp8 fp8dyn; do
    case $kind in bf16) extra=();; fp8) extra=(--fp8);; fp8dyn) extra=(--fp8 dynamic);; esac
    timeout "$(left 585)" python3 -m flowtok.cli eval recon --model "$MODEL/tokenizer" --device cuda --n 300 \
      --batch-size 100 --no-fid --world $world --dtype bf16 "${extra[@]}" --out "$OUT/recon_${world}_$kind.json" \
      2>&1 | tail -2 | sed "s/^/recon $world $kind: /" | tee -a "$LOG"
  done
done
# KEEP=DIR: copy that folder to /tmp/keep/ for a later call on this warm machine (the 64 MiB carry limit).
if [ -n "$KEEP" ]; then mkdir -p /tmp/keep && cp -r "$KEEP" /tmp/keep/ && echo "kept $KEEP in /tmp/keep" | tee -a "$LOG"; fi
echo "total $(( $(date +%s) - start )) s" | tee -a "$LOG"
