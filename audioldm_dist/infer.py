"""`python -m audioldm_dist.infer --config CONFIG --ckpt RUN_DIR_or_FILE --list_inference captions.lst --out DIR`

Captions → wav files with DDIM and classifier-free guidance, EMA weights by default. A `.lst` has one
caption per line, or `filename|caption` (the original's `inference_test_with_filename.lst`). Output
names come from the given filename or a safe form of the caption (no path separators, no
collisions); a JSON sidecar per file records every setting and the checkpoint's step.
`--ckpt` takes a run directory (its newest complete checkpoint is exported first) or a checkpoint
file in the released layout (our exports, released AudioLDM files).

Several ranks (`deepspeed --num_gpus N --module audioldm_dist.infer ...`, torchrun, or srun) deal
the caption list's batches round-robin: each caption is generated once, and since a batch's seed
depends on its position only, the audio is the same whatever the number of ranks.
`--n_candidates N` generates N per caption and keeps the one whose CLAP audio embedding is closest
to its caption's text embedding (the original's `n_candidates_per_samples`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import soundfile
import torch

from audioldm_dist.config import load_config
from audioldm_dist.prompts import Prompt, read_prompts, safe_name  # noqa: F401  (safe_name: part of infer's API)

log = logging.getLogger("audioldm_dist.infer")


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """A run directory → its newest checkpoint exported to one file; a file → itself."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        from audioldm_dist.engine.released import export

        return export(ckpt)
    if not ckpt.is_file():
        raise ValueError(f"--ckpt {ckpt}: no such run directory or checkpoint file")
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.infer", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt", required=True, help="run directory or checkpoint file")
    parser.add_argument("--list_inference", required=True, help=".lst of captions or filename|caption lines")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--guidance_scale", type=float, help="default: diffusion.guidance_scale")
    parser.add_argument("--ddim_steps", type=int, help="default: diffusion.ddim_steps")
    parser.add_argument("--duration", type=float, help="seconds of audio (default: audio.duration)")
    parser.add_argument("--n_candidates", type=int, default=1,
                        help="generate N per caption, keep the best by CLAP text-audio similarity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=4, help="captions per forward (× n_candidates)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def chunks_for_rank(num_prompts: int, *, batch_size: int, rank: int, world_size: int) -> list[range]:
    """Batches of the caption list, dealt round-robin to ranks: each caption once, on one rank. A batch's
    seed depends only on its position, so the audio does not depend on the number of ranks."""
    starts = range(0, num_prompts, batch_size)
    return [range(start, min(start + batch_size, num_prompts)) for start in starts[rank::world_size]]


def main(argv: list[str] | None = None) -> int:
    from audioldm_dist.engine.distributed import DistEnv

    args = build_parser().parse_args(argv)
    env = DistEnv.from_environ()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s rank {env.rank}/{env.world_size} %(name)s: %(message)s")
    overrides = list(args.set) + ([f"audio.duration={args.duration}"] if args.duration else [])
    try:
        config = load_config(args.config, overrides)
        check_duration(config)
        prompts = read_prompts(args.list_inference)
        if args.n_candidates < 1 or args.batch_size < 1:
            raise ValueError("--n_candidates and --batch_size must be at least 1")
        if args.n_candidates > 1 and config.conditioner.kind != "clap":
            raise ValueError(f"--n_candidates ranks by CLAP similarity; conditioner.kind={config.conditioner.kind} "
                             "has no CLAP model")
        if env.world_size == 1:
            return generate_all(config, args, prompts, resolve_checkpoint(args.ckpt), env=env)
    except ValueError as error:
        print(f"infer: error: {error}", file=sys.stderr)
        return 2
    return _main_distributed(config, args, prompts, env=env)


def _main_distributed(config, args, prompts: list[Prompt], *, env) -> int:
    import torch.distributed as dist

    from audioldm_dist.engine.distributed import destroy_process_group, init_process_group

    init_process_group(env)
    try:
        resolved: list = [None]
        if env.is_main:  # one rank exports a run directory; the others wait for its path
            try:
                resolved[0] = str(resolve_checkpoint(args.ckpt))
            except ValueError as error:
                resolved[0] = error
        dist.broadcast_object_list(resolved, src=0)
        if isinstance(resolved[0], ValueError):
            print(f"infer: error: {resolved[0]}", file=sys.stderr)
            status = 2
        else:
            status = generate_all(config, args, prompts, Path(resolved[0]), env=env)
    except BaseException:
        destroy_process_group(barrier=False)
        raise
    destroy_process_group()
    return status


def check_duration(config) -> None:
    """The latent's frames must pass the VAE's and the UNet's downsampling evenly."""
    factor = 2 ** (len(config.vae.ch_mult) - 1) * 2 ** (len(config.unet.channel_mult) - 1)
    if config.audio.num_frames % factor:
        raise ValueError(f"duration {config.audio.duration} s gives {config.audio.num_frames} frames; the model needs "
                         f"a multiple of {factor} frames ({factor * config.audio.hop_length / config.audio.sampling_rate:g} s)")


def generate_all(config, args, prompts: list[Prompt], checkpoint_path: Path, *, env) -> int:
    from tqdm import tqdm

    from audioldm_dist.engine.distributed import device_for
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import (CheckpointError, load_conditioner_unless_supplied, load_pretrained,
                                          read_export_metadata)

    metadata = read_export_metadata(checkpoint_path)
    model = AudioLDM(config, captions=metadata.get("captions"), load_conditioner_weights=False)
    try:
        report = load_pretrained(model, checkpoint_path)
    except CheckpointError as error:
        print(f"infer: error: {error}\n{_key_report(model, checkpoint_path)}", file=sys.stderr)
        return 2
    incomplete = [part for part in NEEDED_PARTS + (("conditioner",) if config.conditioner.random_init else ())
                  if report.parts[part].missing]
    if incomplete:
        print(f"infer: error: {checkpoint_path} lacks weights of {', '.join(incomplete)} for this config "
              f"(an unknown layout, or another model?); key report:\n{report.summary()}", file=sys.stderr)
        return 2
    try:
        load_conditioner_unless_supplied(model, report, checkpoint=checkpoint_path)
    except ValueError as error:  # CheckpointError too
        print(f"infer: error: {error}", file=sys.stderr)
        return 2
    use_ema = not args.no_ema and bool(report.ema)
    if use_ema:
        model.unet.load_state_dict({**model.unet.state_dict(), **report.ema})
    model.vocoder.remove_weight_norm()
    model = model.to(device_for(env)).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(checkpoint_path), "step": metadata.get("step"), "ema": use_ema,
                "guidance_scale": args.guidance_scale if args.guidance_scale is not None else config.diffusion.guidance_scale,
                "ddim_steps": args.ddim_steps or config.diffusion.ddim_steps, "seed": args.seed,
                "n_candidates": args.n_candidates, "batch_size": args.batch_size,
                "sample_rate": config.audio.sampling_rate, "duration": config.audio.duration}
    mine = chunks_for_rank(len(prompts), batch_size=args.batch_size, rank=env.rank, world_size=env.world_size)
    for chunk in tqdm(mine, desc=f"infer rank {env.rank}", unit="batch", disable=not env.is_main):
        batch = [prompts[i] for i in chunk]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + chunk.start)
        captions = [p.caption for p in batch for _ in range(args.n_candidates)]
        waveforms = model.generate(captions, num_steps=settings["ddim_steps"], guidance_scale=settings["guidance_scale"],
                                   generator=generator).float()
        best, scores = pick_candidates(model, waveforms, captions, n_candidates=args.n_candidates)
        for prompt, waveform, score in zip(batch, best, scores):
            soundfile.write(str(out / f"{prompt.name}.wav"), waveform[0].cpu().numpy(), config.audio.sampling_rate)
            (out / f"{prompt.name}.json").write_text(json.dumps({**settings, "caption": prompt.caption,
                                                                 "line": prompt.line, "clap_score": score}, indent=1))
    log.info("rank %d wrote %d wav files in %s", env.rank, sum(len(c) for c in mine), out)
    if env.is_main:
        print(f"infer: {len(prompts)} captions over {env.world_size} rank(s) → {out}")
    return 0


NEEDED_PARTS = ("unet", "vae", "vocoder")
"""Parts a checkpoint must fill for inference (else the conditioner loads from conditioner.pretrained)."""


def _key_report(model, checkpoint_path: Path) -> str:
    """check_checkpoint's per-part report, for a file that does not load."""
    from audioldm_dist.pretrained import CheckpointError, map_state_dict, read_state_dict

    try:
        state = read_state_dict(checkpoint_path)
    except CheckpointError as error:
        return str(error)
    modules = {part: getattr(model, part) for part in ("unet", "vae", "vocoder", "conditioner")}
    return map_state_dict(state, modules)[1].summary()


def pick_candidates(model, waveforms: torch.Tensor, captions: list[str], *, n_candidates: int
                    ) -> tuple[torch.Tensor, list[float | None]]:
    """(B·n, 1, T) → the best of each caption's n by CLAP text-audio cosine (the original's
    `n_candidates_per_samples`), with its score; n = 1 keeps everything and scores nothing."""
    if n_candidates == 1:
        return waveforms, [None] * len(waveforms)
    device = waveforms.device
    text = model.conditioner.encode_text(captions, device=device).film
    audio = model.conditioner.encode_audio(waveforms, sample_rate=model.config.audio.sampling_rate).film.to(device)
    similarity = (text * audio).sum(-1).view(-1, n_candidates)  # both unit vectors: cosine
    best = similarity.argmax(dim=1)
    picked = waveforms.view(-1, n_candidates, *waveforms.shape[1:])[torch.arange(len(best)), best]
    return picked, [float(similarity[i, j]) for i, j in enumerate(best)]


if __name__ == "__main__":
    sys.exit(main())
