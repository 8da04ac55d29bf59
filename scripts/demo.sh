#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset, set-up included: bash scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN=${1:-demo_run}
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$RUN"
echo "== 1/2 demo dataset → $RUN/data"
$PY -m audioldm_dist.demo_data "$RUN/data" --num-clips 240 --seed 0
echo "== 2/2 shards → $RUN/shards"
for split in train val test; do
  .venv/bin/make-shards --metadata-root "$RUN/data/metadata/dataset_root.json" --dataset demo --split "$split" \
    --out "$RUN/shards/$split" --workers 2 --max-count 32
  .venv/bin/make-shards --verify "$RUN/shards/$split" --workers 2 --quiet
done
echo "demo finished: shards in $RUN/shards"
