#!/usr/bin/env bash
# issue 20, tenth attempt: the whole v2 retrain in one session, from the bundle (the ninth attempt's weights,
# kept outside git, were lost with the checkout). Tokenizer from the bundle's at KL 1e-8 (cosine), then 200k v2 +
# 50k v1 samples pre-tokenised and joined with `flowtok data merge`, then both flows from the bundle's, side by
# side, cosine. Then a GPU evaluation of the assembled pipeline.
# Call A brings the bundle's tokenizer + text side + pipeline.json + this script (parts in $K/init, touches
# partsA); call B brings MiniLM (touches minilm_ready); call C the bundle's flows (flows_ready), waits for
# "tok PACKED"; call D waits for JOBDONE.
set -u
K=/tmp/keep; I=$K/init; R=$K/runs; mkdir -p $R
cd $K/repo
export PYTHONPATH=$K/minilm:$K/repo/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ft() { python3 -m flowtok.cli train "$@" train.progress=false train.tensorboard=false; }
log() { echo "$* $(date +%T)" >> $K/j30.log; }
fp16() { python3 - "$1" <<'PY'
import sys, pathlib
from safetensors import safe_open
from safetensors.torch import load_file, save_file
for f in pathlib.Path(sys.argv[1]).glob("*/model.safetensors"):
    with safe_open(str(f), "pt") as g:
        md = g.metadata()
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, str(f), metadata=md)
PY
}
log start
ft configs/shapes/tokenizer.yaml run_dir=$R/tok model.init_from=$I/tokenizer model.kl_weight=1.0e-8 \
  train.batch_size=256 train.lr=${TOK_LR:-4.0e-4} train.warmup_steps=300 train.steps=${TOK_STEPS:-10500} \
  train.schedule=cosine train.min_lr_ratio=0.05 train.compile=${COMPILE:-true} train.max_minutes=${TOK_MIN:-10.5} \
  train.eval_every=2500 data.workers=${WORKERS:-12} data.render_ahead=16 > $R/tok.log 2>&1
log "tokenizer rc $?"
grep -h "psnr\|judge\|latent_active" $R/tok/metrics.jsonl | cut -c1-220 >> $K/j30.log
mkdir -p $R/h_tok $K/pack_tok && cp -r $R/tok/export/tokenizer $R/h_tok/ && fp16 $R/h_tok
tar cf - -C $R/h_tok tokenizer -C $R tok/metrics.jsonl tok.log | split -b 15M - $K/pack_tok/tok.tar.
log "tok PACKED"
while [ ! -f $K/minilm_ready ]; do sleep 1; done
T=$R/tok/export/tokenizer  # full precision for pre-tokenising
python3 -m flowtok.cli pretokenize --tokenizer $T --out $R/lat_v2 --n ${N_LAT:-200000} --batch-size 2048 \
  --no-progress > $R/latents.log 2>&1
log "latents v2 rc $?"
python3 -m flowtok.cli pretokenize --tokenizer $T --out $R/lat_v1 --n ${N_V1:-50000} --world v1 --seed 7 \
  --batch-size 2048 --no-progress > $R/latents_v1.log 2>&1
log "latents v1 rc $?"
python3 -m flowtok.cli data merge $R/lat_v2 $R/lat_v1 --out $R/latents >> $K/j30.log 2>&1
log "merge rc $?"
while [ ! -f $K/flows_ready ]; do sleep 1; done
FM=${FLOW_MIN:-9.5}
ft configs/shapes/t2i.yaml run_dir=$R/t2i model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector data.path=$R/latents model.init_from=$I/t2i_flow train.lr=5.0e-4 \
  train.warmup_steps=300 train.schedule=cosine train.min_lr_ratio=0.05 train.steps=${T2I_STEPS:-12500} \
  train.max_minutes=$FM train.eval_every=3000 > $R/t2i.log 2>&1 &
ft configs/shapes/i2t.yaml run_dir=$R/i2t model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector model.decoder_path=$I/text_decoder data.path=$R/latents \
  model.init_from=$I/i2t_flow train.lr=6.0e-4 train.warmup_steps=300 train.schedule=cosine train.min_lr_ratio=0.05 \
  train.steps=${I2T_STEPS:-14000} train.max_minutes=$FM train.eval_every=3000 > $R/i2t.log 2>&1 &
wait
log "flows done"
grep -h "judge\|exact" $R/t2i/metrics.jsonl $R/i2t/metrics.jsonl | cut -c1-220 >> $K/j30.log
P=$R/pipe; rm -rf $P && mkdir -p $P && cp $I/pipeline.json $P/ && cp -r $I/text_projector $I/text_decoder $P/ \
  && cp -r $T $P/tokenizer && cp -r $R/t2i/export/t2i_flow $R/i2t/export/i2t_flow $P/ && fp16 $P
mkdir -p $K/pack_fl && tar cf - -C $P t2i_flow i2t_flow | split -b 15M - $K/pack_fl/flows.tar.
log "flows PACKED"
E="--model $P --device ${DEV:-cuda} --split held_out --n ${N_EVAL:-500} --objects 1,2,3"
for w in v2 v1; do
  python3 -m flowtok.cli eval i2t $E --world $w --no-metrics --out $R/gpu_i2t_$w.json > $R/gpu_i2t_$w.log 2>&1
  log "gpu eval $w rc $?"
done
python3 - $R >> $K/j30.log 2>&1 <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("gpu_*.json")):
    d = json.loads(f.read_text())
    for split, a in d.get("accuracy", {}).items():
        print(f.name, split, {k: round(v["exact"] * 100, 1) for k, v in a.get("objects", {}).items()})
PY
tar cf $K/pack_fl/records.tar -C $K j30.log -C $R t2i/metrics.jsonl i2t/metrics.jsonl t2i.log i2t.log latents.log \
  latents_v1.log tok.log $(cd $R && ls gpu_*)
log JOBDONE
