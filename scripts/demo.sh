#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset, set-up included: bash scripts/demo.sh [RUN_DIR]
# demo data → shards → the original's two stages on 2 CPU ranks (DeepSpeed ZeRO-2): the VAE (train.target=vae),
# then the latent diffusion model on its latents, checkpointed, resumed once, validated with samples → export →
# sample the test captions on 2 ranks → evaluate (metrics and caption conformance) → an HTML report.
# About 9 minutes on 2 cores after set-up; its test samples follow their captions (tone note and chirp direction,
# docs/demo.md: "The demo: does it learn?").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${1:-demo_run}
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything is built from configs; no hub retries on offline machines
VAE_STEPS=${DEMO_VAE_STEPS:-200}
LDM_STEPS=${DEMO_LDM_STEPS:-1000}
VAL_EVERY=${DEMO_VAL_EVERY:-$((LDM_STEPS / 2))}  # benchmarks/learning.py validates more often
VAL_SAMPLES=${DEMO_VAL_SAMPLES:-12}
started=$SECONDS
mkdir -p "$OUT"
echo "== 1/9 demo dataset → $OUT/data"
$PY -m audioldm_dist.demo_data "$OUT/data" --num-clips 480 --seed 0
echo "== 2/9 shards → $OUT/shards"
for split in train val test; do
  .venv/bin/make-shards --metadata-root "$OUT/data/metadata/dataset_root.json" --dataset demo --split "$split" \
    --out "$OUT/shards/$split" --workers 2 --max-count 64 --quiet
done
.venv/bin/make-shards --verify "$OUT/shards/train" --workers 2 --quiet
DATA=(--train-data "$OUT/shards/train" --val-data "$OUT/shards/val")
echo "== 3/9 stage 1: the VAE, $VAE_STEPS steps on 2 CPU ranks → $OUT/vae"
.venv/bin/deepspeed --num_gpus 2 train.py --deepspeed_config configs/ds/vae.json --config configs/demo.yaml \
  --run-dir "$OUT/vae" "${DATA[@]}" --max-steps "$VAE_STEPS" --save-every "$VAE_STEPS" --set train.target=vae \
  --set train.val_every="$VAE_STEPS" --set train.logger=wandb
$PY -m audioldm_dist.export "$OUT/vae" --out "$OUT/vae/vae.ckpt"
LDM=(.venv/bin/deepspeed --num_gpus 2 train.py --deepspeed_config configs/ds/zero2.json --config configs/demo.yaml
     --run-dir "$OUT/run" "${DATA[@]}" --set vae.reload_from_ckpt="$OUT/vae/vae.ckpt" --save-every $((LDM_STEPS / 2))
     --set train.val_every="$VAL_EVERY" --set train.val_num_samples="$VAL_SAMPLES" --set train.learning_rate=0.002
     --set train.micro_batch_size=8  # 16 clips a step: 1.6x the samples/s of 4 on 2 cores, and the notes are learned
     --set train.logger=wandb)
echo "== 4/9 stage 2: the latent diffusion model on the VAE's latents, $((LDM_STEPS / 2)) steps → $OUT/run"
"${LDM[@]}" --max-steps $((LDM_STEPS / 2))
echo "== 5/9 resume from the checkpoint at step $((LDM_STEPS / 2)) and train to step $LDM_STEPS"
"${LDM[@]}" --max-steps "$LDM_STEPS"
echo "== 6/9 export the run → one checkpoint file"
$PY -m audioldm_dist.export "$OUT/run"
echo "== 7/9 sample the demo test split's captions (2 ranks) → $OUT/samples"
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
entries = json.loads((out / "data/metadata/demo/datafiles/demo_test.json").read_text())["data"]
lines = [f"{pathlib.Path(e['wav']).stem}|{e['caption']}" for e in entries]
(out / "test_captions.lst").write_text("\n".join(lines) + "\n")
print(f"{len(lines)} test captions → {out / 'test_captions.lst'}")
PYEOF
.venv/bin/deepspeed --num_gpus 2 --module audioldm_dist.infer --config configs/demo.yaml \
  --ckpt "$OUT/run/export_global_step$LDM_STEPS.ckpt" --list_inference "$OUT/test_captions.lst" --out "$OUT/samples" \
  --batch_size 12  # at the trained length (0.64 s): a longer clip than the UNet saw loses the pitch
echo "== 8/9 evaluate the samples: caption conformance, and the metrics against the test split's clips"
$PY -m audioldm_dist.eval --conformance --generated "$OUT/samples"
# --random-backbones: the demo has no released PANNs/VGGish/CLAP weights (offline); these numbers only show the wiring.
# --pad-short: 0.64 s clips are zero-padded to one VGGish patch (0.975 s) rather than skipped.
$PY -m audioldm_dist.eval --generated "$OUT/samples" --reference "$OUT/data/audio/test" --random-backbones --pad-short

echo "== 9/9 the run report"
$PY -m audioldm_dist.report "$OUT/run" --samples "$OUT/samples" --out "$OUT/report.html"
echo "demo finished in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s: test-caption samples in $OUT/samples"
echo "(NAME.wav + NAME.json), caption conformance above and in $OUT/samples.conformance.json; open the report:"
echo "  $OUT/report.html"
