"""Training steps/s of the real trainer on audio shards vs encoded shards (encode-shards), side by side.

    python benchmarks/encoded_step.py [--config configs/audioldm_s.yaml] [--steps 6] [--ranks 2] [--out DIR]

Builds a small demo set → make-shards → encode-shards (same config, same random-initialised weights as the
trainer builds with its seed), then runs `deepspeed --num_gpus RANKS train.py` three times with the same
config, seed and micro-batch:
- audio shards, STFT/log-mel in the loader workers (`data.features_in_loader=true`, the original's way),
- audio shards, features on the trainer's device (`data.features_in_loader=false`),
- encoded shards (no decode, STFT, VAE encoder or conditioner forward).
Steps/s is 1 / the median logged `step_seconds` after the first step (start-up and warm-up left out).
The conditioner is random-initialised (`conditioner.random_init=true`: no CLAP weights offline); its cost
is the real architecture's. Prints a markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OFFLINE = ["--set", "conditioner.random_init=true", "--set", "train.logger=none", "--set", "data.num_workers=1",
           "--set", "data.allow_shard_sharing=true"]


def run(command: list[str], **kwargs) -> None:
    result = subprocess.run([str(c) for c in command], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(map(str, command))}\n{result.stdout[-3000:]}"
                         f"\n{result.stderr[-3000:]}")


def make_data(work: Path, config: str, num_clips: int) -> tuple[Path, Path]:
    run([BIN / "python", "-m", "audioldm_dist.demo_data", work / "data", "--num-clips", num_clips, "--seed", "0"])
    audio = work / "audio_shards"
    run([BIN / "make-shards", "--metadata-root", work / "data/metadata/dataset_root.json", "--dataset", "demo",
         "--split", "train", "--out", audio, "--workers", "2", "--max-count", "8", "--quiet"])
    encoded = work / "encoded_shards"
    run([BIN / "encode-shards", "--config", config, "--out", encoded, "--workers", "1", "--quiet",
         *OFFLINE[:2], audio])
    return audio, encoded


def steps_per_second(work: Path, name: str, *, port: int, config: str, shards: Path, steps: int, ranks: int,
                     extra: list[str]) -> float:
    run_dir = work / f"run_{name}"
    run([BIN / "deepspeed", "--num_gpus", ranks, "--master_port", port, "train.py",
         "--deepspeed_config", "configs/ds/zero2.json", "--config", config, "--run-dir", run_dir,
         "--train-data", shards, "--max-steps", steps, "--save-every", 10**6, *OFFLINE, *extra])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return 1.0 / statistics.median(r["step_seconds"] for r in records if r["step"] > 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/audioldm_s.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.out or Path(tempfile.mkdtemp(prefix="encoded_step_"))
    audio, encoded = make_data(work, args.config, args.clips)
    common = dict(config=args.config, steps=args.steps, ranks=args.ranks)
    rows = {
        "audio shards, features in the loader": steps_per_second(
            work, "loader", port=29731, shards=audio, extra=["--set", "data.features_in_loader=true"], **common),
        "audio shards, features on the trainer": steps_per_second(
            work, "trainer", port=29732, shards=audio, extra=["--set", "data.features_in_loader=false"], **common),
        "encoded shards": steps_per_second(work, "encoded", port=29733, shards=encoded, extra=[], **common),
    }
    base = rows["audio shards, features in the loader"]
    print(f"## Training steps/s, {args.config}, {args.ranks} CPU ranks (ZeRO-2, {args.steps} steps each)\n")
    print("| data | steps/s | vs audio shards (features in the loader) |")
    print("|---|---:|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} | {value / base:.2f}x |")
    print(json.dumps({"benchmark": "encoded_step", "config": args.config, "ranks": args.ranks,
                      "steps_per_s": {k: round(v, 4) for k, v in rows.items()},
                      "encoded_vs_audio": round(rows["encoded shards"] / base, 3)}))


if __name__ == "__main__":
    main()
