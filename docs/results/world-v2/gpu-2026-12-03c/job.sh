#!/usr/bin/env bash
# issue 20, sixth attempt (two segments): both flows on the v2 tokenizer's posterior MODES (model.image_latent=mode), from
# the fourth attempt's sample-trained flows. Call A brings minilm + text side + this script; call B brings
# the tokenizer and the flows' inits and touches parts_ready. Packs only the two flows (the rest is here).
set -u
K=/tmp/keep; I=$K/init; R=$K/runs; mkdir -p $R $K/pack
rm -rf $K/repo && mkdir -p $K/repo && cp -r src configs scripts $K/repo/ && cd $K/repo
export PYTHONPATH=$K/minilm:$K/repo/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ft() { python3 -m flowtok.cli train "$@" train.progress=false train.tensorboard=false; }
log() { echo "$* $(date +%T)" >> $K/j20.log; }
log start
while [ ! -f $K/parts_ready ]; do sleep 1; done
log "parts here"
python3 -m flowtok.cli pretokenize --tokenizer $I/tokenizer --out $R/latents --n ${N_LAT:-200000} \
  --batch-size 2048 --no-progress > $R/latents.log 2>&1
log "latents rc $?"
seg() {  # $1 = segment name, $2 = t2i init, $3 = i2t init, $4 = minutes, $5 = t2i lr, $6 = i2t lr
ft configs/shapes/t2i.yaml run_dir=$R/$1/t2i model.tokenizer_path=$I/tokenizer model.image_latent=mode \
  model.projector_path=$I/text_projector data.path=$R/latents model.init_from=$2 train.lr=$5 \
  train.warmup_steps=300 train.max_minutes=$4 train.eval_every=3000 > $R/$1_t2i.log 2>&1 &
ft configs/shapes/i2t.yaml run_dir=$R/$1/i2t model.tokenizer_path=$I/tokenizer model.image_latent=mode \
  model.projector_path=$I/text_projector model.decoder_path=$I/text_decoder data.path=$R/latents \
  model.init_from=$3 train.lr=$6 train.warmup_steps=300 train.max_minutes=$4 \
  train.eval_every=3000 > $R/$1_i2t.log 2>&1 &
wait
log "$1 flows done"
grep -h "judge\|exact" $R/$1/t2i/metrics.jsonl $R/$1/i2t/metrics.jsonl | cut -c1-200 >> $K/j20.log
rm -rf $R/h_$1 && mkdir -p $R/h_$1 && cp -r $R/$1/t2i/export/t2i_flow $R/$1/i2t/export/i2t_flow $R/h_$1/
python3 - $R/h_$1 <<'PY' >> $K/j20.log 2>&1
import sys, pathlib
from safetensors import safe_open
from safetensors.torch import load_file, save_file
for f in pathlib.Path(sys.argv[1]).glob("*_flow/model.safetensors"):
    with safe_open(str(f), "pt") as g:
        md = g.metadata()
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, str(f), metadata=md)
    print("fp16", f)
PY
mkdir -p $K/pack_$1
tar cf - -C $R/h_$1 t2i_flow i2t_flow | split -b 15M - $K/pack_$1/flows.tar.
tar cf $K/pack_$1/records.tar -C $K j20.log -C $R $1/t2i/metrics.jsonl $1/i2t/metrics.jsonl $1_t2i.log $1_i2t.log latents.log 2>/dev/null
log "$1 PACKED"
}
seg s1 $I/t2i_flow $I/i2t_flow ${FLOW_MIN:-6.8} 5.0e-4 6.0e-4
seg s2 $R/s1/t2i/export/t2i_flow $R/s1/i2t/export/i2t_flow ${FLOW_MIN2:-7.0} 3.0e-4 3.5e-4
log JOBDONE
