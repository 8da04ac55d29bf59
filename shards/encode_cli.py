"""The `encode-shards` command (also `python -m shards.encode_cli`).

    encode-shards --config CFG [--ckpt CKPT] --out OUT [--workers N] SOURCE [SOURCE ...]
        [--storage float16|float32] [--crop-hop SECONDS] [--crops-per-clip N] [--set KEY=VALUE ...]
    encode-shards --verify OUT

SOURCE is anything `train.py --train-data` reads (a make-shards folder, a brace pattern of tars, several).
Several ranks: launch it as training is launched (`deepspeed --num_gpus N shards/encode_cli.py ...`,
`srun ... python -m shards.encode_cli ...`); each rank (RANK/WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS)
writes its own shards, and the last to finish writes the manifest.
"""
from __future__ import annotations

import argparse
import logging
import sys

from audioldm_dist.config import load_config
from audioldm_dist.data.encoded import EncodingMismatchError
from audioldm_dist.engine.distributed import DistEnv
from audioldm_dist.fileio import DiskFullError
from shards.encode import EncodeOptions, encode_shards
from shards.cli import failure_status
from shards.make import OptionsMismatchError
from shards.verify import verify_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encode-shards", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode audio shards once: VAE posteriors and conditioner embeddings per crop, for training "
                    "without audio decode, STFT, VAE encoder or conditioner forward.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="make-shards folders or brace patterns of tars")
    parser.add_argument("--config", help="the experiment YAML the model will train with")
    parser.add_argument("--ckpt", help="AudioLDM checkpoint with the VAE/conditioner (train.py --reload_from_ckpt)")
    parser.add_argument("--out", help="output folder: shards, manifest.json, sizes.json, failures.jsonl")
    parser.add_argument("--workers", type=int, default=1, help="processes per rank (each loads the model)")
    parser.add_argument("--storage", default="float16", choices=("float16", "float32"),
                        help="dtype of the stored posterior and embeddings")
    parser.add_argument("--crop-hop", type=float, default=0.0,
                        help="seconds between the crops of a clip longer than audio.duration (0: audio.duration)")
    parser.add_argument("--crops-per-clip", type=int, default=0, help="at most this many crops per clip (0: all)")
    parser.add_argument("--prefix", default="encoded", help="shard file prefix")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--max-failures", type=float, default=0.05,
                        help="exit non-zero if more than this fraction of clips fails")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a folder encoded with other settings")
    parser.add_argument("--verify", metavar="OUT", help="check every shard of OUT against its manifest and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def _verify(folder: str, *, workers: int, quiet: bool) -> int:
    try:
        problems = verify_folder(folder, workers=workers, show_progress=not quiet)
    except ValueError as error:
        print(f"encode-shards: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"verify {folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        return _verify(args.verify, workers=args.workers, quiet=args.quiet)
    missing = [flag for flag, value in (("--config", args.config), ("--out", args.out), ("SOURCE", args.sources))
               if not value]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --verify OUT)")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    env = DistEnv.from_environ()  # RANK/WORLD_SIZE (deepspeed, torchrun) or SLURM_PROCID/SLURM_NTASKS (srun)
    rank, world_size = env.rank, env.world_size
    try:
        config = load_config(args.config, args.set)
        options = EncodeOptions(prefix=args.prefix, storage=args.storage, crop_hop=args.crop_hop,
                                crops_per_clip=args.crops_per_clip)
        result = encode_shards(config=config, sources=args.sources, out_dir=args.out, options=options,
                               ckpt=args.ckpt, workers=args.workers, rank=rank, world_size=world_size,
                               overwrite=args.overwrite, show_progress=not args.quiet,
                               command=["encode-shards", *(argv if argv is not None else sys.argv[1:])])
    except (OptionsMismatchError, EncodingMismatchError, ValueError) as error:
        print(f"encode-shards: error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"encode-shards: error: {error.strerror}; shards written so far are kept: run the same command "
              f"again once there is room", file=sys.stderr)
        return 1
    if result.manifest is None:
        print(f"encode-shards: rank {rank}: {result.num_written} shards written, {result.num_reused} reused; "
              f"the manifest is written by the last rank to finish")
        return 0
    totals = result.manifest.to_dict()["totals"]
    print(f"encode-shards: {totals['num_samples']} crops in {totals['num_shards']} shards "
          f"({totals['bytes'] / 1e6:.1f} MB) in {args.out}; {result.num_written} written, {result.num_reused} reused "
          f"(rank {rank}); {totals['num_failed']} clips failed ({result.failed_fraction:.1%}, see failures.jsonl)")
    return failure_status("encode-shards", "clips", result.failed_fraction, limit=args.max_failures, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
