#!/usr/bin/env bash
# One check of a CUDA machine in ≤ 8 minutes: attention kernels, the S-UNet's ZeRO-2 bf16 step (samples/s,
# MFU, peak memory), the M model under a 15 GiB cap with CPU offload and checkpointing, an fp16 loss-scaled
# step, encoded vs on-the-fly data. Prints one markdown table, then one JSON line (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--log-dir DIR]   # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --cpu-smoke       # every part at toy sizes on the CPU
#
# Python: $GPU_CHECK_PYTHON if set, else the repository's .venv if it has one, else python3 (no network is
# needed or used; scripts/setup_env.sh makes the .venv where a registry is reachable). What the
# environment lacks (torch, CUDA, deepspeed, xformers, encode-shards) is said here and in the table.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  PYTHON="$GPU_CHECK_PYTHON"  # an environment elsewhere (the test passes its own)
  export PATH="$(dirname "$PYTHON"):$PATH"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
  export PATH="$ROOT/.venv/bin:$PATH"  # console scripts of the environment (encode-shards, deepspeed)
else
  PYTHON="$(command -v python3 || true)"
  if [[ -z "$PYTHON" ]]; then
    echo "gpu_check: error: neither $ROOT/.venv/bin/python nor python3 found" >&2
    exit 2
  fi
  echo "gpu_check: no $ROOT/.venv; using $PYTHON" >&2
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: error: $PYTHON cannot import torch; make $ROOT/.venv (bash scripts/setup_env.sh, needs a package registry) or set GPU_CHECK_PYTHON to a Python that has the repository's requirements" >&2
  exit 2
fi
echo "gpu_check: $PYTHON; the table's first line names what it lacks (deepspeed, xformers, encode-shards)" >&2
export HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" && exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
