#!/usr/bin/env bash
# Train the bundled flowtok-shapes model, phase by phase (each phase fits one 10-minute GPU job).
#   scripts/train_shapes.sh tokenizer   # image tokenizer || text autoencoder (projector + decoder)
#   scripts/train_shapes.sh latents     # pre-tokenise shapes samples (image latents + MiniLM states)
#   scripts/train_shapes.sh flows       # T2I flow || I2T flow, both on the frozen text-autoencoder projector
#   scripts/train_shapes.sh assemble    # gather the exports into src/flowtok/pretrained/flowtok-shapes (fp16)
# MINUTES: each run's time budget; RUNS: the run root (default runs/shapes); PY: the python to use.
# The world is the shapes world's default (v2: varied positions, sizes, rotations, shades, backgrounds, styles).
#
# Fine-tuning on v2 from a pipeline folder (FINETUNE=1): INIT names the folder whose tokenizer and flows
# start the runs (model.init_from) and whose text projector and decoder are kept frozen (its text side already
# reproduces every caption of the grammar, which v2 leaves unchanged, and a new projector would move the latent
# space the flows were trained on), so the `tokenizer` phase trains the tokenizer alone and `flows` / `assemble`
# read the text side from INIT. The schedules are cosine to 5% over about the steps the given minutes reach on
# one H200; N_V1 v1 scenes join the v2 latents (flowtok data merge) to keep the old world's numbers. The tenth
# attempt of docs/results.md ran exactly this from the bundle (one H200, about 21 minutes of training):
#   FINETUNE=1 MINUTES=10.5 scripts/train_shapes.sh tokenizer
#   N_LATENTS=200000 N_V1=50000 scripts/train_shapes.sh latents
#   FINETUNE=1 MINUTES=9.5 scripts/train_shapes.sh flows;   FINETUNE=1 scripts/train_shapes.sh assemble
# From scratch (the v1 bundle): tokenizer 7 min, text autoencoder 4 min, latents 100k, T2I 7.2 min,
# I2T 11 min (MINUTES=11 for the flows phase), one H100 (see the model card and docs/training.md).
# The tokenizer's export measures the latent scale factor the flows use (model.scale_images).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
MINUTES=${MINUTES:-7}
RUNS=${RUNS:-runs/shapes}
FINETUNE=${FINETUNE:-0}
INIT=${INIT:-src/flowtok/pretrained/flowtok-shapes}
mkdir -p "$RUNS"
train() { $PY -m flowtok.cli train "$@" train.max_minutes="$MINUTES" train.progress=false; }
if [ "$FINETUNE" = 1 ]; then
  P=$INIT; TEXT_DECODER=$INIT/text_decoder
  COS=(train.schedule=cosine train.min_lr_ratio=0.05 train.warmup_steps=300)
  TOK_INIT=(model.init_from=$INIT/tokenizer "${COS[@]}" train.batch_size=256 train.lr=4.0e-4
    train.steps=${TOK_STEPS:-10500} train.compile=true train.eval_every=2500 data.workers=${WORKERS:-12}
    data.render_ahead=16)
  T2I_INIT=(model.init_from=$INIT/t2i_flow "${COS[@]}" train.lr=5.0e-4 train.steps=${T2I_STEPS:-12500})
  I2T_INIT=(model.init_from=$INIT/i2t_flow "${COS[@]}" train.lr=6.0e-4 train.steps=${I2T_STEPS:-14000})
else
  P=$RUNS/text_autoencoder/export; TEXT_DECODER=$P/text_decoder
  TOK_INIT=(); T2I_INIT=(); I2T_INIT=()
fi
case "${1:?phase}" in
  tokenizer)
    train configs/shapes/tokenizer.yaml run_dir=$RUNS/tokenizer "${TOK_INIT[@]}" > $RUNS.tokenizer.log 2>&1 &
    if [ "$FINETUNE" != 1 ]; then
      MINUTES=$(awk "BEGIN{print $MINUTES * 0.6}") train configs/shapes/text_autoencoder.yaml \
        run_dir=$RUNS/text_autoencoder > $RUNS.text_autoencoder.log 2>&1 &
    fi
    wait || true ;;
  latents)
    TOK=$RUNS/tokenizer/export/tokenizer
    if [ "${N_V1:-0}" -gt 0 ]; then
      $PY -m flowtok.cli pretokenize --tokenizer $TOK --out $RUNS/latents_v2 --n ${N_LATENTS:-100000} \
        --batch-size 2048 --no-progress
      $PY -m flowtok.cli pretokenize --tokenizer $TOK --out $RUNS/latents_v1 --n $N_V1 --world v1 --seed 7 \
        --batch-size 2048 --no-progress
      $PY -m flowtok.cli data merge $RUNS/latents_v2 $RUNS/latents_v1 --out $RUNS/latents
    else
      $PY -m flowtok.cli pretokenize --tokenizer $TOK --out $RUNS/latents --n ${N_LATENTS:-100000} \
        --batch-size 2048 --no-progress
    fi ;;
  flows)
    train configs/shapes/t2i.yaml run_dir=$RUNS/t2i model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      model.projector_path=$P/text_projector data.path=$RUNS/latents "${T2I_INIT[@]}" > $RUNS.t2i.log 2>&1 &
    train configs/shapes/i2t.yaml run_dir=$RUNS/i2t model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      model.projector_path=$P/text_projector model.decoder_path=$TEXT_DECODER data.path=$RUNS/latents \
      "${I2T_INIT[@]}" > $RUNS.i2t.log 2>&1 &
    wait || true ;;
  assemble)
    $PY -m flowtok.cli assemble --out "${OUT_MODEL:-src/flowtok/pretrained/flowtok-shapes}" --dtype fp16 \
      --tokenizer $RUNS/tokenizer/export/tokenizer --text-projector $P/text_projector \
      --t2i-flow $RUNS/t2i/export/t2i_flow --i2t-flow $RUNS/i2t/export/i2t_flow \
      --text-decoder $TEXT_DECODER --defaults '{"guidance_scale": 3.0, "caption_grammar": "shapes"}' ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
