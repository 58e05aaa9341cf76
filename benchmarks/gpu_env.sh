# Sourced by the run_fast_gpu*.sh scripts on the device machine, which installs nothing: the carried wheels in
# .whl/ (if any) go to /tmp/site, flowtok's src/ goes on PYTHONPATH, the Hub stays offline, and left N prints
# the seconds until N seconds after the script's start (for `timeout`).
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( start + $1 - $(date +%s) )); }
# gpu_log NAME: $OUT created, $LOG=$OUT/NAME started with the GPU's name, driver, memory and top clock, and the SM
# clock, power and temperature logged once a second to $OUT/smi.csv in the background ($smi: its pid; power-capped
# clocks move GEMM rates).
gpu_log() {
  mkdir -p "$OUT"
  LOG=$OUT/$1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$LOG"
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 1000 > "$OUT/smi.csv" 2>&1 &
  smi=$!
}
