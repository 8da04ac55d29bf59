"""`python -m audioldm_dist.export RUN_DIR [--tag global_stepN] [--out FILE]`: one fp32 checkpoint.

Consolidates the ZeRO shards of a run's checkpoint into the layout of the released AudioLDM files
(`audioldm_dist/engine/released.py` says which part goes where), which `load_pretrained`,
`--reload_from_ckpt` and `check_checkpoint` read.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from audioldm_dist.engine.released import export
from audioldm_dist.fileio import DiskFullError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tag", help="global_stepN (default: the newest complete checkpoint)")
    parser.add_argument("--out", help="output file (default: RUN_DIR/export_TAG.ckpt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        path = export(Path(args.run_dir), tag=args.tag, out=Path(args.out) if args.out else None)
    except ValueError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"export: error: {error.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
