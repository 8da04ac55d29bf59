"""The `make-shards` command.

    make-shards --metadata-root data/dataset/metadata/dataset_root.json --dataset audiocaps --split train \\
        --out shards/audiocaps/train --workers 8 [--max-count N] [--max-size BYTES] [--sample-rate 16000] \\
        [--max-failures 0.05]
    make-shards --verify DIR
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from audioldm_dist.data.metadata import MetadataError
from audioldm_dist.fileio import DiskFullError
from shards.make import OptionsMismatchError, make_shards
from shards.plan import ShardOptions
from shards.verify import verify_folder

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """`1000000`, `1e9`, `500MB`, `1GiB` → bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 1e9, 500MB or 1GiB, got {text!r}")
    try:
        value = float(match.group(1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in bytes, got {text!r}") from None
    return int(value * _SIZE_UNITS[(match.group(2) or "").lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-shards", description="Turn an AudioLDM dataset_root.json split into WebDataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metadata-root", help="path of dataset_root.json")
    parser.add_argument("--dataset", help="dataset name registered in dataset_root.json")
    parser.add_argument("--split", help="split name, e.g. train, val or test")
    parser.add_argument("--out", help="output folder for the shards, manifest.json, sizes.json, failures.jsonl")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-size", type=parse_size, default=10**9, help="bytes per shard at most (1e9, 500MB)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="target rate of the stored mono FLAC")
    parser.add_argument("--max-failures", type=float, default=0.05,
                        help="exit non-zero if more than this fraction of files fails")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order samples are spread over shards")
    parser.add_argument("--no-shuffle", action="store_true", help="keep metadata order instead of a seeded shuffle")
    parser.add_argument("--keep-source", action="store_true",
                        help="store each file's original bytes instead of re-encoding to mono FLAC")
    parser.add_argument("--min-duration", type=float, default=0.0, help="skip (and count) clips shorter than this")
    parser.add_argument("--prefix", help="shard file prefix (default: the split name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild an output folder that holds shards made with other settings")
    parser.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        try:
            problems = verify_folder(args.verify, workers=args.workers, show_progress=not args.quiet)
        except ValueError as error:
            print(f"make-shards: {error}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"PROBLEM {problem}")
        print(f"verify {args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1
    missing = [flag for flag, value in (("--metadata-root", args.metadata_root), ("--dataset", args.dataset),
                                        ("--split", args.split), ("--out", args.out)) if not value]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --verify DIR)")
    if not 0.0 <= args.max_failures <= 1.0:
        parser.error(f"--max-failures must be a fraction between 0 and 1, got {args.max_failures}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        options = ShardOptions(sample_rate=args.sample_rate, keep_source=args.keep_source, max_count=args.max_count,
                               max_size=args.max_size, seed=args.seed, shuffle=not args.no_shuffle,
                               prefix=args.prefix or args.split, min_duration=args.min_duration)
        result = make_shards(metadata_root=args.metadata_root, dataset=args.dataset, split=args.split,
                             out_dir=args.out, options=options, workers=args.workers,
                             overwrite=args.overwrite,
                             command=["make-shards", *(argv if argv is not None else sys.argv[1:])],
                             show_progress=not args.quiet)
    except (MetadataError, OptionsMismatchError, ValueError) as error:
        print(f"make-shards: error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"make-shards: error: {error.strerror}; shards written so far are kept: run the same command again "
              f"once there is room", file=sys.stderr)
        return 1
    totals = result.manifest.to_dict()["totals"]
    print(f"make-shards: {totals['num_samples']} samples in {totals['num_shards']} shards "
          f"({totals['hours']:.3f} h, {totals['bytes'] / 1e6:.1f} MB) in {args.out}; "
          f"{result.num_written} written, {result.num_reused} reused; "
          f"{totals['num_failed']} failed ({result.failed_fraction:.1%}, see failures.jsonl)")
    return failure_status("make-shards", "files", result.failed_fraction, limit=args.max_failures, out=args.out)


def failure_status(tool: str, what: str, failed_fraction: float, *, limit: float, out: str) -> int:
    """Exit status of a shard job: 1 with an error line when more than `limit` of its inputs failed, else 0."""
    if failed_fraction > limit:
        print(f"{tool}: error: {failed_fraction:.1%} of {what} failed, more than --max-failures {limit:.1%}; "
              f"see {os.path.join(out, 'failures.jsonl')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
