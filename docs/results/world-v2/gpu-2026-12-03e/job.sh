#!/usr/bin/env bash
# issue 20, eighth attempt: 200k latents from the seventh tokenizer (.carry/tok5) and both flows from the sixth
# attempt's (.carry/flows4) in two segments. Call A brings minilm + text side + this script; call B brings tok5 +
# flows4, touches parts_ready and waits for "s1 PACKED"; call C waits for JOBDONE (s2).
set -u
K=/tmp/keep; I=$K/init; R=$K/runs; mkdir -p $R
rm -rf $K/repo && mkdir -p $K/repo && cp -r src configs scripts $K/repo/ && cd $K/repo
export PYTHONPATH=$K/minilm:$K/repo/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ft() { python3 -m flowtok.cli train "$@" train.progress=false train.tensorboard=false; }
log() { echo "$* $(date +%T)" >> $K/j23.log; }
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
T=$I/tokenizer  # the seventh tokenizer (KL 1e-8), carried in call B
python3 -m flowtok.cli pretokenize --tokenizer $T --out $R/latents --n ${N_LAT:-200000} --batch-size 2048 \
  --no-progress > $R/latents.log 2>&1
log "latents rc $?"
seg() {  # $1 = segment name, $2 = t2i init, $3 = i2t init, $4 = minutes, $5 = t2i lr, $6 = i2t lr
ft configs/shapes/t2i.yaml run_dir=$R/$1/t2i model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector data.path=$R/latents model.init_from=$2 train.lr=$5 \
  train.warmup_steps=300 train.max_minutes=$4 train.eval_every=3000 > $R/$1_t2i.log 2>&1 &
ft configs/shapes/i2t.yaml run_dir=$R/$1/i2t model.tokenizer_path=$T model.image_latent=mode \
  model.projector_path=$I/text_projector model.decoder_path=$I/text_decoder data.path=$R/latents \
  model.init_from=$3 train.lr=$6 train.warmup_steps=300 train.max_minutes=$4 \
  train.eval_every=3000 > $R/$1_i2t.log 2>&1 &
wait
log "$1 flows done"
grep -h "judge\|exact" $R/$1/t2i/metrics.jsonl $R/$1/i2t/metrics.jsonl | cut -c1-200 >> $K/j23.log
rm -rf $R/h_$1 && mkdir -p $R/h_$1 $K/pack_$1 && cp -r $R/$1/t2i/export/t2i_flow $R/$1/i2t/export/i2t_flow $R/h_$1/
fp16 $R/h_$1
tar cf - -C $R/h_$1 t2i_flow i2t_flow | split -b 15M - $K/pack_$1/flows.tar.
tar cf $K/pack_$1/records.tar -C $K j23.log -C $R $1/t2i/metrics.jsonl $1/i2t/metrics.jsonl $1_t2i.log $1_i2t.log latents.log
log "$1 PACKED"
}
seg s1 $I/t2i_flow $I/i2t_flow ${FLOW_MIN:-7.0} 4.0e-4 5.0e-4
seg s2 $R/s1/t2i/export/t2i_flow $R/s1/i2t/export/i2t_flow ${FLOW_MIN2:-7.0} 2.5e-4 3.5e-4
log JOBDONE
