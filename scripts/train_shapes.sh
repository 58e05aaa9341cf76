#!/usr/bin/env bash
# Train the bundled flowtok-shapes model, phase by phase (each phase fits one 10-minute GPU job).
#   scripts/train_shapes.sh tokenizer   # image tokenizer || text autoencoder (projector + decoder)
#   scripts/train_shapes.sh latents     # pre-tokenise shapes samples (image latents + MiniLM states)
#   scripts/train_shapes.sh flows       # T2I flow || I2T flow, both on the frozen text-autoencoder projector
#   scripts/train_shapes.sh assemble    # gather the exports into src/flowtok/pretrained/flowtok-shapes (fp16)
# MINUTES: each run's time budget; RUNS: the run root (default runs/shapes); PY: the python to use.
# The bundled model: tokenizer 7 min, text autoencoder 4 min, latents 100k, T2I 7.2 min, I2T 11 min
# (MINUTES=11 for the flows phase), one H100 (see its model card and docs/training.md for steps and numbers).
# The tokenizer's export measures the latent scale factor the flows use (model.scale_images).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
MINUTES=${MINUTES:-7}
RUNS=${RUNS:-runs/shapes}
mkdir -p "$RUNS"
train() { $PY -m flowtok.cli train "$@" train.max_minutes="$MINUTES" train.progress=false; }
case "${1:?phase}" in
  tokenizer)
    train configs/shapes/tokenizer.yaml run_dir=$RUNS/tokenizer > $RUNS.tokenizer.log 2>&1 &
    MINUTES=$(awk "BEGIN{print $MINUTES * 0.6}") train configs/shapes/text_autoencoder.yaml \
      run_dir=$RUNS/text_autoencoder > $RUNS.text_autoencoder.log 2>&1 &
    wait || true ;;
  latents)
    $PY -m flowtok.cli pretokenize --tokenizer $RUNS/tokenizer/export/tokenizer --out $RUNS/latents \
      --n ${N_LATENTS:-100000} --batch-size 2048 --no-progress ;;
  flows)
    P=$RUNS/text_autoencoder/export
    train configs/shapes/t2i.yaml run_dir=$RUNS/t2i model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      model.projector_path=$P/text_projector data.path=$RUNS/latents > $RUNS.t2i.log 2>&1 &
    train configs/shapes/i2t.yaml run_dir=$RUNS/i2t model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      model.projector_path=$P/text_projector model.decoder_path=$P/text_decoder data.path=$RUNS/latents \
      > $RUNS.i2t.log 2>&1 &
    wait || true ;;
  assemble)
    P=$RUNS/text_autoencoder/export
    $PY -m flowtok.cli assemble --out "${OUT_MODEL:-src/flowtok/pretrained/flowtok-shapes}" --dtype fp16 \
      --tokenizer $RUNS/tokenizer/export/tokenizer --text-projector $P/text_projector \
      --t2i-flow $RUNS/t2i/export/t2i_flow --i2t-flow $RUNS/i2t/export/i2t_flow \
      --text-decoder $P/text_decoder --defaults '{"guidance_scale": 3.0}' ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
