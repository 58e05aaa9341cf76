#!/usr/bin/env bash
# issue 20: a tokenizer ($1) continued at KL weight 1e-8, fp16, tarred and split in 15 MiB pieces into $OUT
# *before* it is probed on v2 and v1, so a call cut short still returns it. One call, synchronous. Ran as
# TOK_MIN=3.0 TOK_STEPS=2300 TOK_SCHED=cosine bash job_tokenizer.sh <the seventh tokenizer>.
set -u
K=/tmp/keep; R=$K/runs; rm -rf $K && mkdir -p $R $K/repo && cp -r src configs scripts $K/repo/ && cd $K/repo
export PYTHONPATH=$K/repo/src HF_HUB_OFFLINE=1
log() { echo "$* $(date +%T)" >> $K/j22.log; }
log start
python3 -m flowtok.cli train configs/shapes/tokenizer.yaml run_dir=$R/tok model.init_from=$1 \
  model.kl_weight=${TOK_KL:-1.0e-8} train.batch_size=256 train.lr=2.0e-4 train.warmup_steps=100 train.steps=${TOK_STEPS:-100000} \
  train.schedule=${TOK_SCHED:-constant} train.min_lr_ratio=0.05 train.compile=true train.max_minutes=${TOK_MIN:-7.4} train.eval_every=2500 \
  data.workers=12 data.render_ahead=16 train.progress=false train.tensorboard=false > $R/tok.log 2>&1
log "tokenizer rc $?"
grep -h "psnr\|judge" $R/tok/metrics.jsonl | cut -c1-200 >> $K/j22.log
T=$R/tok/export/tokenizer
python3 - $T <<'PY'
import sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
f = sys.argv[1] + "/model.safetensors"
with safe_open(f, "pt") as g:
    md = g.metadata()
save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, f, metadata=md)
PY
tar cf - -C $R/tok/export tokenizer -C $R tok/metrics.jsonl tok.log  | split -b 15M - $OUT/tok.tar.
log "tok PACKED"
cp $K/j22.log $OUT/

for w in v2 v1; do
  python3 scripts/probe_latents.py --model $T --world $w --device cuda --out $OUT/probe_$w.json > $R/probe_$w.log 2>&1
  echo "probe $w" >> $K/j22.log; tail -6 $R/probe_$w.log >> $K/j22.log
done
cp $K/j22.log $OUT/
