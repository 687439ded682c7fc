#!/usr/bin/env bash
# Creates .venv with the project and its test extras. torch's CPU build first: on these machines
# `pip install torch==2.13.0` takes a wheel already on disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -W ignore -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v 'is ignored' || true
.venv/bin/python -W ignore -c 'import torch' || { echo "setup.sh: torch did not install" >&2; exit 1; }
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v 'is ignored' || true
.venv/bin/python -c 'import autotune, autotune.engine, hydra, optuna, pandas, matplotlib, scipy, safetensors, psutil' || { echo "setup.sh: install failed" >&2; exit 1; }
