#!/usr/bin/env bash
# Train the bundled flowtok-shapes model, phase by phase (each phase fits one 10-minute GPU job).
#   scripts/train_shapes.sh tokenizer   # image tokenizer  || text autoencoder check (issue: 99% round trip)
#   scripts/train_shapes.sh latents     # pre-tokenise 150k shapes samples (needs the tokenizer)
#   scripts/train_shapes.sh t2i         # text projector + T2I flow (needs the tokenizer)
#   scripts/train_shapes.sh i2t         # text decoder || I2T flow (need the t2i projector)
#   scripts/train_shapes.sh assemble    # gather the exports into models/flowtok-shapes (fp16)
# MINUTES sets each run's time budget; RUNS the run root (default runs/shapes).
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
    MINUTES=$(awk "BEGIN{print $MINUTES - 1}") train configs/shapes/text_autoencoder.yaml run_dir=$RUNS/text_autoencoder \
      > $RUNS.text_autoencoder.log 2>&1 &
    wait || true ;;
  latents)
    $PY -m flowtok.cli pretokenize --tokenizer $RUNS/tokenizer/export/tokenizer --out $RUNS/latents \
      --n ${N_LATENTS:-150000} --batch-size 1024 --no-progress ;;
  t2i)
    train configs/shapes/t2i.yaml run_dir=$RUNS/t2i model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      data.path=$RUNS/latents > $RUNS.t2i.log 2>&1 ;;
  i2t)
    MINUTES=$(awk "BEGIN{print $MINUTES * 0.75}") train configs/shapes/text_decoder.yaml run_dir=$RUNS/text_decoder \
      model.projector_path=$RUNS/t2i/export/text_projector > $RUNS.text_decoder.log 2>&1 &
    train configs/shapes/i2t.yaml run_dir=$RUNS/i2t model.tokenizer_path=$RUNS/tokenizer/export/tokenizer \
      model.projector_path=$RUNS/t2i/export/text_projector \
      model.decoder_path=$RUNS/text_decoder/export/text_decoder data.path=$RUNS/latents > $RUNS.i2t.log 2>&1 &
    wait || true ;;
  assemble)
    $PY -m flowtok.cli assemble --out "${OUT_MODEL:-src/flowtok/pretrained/flowtok-shapes}" --dtype fp16 \
      --tokenizer $RUNS/tokenizer/export/tokenizer --text-projector $RUNS/t2i/export/text_projector \
      --t2i-flow $RUNS/t2i/export/t2i_flow --i2t-flow $RUNS/i2t/export/i2t_flow \
      --text-decoder $RUNS/text_decoder/export/text_decoder ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
