#!/usr/bin/env bash
# issue 20, ninth attempt (v2 latents plus a sixth of v1 ones): continue the eighth tokenizer (.carry/tok6: tok5 + 2,300 annealed steps) at KL 1e-8, then pre-tokenise 200k v2
# samples with it and fine-tune both flows from the eighth attempt's (.carry/flows8) in two segments. The
# tokenizer run and the second flow segment anneal (cosine to 5%); the earlier runs kept a constant lr.
# Call A brings minilm + text side + this script; call B brings tok6 + flows8, touches parts_ready and waits for
# "tok PACKED" (pack_tok); call C waits for "s1 PACKED" (pack_s1); call D for JOBDONE (pack_s2).
set -u
K=/tmp/keep; I=$K/init; R=$K/runs; mkdir -p $R
rm -rf $K/repo && mkdir -p $K/repo && cp -r src configs scripts $K/repo/ && cd $K/repo
export PYTHONPATH=$K/minilm:$K/repo/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ft() { python3 -m flowtok.cli train "$@" train.progress=false train.tensorboard=false; }
log() { echo "$* $(date +%T)" >> $K/j25.log; }
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
while [ ! -f $K/parts_ready ]; do sleep 1; done
log "parts here"
ft configs/shapes/tokenizer.yaml run_dir=$R/tok model.init_from=$I/tokenizer model.kl_weight=1.0e-8 \
  train.batch_size=256 train.lr=2.0e-4 train.warmup_steps=100 train.steps=${TOK_STEPS:-6400} train.schedule=cosine \
  train.min_lr_ratio=0.05 train.compile=true train.max_minutes=${TOK_MIN:-7.3} train.eval_every=2500 data.workers=12 data.render_ahead=16 \
  > $R/tok.log 2>&1
log "tokenizer rc $?"
grep -h "psnr\|judge\|latent_active" $R/tok/metrics.jsonl | cut -c1-200 >> $K/j25.log
mkdir -p $R/h_tok $K/pack_tok && cp -r $R/tok/export/tokenizer $R/h_tok/ && fp16 $R/h_tok
tar cf - -C $R/h_tok tokenizer -C $R tok/metrics.jsonl tok.log | split -b 15M - $K/pack_tok/tok.tar.
log "tok PACKED"
T=$R/tok/export/tokenizer  # full precision for pre-tokenising
python3 -m flowtok.cli pretokenize --tokenizer $T --out $R/latents --n ${N_LAT:-200000} --batch-size 2048 \
  --no-progress > $R/latents.log 2>&1
log "latents rc $?"
# a sixth of old-world (v1) scenes beside the v2 ones, so the flows keep the old world's numbers
python3 -m flowtok.cli pretokenize --tokenizer $T --out $R/latents_v1 --n ${N_V1:-40000} --world v1 --seed 7 \
  --batch-size 2048 --no-progress > $R/latents_v1.log 2>&1
log "latents v1 rc $?"
python3 - $R/latents $R/latents_v1 <<'PY' >> $K/j25.log 2>&1
import json, os, sys
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ma, mb = json.loads((a / "meta.json").read_text()), json.loads((b / "meta.json").read_text())
for s in mb["shards"]:
    os.replace(b / s["name"], a / ("v1-" + s["name"]))
    ma["shards"].append({"name": "v1-" + s["name"], "n": s["n"]})
ma["n"] += mb["n"]
ma["source"] = f"{ma['source']} + {mb['n']} v1 scenes (seed 7)"
tmp = a / "meta.json.tmp"; tmp.write_text(json.dumps(ma, indent=2)); os.replace(tmp, a / "meta.json")
print("merged", ma["n"], "samples")
PY
python3 scripts/probe_latents.py --model $T --world v2 --device cuda --out $R/probe_v2.json \
  > $R/probe_v2.log 2>&1 &
seg() {  # $1 = segment name, $2 = t2i init, $3 = i2t init, $4 = minutes, $5 = t2i lr, $6 = i2t lr,
       # $7 / $8 = extra t2i / i2t overrides (the schedule)
ft configs/shapes/t2i.yaml run_dir=$R/$1/t2i model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector data.path=$R/latents model.init_from=$2 train.lr=$5 \
  train.warmup_steps=300 train.max_minutes=$4 train.eval_every=3000 $7 > $R/$1_t2i.log 2>&1 &
ft configs/shapes/i2t.yaml run_dir=$R/$1/i2t model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector model.decoder_path=$I/text_decoder data.path=$R/latents \
  model.init_from=$3 train.lr=$6 train.warmup_steps=300 train.max_minutes=$4 \
  train.eval_every=3000 $8 > $R/$1_i2t.log 2>&1 &
wait
log "$1 flows done"
grep -h "judge\|exact" $R/$1/t2i/metrics.jsonl $R/$1/i2t/metrics.jsonl | cut -c1-200 >> $K/j25.log
rm -rf $R/h_$1 && mkdir -p $R/h_$1 $K/pack_$1 && cp -r $R/$1/t2i/export/t2i_flow $R/$1/i2t/export/i2t_flow $R/h_$1/
fp16 $R/h_$1
tar cf - -C $R/h_$1 t2i_flow i2t_flow | split -b 15M - $K/pack_$1/flows.tar.
tar cf $K/pack_$1/records.tar -C $K j25.log -C $R $1/t2i/metrics.jsonl $1/i2t/metrics.jsonl $1_t2i.log $1_i2t.log \
  latents.log latents_v1.log probe_v2.log probe_v2.json
log "$1 PACKED"
}
seg s1 $I/t2i_flow $I/i2t_flow ${FLOW_MIN:-6.5} 3.0e-4 3.5e-4 "" ""
# the second segment anneals: cosine to 5% over about the steps 6.5 min gives (T2I ~8,400, I2T ~10,700)
COS="train.schedule=cosine train.min_lr_ratio=0.05"
seg s2 $R/s1/t2i/export/t2i_flow $R/s1/i2t/export/i2t_flow ${FLOW_MIN2:-6.7} 2.5e-4 3.0e-4 \
  "$COS train.steps=8000" "$COS train.steps=10000"
log JOBDONE
