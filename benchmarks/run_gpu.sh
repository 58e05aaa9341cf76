python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src:$PYTHONPATH || exit 1
# The whole GPU benchmark in one command, about 9 minutes on one H100; results and logs land in $OUT.
# Run it from the repository root with the diffusers wheel in .whl/ (see docs/benchmarks.md):
#   device run, carry [".whl"], command "bash benchmarks/run_gpu.sh"
# Each script writes its JSON after every measurement and skips what no longer fits its deadline,
# so a slow step costs the items after it, never the ones already measured.
# SAMPLING_ARGS / TRAIN_ARGS add arguments (a CPU check of this file: "--tiny --device cpu").
set -o pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; python3 -c \
  "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"; } \
  2>&1 | tee "$OUT/sampling.log"

BENCH_DEADLINE=$((start + 350)) timeout 390 python3 benchmarks/sampling.py $SAMPLING_ARGS \
  --out "$OUT/sampling.json" --plot "$OUT/sampling.png" 2>&1 | tee -a "$OUT/sampling.log"

left=$((start + 535 - $(date +%s)))
# The largest-batch search survives its OOMs better without fragmentation (training uses no CUDA graphs,
# which is why this is not set for the sampling run).
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True BENCH_DEADLINE=$((start + 520)) timeout $((left > 30 ? left : 30)) python3 benchmarks/train_step.py $TRAIN_ARGS \
  --out "$OUT/train.json" 2>&1 | tee "$OUT/train.log"
echo "total $(( $(date +%s) - start )) s"
