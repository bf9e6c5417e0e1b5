#!/usr/bin/env bash
# Idempotent set-up: Python venv in .venv (torch pinned to the CPU wheel), the Transformers.js
# test client in tests/js/node_modules, and Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import graphkit, torch, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.graphkit-installed ] || [ constraints.txt -nt .venv/.graphkit-installed ]; then
  echo "[setup] installing Python packages (torch==2.13.0 CPU first; exact versions from constraints.txt)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  # the distribution was called "graphkit" before it took its own PyPI name (onnx-graphkit)
  if .venv/bin/pip show -q graphkit >/dev/null 2>&1; then .venv/bin/pip uninstall -q -y graphkit; fi
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[export,test]"
  touch .venv/.graphkit-installed
fi
if [ "${GRAPHKIT_SKIP_JS:-0}" != "1" ]; then
  if ! command -v node >/dev/null; then echo "[setup] node is required for the Transformers.js tests" >&2; exit 1; fi
  if [ ! -d tests/js/node_modules/@huggingface/transformers ] || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
    echo "[setup] installing the pinned Transformers.js client (npm ci)"
    (cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
  fi
  if [ "${GRAPHKIT_SKIP_BROWSER:-0}" != "1" ] && [ ! -x /usr/bin/chromium ]; then
    echo "[setup] installing Debian's chromium"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
