"""Does it learn? Trains the demo from scratch and prints caption conformance and validation loss against
minutes of training, so a change that breaks learning shows up as numbers.

    python benchmarks/learning.py [--out DIR] [--val-every 100] [--reuse]

Runs `scripts/demo.sh DIR` (both stages on 2 CPU ranks, the VAE then the latent diffusion model) with
validation every `--val-every` LDM steps, then, for every validation step, scores the EMA samples of the
val captions with the conformance metric (`python -m audioldm_dist.eval --conformance`) beside the
validation loss, then the test-caption samples, and samples of captions balanced over the notes, waves
and chirp directions (`demo_data.balanced_captions`: the demo's small test split is not balanced). Minutes are LDM training time: the sum of the
logged step times up to that step (start-up, validation and checkpoints left out); the VAE's
minutes are printed apart. Last, the caption use of the final model (`caption_use`). Prints a markdown
table, writes DIR/learning.png and DIR/samples.png (log-mel pictures of six balanced-caption samples), then
one JSON line.
`--reuse` analyses an existing DIR without training.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audioldm_dist.eval.conformance import score_folder  # noqa: E402
from audioldm_dist.eval.files import list_clips, sidecar_captions  # noqa: E402
from audioldm_dist.eval.runs import step_of, validation_folders  # noqa: E402
from audioldm_dist.report import read_records  # noqa: E402

KINDS = ("tone note", "chirp direction")


def minutes_at(records: list[dict], step: int) -> float:
    return sum(r["step_seconds"] for r in records if r["step"] <= step) / 60


def accuracy(folder: Path) -> dict[str, float | None]:
    table = score_folder(folder, captions=sidecar_captions(list_clips(folder)))["conformance"]
    return {kind: table[kind]["accuracy"] if kind in table else None for kind in KINDS}


def rows_for(out: Path) -> list[dict]:
    run = out / "run"
    records = read_records(run)
    val_loss = {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}
    rows = []
    for folder in validation_folders(run):
        step = step_of(folder)
        rows.append({"step": step, "minutes": round(minutes_at(records, step), 2), "val_loss": val_loss.get(step),
                     **accuracy(folder)})
    return rows


def final_export(out: Path) -> Path:
    """The run's newest exported checkpoint (the demo exports its last step)."""
    return max((out / "run").glob("export_global_step*.ckpt"), key=lambda path: step_of(Path(path.stem)))


def balanced(out: Path) -> dict[str, float | None]:
    """Conformance of the final export's samples of `balanced_captions()` (2 ranks, the demo's settings)."""
    from audioldm_dist.demo_data import balanced_captions

    captions = out / "balanced_captions.lst"
    captions.write_text("".join(f"{name}|{caption}\n" for name, caption in balanced_captions()))
    checkpoint = final_export(out)
    subprocess.run([str(ROOT / ".venv/bin/deepspeed"), "--num_gpus", "2", "--module", "audioldm_dist.infer",
                    "--config", str(ROOT / "configs/demo.yaml"), "--ckpt", str(checkpoint), "--list_inference",
                    str(captions), "--out", str(out / "balanced_samples"), "--batch_size", "12"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return accuracy(out / "balanced_samples")


def sample_grid(folder: Path, names: list[str], path: Path) -> None:
    """Log-mel pictures of `names` in `folder`, two rows, each titled with its caption and what conformance
    measured on it (the report's spectrogram_png)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from audioldm_dist.config import load_config
    from audioldm_dist.data.melspec import MelFeatures
    from audioldm_dist.eval.files import load_mono
    from audioldm_dist.plots import spectrogram_png

    audio = load_config(ROOT / "configs/demo.yaml").audio
    mel = MelFeatures(audio)
    verdicts: dict[str, list[dict]] = {}
    for clip in json.loads(Path(f"{folder}.conformance.json").read_text())["clips"]:
        verdicts.setdefault(clip["name"], []).append(clip)
    tiles = []
    for name in names:
        waveform, _ = load_mono(list_clips(folder)[name], min_seconds=0.0)
        log_mel, _ = mel(torch.from_numpy(np.asarray(waveform, dtype=np.float32)))
        checks = verdicts[name]
        title = f"{checks[0]['caption']} (measured: {', '.join(c['measured'] for c in checks)})"
        tiles.append(Image.open(io.BytesIO(spectrogram_png(log_mel, audio=audio, mel_basis=mel.mel_basis, title=title))))
    width, height = tiles[0].size
    columns = (len(tiles) + 1) // 2
    grid = Image.new("RGB", (columns * width, 2 * height), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    grid.resize((grid.width * 2 // 3, grid.height * 2 // 3)).save(path)


def caption_use(out: Path, *, repeats: int = 4) -> float:
    """How much the final model uses its captions: its validation loss (no dropout, the same latents, noise and
    timesteps) with every caption swapped for another val clip's, relative to the right captions, in %.
    Near 0: the model has learned the sound of the set but ignores what the captions say."""
    import random

    import torch

    from audioldm_dist.config import Config, from_dict
    from audioldm_dist.data.sources import resolve_specs
    from audioldm_dist.data.stream import ShardStream, StreamOptions, make_loader
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import load_pretrained, read_export_metadata

    checkpoint = final_export(out)
    config = from_dict(Config, json.loads((out / "run" / "config.json").read_text()), where="run config.json")
    model = AudioLDM(config, captions=read_export_metadata(checkpoint).get("captions"), load_conditioner_weights=False)
    load_pretrained(model, checkpoint)
    model.eval()
    stream = ShardStream(resolve_specs([str(out / "shards/val")]), audio=config.audio,
                         options=StreamOptions(batch_size=48, shuffle=False, drop_last=False, max_epochs=1))
    batch = next(iter(make_loader(stream)))
    right = wrong = 0.0
    with torch.no_grad():
        for repeat in range(repeats):
            order = list(range(len(batch["text"])))
            random.Random(repeat).shuffle(order)
            swapped = {**batch, "text": [batch["text"][i] for i in order]}
            right += float(model.loss(batch, generator=torch.Generator().manual_seed(repeat), guidance_dropout=False))
            wrong += float(model.loss(swapped, generator=torch.Generator().manual_seed(repeat), guidance_dropout=False))
    return 100.0 * (wrong - right) / right


def cell(value) -> str:
    return "–" if value is None else f"{value:.0%}" if isinstance(value, float) and value <= 1 else str(value)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    minutes = [r["minutes"] for r in rows]
    for kind, chance in (("tone note", 1 / 7), ("chirp direction", 1 / 2)):
        line, = axes.plot(minutes, [r[kind] for r in rows], marker="o", label=f"{kind} (chance {chance:.0%})")
        axes.axhline(chance, color=line.get_color(), linestyle=":", linewidth=1)
    axes.set_xlabel("minutes of LDM training (2 CPU ranks)")
    axes.set_ylabel("conformance of val samples")
    axes.set_ylim(0, 1.05)
    loss_axes = axes.twinx()
    loss_axes.plot(minutes, [r["val_loss"] for r in rows], color="black", linestyle="--", label="val loss")
    loss_axes.set_ylabel("validation loss (dashed)")
    axes.legend(loc="center right", fontsize=8)
    figure.savefig(path, dpi=100, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_learning"))
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--reuse", action="store_true", help="analyse an existing --out without training")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if not args.reuse:
        env = {**os.environ, "DEMO_VAL_EVERY": str(args.val_every), "DEMO_VAL_SAMPLES": "48"}  # every val clip
        subprocess.run(["bash", str(ROOT / "scripts/demo.sh"), str(args.out)], check=True, env=env, cwd=ROOT)
    rows = rows_for(args.out)
    vae_minutes = minutes_at(read_records(args.out / "vae"), 10**9)
    test = accuracy(args.out / "samples")
    even = balanced(args.out)
    use = caption_use(args.out)
    print(f"## Learning on the demo set (VAE stage: {vae_minutes:.1f} min before these)\n")
    print("| LDM step | minutes | val loss | tone note (chance 14%) | chirp direction (chance 50%) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['minutes']:.1f} | {row['val_loss']:.4f} | {cell(row['tone note'])} | "
              f"{cell(row['chirp direction'])} |")
    print(f"| test captions (final) | | | {cell(test['tone note'])} | {cell(test['chirp direction'])} |")
    print(f"| balanced captions (final) | | | {cell(even['tone note'])} | {cell(even['chirp direction'])} |\n")
    print(f"caption use (final model): val loss {use:+.1f}% with every caption swapped for another's "
          f"(0%: the captions are ignored)\n")
    plot(rows, args.out / "learning.png")
    sample_grid(args.out / "balanced_samples", ["tone_A3_sine_0", "tone_E5_square_0", "tone_A6_sine_0", "chirp_0",
                                                 "chirp_1", "chirp_2"], args.out / "samples.png")
    print(f"plots: {args.out / 'learning.png'}, {args.out / 'samples.png'} (balanced-caption samples)")
    print(json.dumps({"benchmark": "learning", "vae_minutes": round(vae_minutes, 2), "validation": rows, "caption_use_percent": round(use, 2),
                      "test": test, "balanced": even}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
