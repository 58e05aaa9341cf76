#!/usr/bin/env bash
# Train the bundled flowtok-shapes model, phase by phase (each phase fits one 10-minute GPU job).
#   scripts/train_shapes.sh tokenizer   # image tokenizer || text autoencoder (projector + decoder)
#   scripts/train_shapes.sh latents     # pre-tokenise shapes samples (image latents + MiniLM states)
#   scripts/train_shapes.sh flows       # T2I flow || I2T flow, both on the frozen text-autoencoder projector
#   scripts/train_shapes.sh assemble    # gather the exports into src/flowtok/pretrained/flowtok-shapes (fp16)
# MINUTES: each run's time budget; RUNS: the run root (default runs/shapes); PY: the python to use.
# The world is the shapes world's default (v2: varied positions, sizes, rotations, shades, backgrounds, styles).
#
# Fine-tuning (how the current bundle was made from the v1 bundle; FINETUNE=1): INIT names a pipeline
# folder whose tokenizer and flows start the runs (model.init_from) and whose text projector and decoder
# are kept frozen (its text side already reproduces every caption of the grammar, which v2 leaves
# unchanged, and a new projector would move the latent space the flows were trained on), so the
# `tokenizer` phase trains the tokenizer alone and `flows` / `assemble` read the text side from INIT.
#   FINETUNE=1 MINUTES=5 scripts/train_shapes.sh tokenizer; N_LATENTS=100000 scripts/train_shapes.sh latents
#   FINETUNE=1 MINUTES=5 scripts/train_shapes.sh flows;     FINETUNE=1 scripts/train_shapes.sh assemble
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
  TOK_INIT=(model.init_from=$INIT/tokenizer train.lr=2.0e-4 train.warmup_steps=100 train.steps=3000)
  T2I_INIT=(model.init_from=$INIT/t2i_flow train.lr=3.0e-4 train.warmup_steps=200)
  I2T_INIT=(model.init_from=$INIT/i2t_flow train.lr=4.0e-4 train.warmup_steps=200)
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
    $PY -m flowtok.cli pretokenize --tokenizer $RUNS/tokenizer/export/tokenizer --out $RUNS/latents \
      --n ${N_LATENTS:-100000} --batch-size 2048 --no-progress ;;
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
