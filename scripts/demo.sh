#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset, set-up included: bash scripts/demo.sh [RUN_DIR]
# demo data → shards → train a tiny AudioLDM on 2 CPU ranks (DeepSpeed ZeRO-2) → checkpoint →
# resume from it → export → sample the test captions on 2 ranks → evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${1:-demo_run}
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything is built from configs; no hub retries on offline machines
mkdir -p "$OUT"
echo "== 1/7 demo dataset → $OUT/data"
$PY -m audioldm_dist.demo_data "$OUT/data" --num-clips 240 --seed 0
echo "== 2/7 shards → $OUT/shards"
for split in train val test; do
  .venv/bin/make-shards --metadata-root "$OUT/data/metadata/dataset_root.json" --dataset demo --split "$split" \
    --out "$OUT/shards/$split" --workers 2 --max-count 32
  .venv/bin/make-shards --verify "$OUT/shards/$split" --workers 2 --quiet
done
TRAIN=(.venv/bin/deepspeed --num_gpus 2 train.py --deepspeed_config configs/ds/zero2.json --config configs/tiny.yaml
       --run-dir "$OUT/run" --train-data "$OUT/shards/train" --val-data "$OUT/shards/val" --save-every 100 --set train.logger=wandb)
echo "== 3/7 train 200 steps on 2 CPU ranks, checkpoints every 100 → $OUT/run"
"${TRAIN[@]}" --max-steps 200
echo "== 4/7 resume from the last checkpoint and train to step 300"
"${TRAIN[@]}" --max-steps 300
echo "== 5/7 export the run → one checkpoint file"
$PY -m audioldm_dist.export "$OUT/run"
echo "== 6/7 sample wavs for the demo test split's captions (2 ranks) → $OUT/samples"
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
entries = json.loads((out / "data/metadata/demo/datafiles/demo_test.json").read_text())["data"]
lines = [f"{pathlib.Path(e['wav']).stem}|{e['caption']}" for e in entries]
(out / "test_captions.lst").write_text("\n".join(lines) + "\n")
print(f"{len(lines)} test captions → {out / 'test_captions.lst'}")
PYEOF
.venv/bin/deepspeed --num_gpus 2 --module audioldm_dist.infer --config configs/tiny.yaml \
  --ckpt "$OUT/run/export_global_step300.ckpt" --list_inference "$OUT/test_captions.lst" --out "$OUT/samples" \
  --ddim_steps 50 --guidance_scale 3.0 --n_candidates 2
echo "== 7/7 evaluate the samples against the demo test split, and the run's validation folders"
# --random-backbones: the demo has no released PANNs/VGGish/CLAP weights (offline); the numbers only show the wiring.
$PY -m audioldm_dist.eval --generated "$OUT/samples" --reference "$OUT/data/audio/test" --random-backbones \
  --out "$OUT/samples.metrics.json"
$PY -m audioldm_dist.eval --log_path "$OUT/run" --random-backbones
echo "demo finished: loss curve in $OUT/run/metrics.jsonl, checkpoints in $OUT/run/checkpoints, validation samples in"
echo "$OUT/run/val_step*, test-caption samples in $OUT/samples, metrics in $OUT/samples.metrics.json and $OUT/run/eval_summary.md"
