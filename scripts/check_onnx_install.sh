#!/usr/bin/env bash
# `pip install flowtok[onnx]` in a fresh venv pulls no torch, the runtime runs an export there (captions under
# its grammar included), and a torch-needing command says which extra to install. Downloads from PyPI.
#   scripts/check_onnx_install.sh EXPORT_DIR [VENV]     (EXPORT_DIR from `flowtok export onnx --out EXPORT_DIR`)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export_dir=$(cd "${1:?usage: $0 EXPORT_DIR [VENV]}" && pwd)
venv=${2:-$(mktemp -d)/venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip -q --disable-pip-version-check install "$repo[onnx]"
"$venv/bin/python" -m pip --disable-pip-version-check list --format=freeze > "$venv/installed.txt"
if grep -iE '^(torch|transformers|torchvision|triton)==' "$venv/installed.txt"; then
    echo "FAIL: flowtok[onnx] installed the packages above" >&2
    exit 1
fi
echo "flowtok[onnx] installed $(wc -l < "$venv/installed.txt") packages, none of them torch:"
tr '\n' ' ' < "$venv/installed.txt"
echo
cd "$venv"  # not the repository: the installed flowtok, not src/
"$venv/bin/python" - "$export_dir" <<'PY'
import sys
import time

import numpy as np

from flowtok.export.runtime import OnnxFlowTokPipeline

t0 = time.perf_counter()
pipe = OnnxFlowTokPipeline.from_pretrained(sys.argv[1], num_threads=2)
images = pipe.text_to_image(["a large red circle in the top left", "a small blue star at the center"], generator=0)
noise = np.random.default_rng(0).random((1, 3, pipe.image_size, pipe.image_size), dtype=np.float32)
captions = pipe.image_to_text(images) + pipe.image_to_text(noise)
assert "torch" not in sys.modules and "transformers" not in sys.modules
print(f"runtime ran without torch ({time.perf_counter() - t0:.1f} s), grammar {pipe.defaults.get('caption_grammar')}:",
      captions)
PY
set +e
"$venv/bin/flowtok" generate "a red circle" 2> "$venv/err.txt"
rc=$?
set -e
echo "flowtok generate without torch: exit $rc: $(cat "$venv/err.txt")"
[ "$rc" = 2 ] && [ "$(wc -l < "$venv/err.txt")" = 1 ]
echo "OK ($venv)"
