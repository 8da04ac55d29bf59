"""`python -m audioldm_dist.infer --config CONFIG --ckpt RUN_DIR_or_FILE --list_inference captions.lst --out DIR`

Captions → wav files with DDIM and classifier-free guidance, EMA weights by default. A `.lst` has one
caption per line, or `filename|caption` (the original's `inference_test_with_filename.lst`). Output
names come from the given filename or a safe form of the caption (no path separators, no
collisions); a JSON sidecar per file records every setting and the checkpoint's step.
`--ckpt` takes a run directory (its newest complete checkpoint is exported first) or a checkpoint
file in the released layout (our exports, released AudioLDM files).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch

from audioldm_dist.config import load_config

log = logging.getLogger("audioldm_dist.infer")


@dataclass(frozen=True, kw_only=True)
class Prompt:
    caption: str
    name: str
    line: int


def safe_name(text: str, *, max_length: int = 80) -> str:
    """A file stem from free text: letters, digits, `-` and `_` only, never empty, never a path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:max_length]
    return stem or "untitled"


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parses a .lst file; an empty or malformed line is a ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"caption list not found: {path}") from None
    prompts: list[Prompt] = []
    used: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            raise ValueError(f"{path}:{number}: empty line (expected a caption, or filename|caption)")
        if "|" in line:
            name, _, caption = line.partition("|")
            name, caption = Path(name.strip()).stem, caption.strip()
            if not name or not caption:
                raise ValueError(f"{path}:{number}: expected filename|caption, found {raw!r}")
            name = safe_name(name)
        else:
            caption, name = line, safe_name(line)
        unique, suffix = name, 1
        while unique in used:
            suffix += 1
            unique = f"{name}_{suffix}"
        used.add(unique)
        prompts.append(Prompt(caption=caption, name=unique, line=number))
    if not prompts:
        raise ValueError(f"{path}: no captions")
    return prompts


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """A run directory → its newest checkpoint exported to one file; a file → itself."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        from audioldm_dist.export import export

        return export(ckpt)
    if not ckpt.is_file():
        raise ValueError(f"--ckpt {ckpt}: no such run directory or checkpoint file")
    return ckpt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.infer", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt", required=True, help="run directory or checkpoint file")
    parser.add_argument("--list_inference", required=True, help=".lst of captions or filename|caption lines")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--guidance_scale", type=float, help="default: diffusion.guidance_scale")
    parser.add_argument("--ddim_steps", type=int, help="default: diffusion.ddim_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        prompts = read_prompts(args.list_inference)
        checkpoint_path = resolve_checkpoint(args.ckpt)
    except ValueError as error:
        print(f"infer: error: {error}", file=sys.stderr)
        return 2
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import CheckpointError, load_pretrained, read_export_metadata

    metadata = read_export_metadata(checkpoint_path)
    model = AudioLDM(config, captions=metadata.get("captions"))
    try:
        report = load_pretrained(model, checkpoint_path)
    except CheckpointError as error:
        print(f"infer: error: {error}\n(run python -m audioldm_dist.check_checkpoint for the full key report)",
              file=sys.stderr)
        return 2
    use_ema = not args.no_ema and bool(report.ema)
    if use_ema:
        model.unet.load_state_dict({**model.unet.state_dict(), **report.ema})
    model.vocoder.remove_weight_norm()
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(checkpoint_path), "step": metadata.get("step"), "ema": use_ema,
                "guidance_scale": args.guidance_scale if args.guidance_scale is not None else config.diffusion.guidance_scale,
                "ddim_steps": args.ddim_steps or config.diffusion.ddim_steps, "seed": args.seed,
                "sample_rate": config.audio.sampling_rate, "duration": config.audio.duration}
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + start)
        waveforms = model.generate([p.caption for p in chunk], num_steps=settings["ddim_steps"],
                                   guidance_scale=settings["guidance_scale"], generator=generator)
        for prompt, waveform in zip(chunk, waveforms):
            soundfile.write(str(out / f"{prompt.name}.wav"), waveform[0].numpy(), config.audio.sampling_rate)
            (out / f"{prompt.name}.json").write_text(json.dumps({**settings, "caption": prompt.caption,
                                                                 "line": prompt.line}, indent=1))
        log.info("wrote %d of %d", min(start + args.batch_size, len(prompts)), len(prompts))
    print(f"infer: {len(prompts)} wav files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
