"""`python -m audioldm_dist.eval`: FD, FAD, KL, IS and CLAP score of generated audio against references.

    python -m audioldm_dist.eval --generated DIR --reference DIR [--out metrics.json] WEIGHTS
    python -m audioldm_dist.eval --log_path RUN_DIR [RUN_DIR ...] [--reference DIR] WEIGHTS
    python -m audioldm_dist.eval --log_path all [--runs-root runs] [--reference DIR] WEIGHTS
    python -m audioldm_dist.eval --conformance --generated DIR [--captions FILE]

WEIGHTS: --panns-ckpt Cnn14_16k_mAP=0.438.pth --vggish-ckpt vggish-10086976.pth [--clap-ckpt DIR],
or --random-backbones (offline smoke tests; the numbers are not comparable). `--log_path` takes run
directories (as the original eval.py): each `val_*` folder is compared with `--reference` or the run's
`val_reference/`; `all` takes every run directory under `--runs-root`. `--conformance` checks that clips do what their demo
captions say (tone notes, chirp directions, …; signal processing, no backbones, no reference) and
writes DIR.conformance.json (`audioldm_dist/eval/conformance.py`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from audioldm_dist.eval.config import load_eval_config
from audioldm_dist.eval.runs import (SUMMARY_NAME, find_run_dirs, metrics_path, reference_for, summary_markdown,
                                     validation_folders)

log = logging.getLogger("audioldm_dist.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--generated", type=Path, help="folder of generated clips")
    what.add_argument("--log_path", nargs="+", metavar="RUN_DIR|all",
                      help="run directories whose val_* folders to evaluate, or 'all' (every run under --runs-root)")
    parser.add_argument("--reference", type=Path,
                        help="folder of real clips (same file names as the generated ones for KL); "
                             "with --log_path, default RUN_DIR/val_reference")
    parser.add_argument("--out", type=Path, help="metrics JSON of --generated (default: GENERATED.metrics.json "
                                                 "beside the folder)")
    parser.add_argument("--runs-root", type=Path, help="where --log_path all looks (default: runs)")
    parser.add_argument("--captions", type=Path, help="captions for the CLAP score: JSON {name: caption} or a "
                                                      ".lst of filename|caption lines (default: NAME.json sidecars)")
    parser.add_argument("--recompute", action="store_true",
                        help="with --log_path: redo folders whose metrics JSON exists with the same settings")
    parser.add_argument("--conformance", action="store_true",
                        help="with --generated: caption conformance of demo-set clips instead of the metrics")
    parser.add_argument("--config", type=Path, help="YAML with EvalConfig keys (flags override it)")
    weights = parser.add_argument_group("backbone weights (never downloaded)")
    weights.add_argument("--panns-ckpt", help="PANNs Cnn14_16k_mAP=0.438.pth (FD, KL, IS)")
    weights.add_argument("--vggish-ckpt", help="torchvggish vggish-10086976.pth (FAD)")
    weights.add_argument("--clap-ckpt", help="local transformers CLAP folder (CLAP score; skipped without it)")
    weights.add_argument("--random-backbones", action="store_true", default=None,
                         help="random-initialised backbones: offline tests only, numbers NOT comparable")
    weights.add_argument("--trust-checkpoints", action="store_true", default=None,
                         help="allow full unpickling of checkpoint files that hold more than tensors")
    parser.add_argument("--pad-short", action="store_true", default=None,
                        help="zero-pad clips under 0.975 s (one VGGish patch) instead of skipping them: models trained "
                             "on short clips, e.g. the demo's 0.64 s; numbers not comparable to papers")
    parser.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.conformance:  # signal processing only: no backbones to configure
            return _conformance(args)
        config = load_eval_config(args.config, {
            "panns_ckpt": args.panns_ckpt, "vggish_ckpt": args.vggish_ckpt, "clap_ckpt": args.clap_ckpt,
            "random_backbones": args.random_backbones, "trust_checkpoints": args.trust_checkpoints,
            "device": args.device, "seed": args.seed, "pad_short": args.pad_short})
        if args.generated is not None:
            if args.reference is None:
                raise ValueError("--generated needs --reference (the folder of real clips)")
            for flag, value in (("--recompute", args.recompute), ("--runs-root", args.runs_root)):
                if value:
                    log.warning("%s applies to --log_path only; ignored", flag)
            return _evaluate_folder(config, args)
        if args.out is not None:
            raise ValueError("--out applies to --generated; with --log_path each folder gets FOLDER.metrics.json")
        if args.runs_root is not None and args.log_path != ["all"]:
            log.warning("--runs-root applies to --log_path all only; ignored")
        return _evaluate_runs(config, args)
    except ValueError as error:
        print(f"eval: error: {error}", file=sys.stderr)
        return 2


def _conformance(args) -> int:
    from audioldm_dist.eval.conformance import conformance_path, markdown, score_folder
    from audioldm_dist.eval.files import list_clips, read_captions_file, sidecar_captions

    if args.generated is None:
        raise ValueError("--conformance needs --generated DIR")
    captions = read_captions_file(args.captions) if args.captions else sidecar_captions(list_clips(args.generated))
    result = score_folder(args.generated, captions=captions)
    print(f"# Caption conformance of {args.generated}\n\n" + markdown(result["conformance"]), end="")
    print(f"eval: conformance in {conformance_path(args.generated)}")
    return 0


def _evaluate_folder(config, args) -> int:
    from audioldm_dist.eval.evaluate import Evaluator, Job
    from audioldm_dist.eval.files import list_clips

    clips = list_clips(args.generated)
    list_clips(args.reference)  # fail before the backbones are built
    evaluator = Evaluator(config, captions_file=args.captions)
    evaluator.prepare_clap(list(evaluator.captions_for(clips).values()))
    job = Job(generated=args.generated, reference=args.reference, out=args.out or metrics_path(args.generated))
    report = evaluator.evaluate(job)
    warning = report.get("warning")
    print(summary_markdown(f"Evaluation of {args.generated}", [report], warning=warning), end="")
    print(f"eval: metrics in {job.out}")
    return 0


def _evaluate_runs(config, args) -> int:
    from audioldm_dist.eval.evaluate import Evaluator, Job
    from audioldm_dist.eval.files import list_clips

    if args.log_path == ["all"]:
        run_dirs = find_run_dirs(args.runs_root or Path("runs"))
    elif "all" in args.log_path:
        raise ValueError("--log_path all takes no other paths (it evaluates every run under --runs-root)")
    else:
        run_dirs = [Path(p) for p in args.log_path]
        for run_dir in run_dirs:
            if not run_dir.is_dir():
                raise ValueError(f"--log_path {run_dir}: no such run directory")
    plan: list[tuple[Path, list[Job]]] = []
    for run_dir in run_dirs:
        reference = reference_for(run_dir, args.reference)
        folders = validation_folders(run_dir, exclude=reference)
        if not folders:
            raise ValueError(f"{run_dir}: no val_* folders to evaluate")
        plan.append((run_dir, [Job(generated=f, reference=reference, out=metrics_path(f)) for f in folders]))
    evaluator = Evaluator(config, captions_file=args.captions)
    all_captions: list[str] = []
    for _, jobs in plan:
        for job in jobs:
            try:
                all_captions += evaluator.captions_for(list_clips(job.generated)).values()
            except ValueError:
                continue  # reported when the folder is evaluated
    evaluator.prepare_clap(all_captions)
    failures = 0
    for run_dir, jobs in plan:
        results = []
        for job in jobs:
            try:
                results.append(evaluator.evaluate(job, reuse=not args.recompute))
            except ValueError as error:
                failures += 1
                log.error("%s: not evaluated: %s", job.generated, error)
                results.append({"generated": str(job.generated), "reference": str(job.reference),
                                "error": str(error)})
        warning = next((r["warning"] for r in results if "warning" in r), None)
        summary = summary_markdown(f"Evaluation of {run_dir}", results, warning=warning)
        (run_dir / SUMMARY_NAME).write_text(summary, encoding="utf-8")
        print(summary)
        print(f"eval: {len(jobs) - sum('error' in r for r in results)} of {len(jobs)} folders evaluated; "
              f"summary in {run_dir / SUMMARY_NAME}")
    return 1 if failures else 0
