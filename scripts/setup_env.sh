#!/usr/bin/env bash
# Creates .venv (once) and installs audioldm-dist with its pinned torch/torchaudio pair.
# Idempotent and quick when nothing changed: a stamp records the hash of setup.py and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUDIOLDM_DIST_VENV:-.venv}
PYTHON=${PYTHON:-python3}
# torchaudio pins torch exactly; 2.11.0 is the CUDA build from PyPI that also runs on the CPU.
TORCH_PIN="torch==2.11.0 torchaudio==2.11.0"
stamp_value=$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$stamp_value" ]; then
  exit 0
fi
echo "setting up $VENV (first run: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
printf 'torch==2.11.0\ntorchaudio==2.11.0\n' > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install --quiet $TORCH_PIN
"$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" -e ".[dev]"
echo "$stamp_value" > "$VENV/.installed"
