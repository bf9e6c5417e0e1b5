#!/usr/bin/env bash
# The whole test suite: Python unit and end-to-end tests, Transformers.js in Node and Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
