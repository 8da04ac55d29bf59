#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset, set-up included: bash scripts/demo.sh [RUN_DIR]
# demo data → shards → train a tiny AudioLDM on 2 CPU ranks (DeepSpeed ZeRO-2) → checkpoint →
# resume from it → export → sample wavs for a few captions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${1:-demo_run}
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$OUT"
echo "== 1/6 demo dataset → $OUT/data"
$PY -m audioldm_dist.demo_data "$OUT/data" --num-clips 240 --seed 0
echo "== 2/6 shards → $OUT/shards"
for split in train val test; do
  .venv/bin/make-shards --metadata-root "$OUT/data/metadata/dataset_root.json" --dataset demo --split "$split" \
    --out "$OUT/shards/$split" --workers 2 --max-count 32
  .venv/bin/make-shards --verify "$OUT/shards/$split" --workers 2 --quiet
done
TRAIN=(.venv/bin/deepspeed --num_gpus 2 train.py --deepspeed_config configs/ds/zero2.json --config configs/tiny.yaml
       --run-dir "$OUT/run" --train-data "$OUT/shards/train" --val-data "$OUT/shards/val" --save-every 100 --set train.logger=wandb)
echo "== 3/6 train 200 steps on 2 CPU ranks, checkpoints every 100 → $OUT/run"
"${TRAIN[@]}" --max-steps 200
echo "== 4/6 resume from the last checkpoint and train to step 300"
"${TRAIN[@]}" --max-steps 300
echo "== 5/6 export the run → one checkpoint file"
$PY -m audioldm_dist.export "$OUT/run"
echo "== 6/6 sample wavs for demo captions → $OUT/samples"
printf '%s\n' "A steady sine wave tone at 440 Hz, the note A4" \
  "siren|A wailing siren rising and falling 1 times per second" \
  "A fast rhythmic beat at 150 beats per minute with 800 Hz clicks" > "$OUT/captions.lst"
$PY -m audioldm_dist.infer --config configs/tiny.yaml --ckpt "$OUT/run/export_global_step300.ckpt" \
  --list_inference "$OUT/captions.lst" --out "$OUT/samples" --ddim_steps 50 --guidance_scale 3.0
echo "demo finished: loss curve in $OUT/run/metrics.jsonl, checkpoints in $OUT/run/checkpoints, samples in $OUT/samples"
