#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU torch first (an open torch
# range would pull a multi-GB CUDA build), then the project, then Debian's Chromium for the
# browser tests. Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install --quiet "torch==2.13.0"
fi
# Reinstall the project only when pyproject.toml changed since the last set-up.
stamp=.venv/.visrl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
if [ "${VISRL_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will fail" >&2
  else
    echo "warning: chromium is missing and this is not root; install it for the browser tests" >&2
  fi
fi
