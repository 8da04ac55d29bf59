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
# Reference implementations the tests compare against (the original's CLAP and VAE-loss modules). Without their
# dependencies: laion-clap pins numpy<2 and taming-transformers pulls a whole training stack; what they import
# is in the dev extra.
"$VENV/bin/python" -m pip install --quiet --no-deps -c "$VENV/constraints.txt" laion-clap==1.1.7 torchlibrosa==0.1.0 \
  taming-transformers-rom1504==0.0.6
# DeepSpeed's CPU ops (shared-memory all-reduce, fused Adam, CPU Adam), built once here (~100 s) instead of
# inside the first training run; they go into this environment (audioldm_dist.engine.distributed.extensions_dir).
"$VENV/bin/python" -m audioldm_dist.engine.prebuild_ops
echo "$stamp_value" > "$VENV/.installed"
