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
