#!/usr/bin/env bash
# The test suite, set-up included: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline}
# The tests build every model from configs: nothing is fetched from the model hub (transformers then fails at
# once instead of retrying for minutes on a machine without network).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/python -m pytest "$@"
