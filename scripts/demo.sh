#!/usr/bin/env bash
# The main job on the shipped example: convert the fine-tuned epicrisis model to a Transformers.js
# folder (fp32, fp16, q4, q4f16, q8), verify it, then let Transformers.js (Node) write an epicrisis.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPHKIT_SKIP_BROWSER=1 bash scripts/setup.sh
OUT=${1:-out/epicrisis-tiny}
.venv/bin/graphkit convert --output "$OUT" --overwrite
node tests/js/demo.mjs "$OUT"
