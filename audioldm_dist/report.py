"""`python -m audioldm_dist.report RUN_DIR [--samples DIR] [--out FILE]`: one HTML page about a training run.

Opened from disk, no server: the curves (loss, val loss, lr, samples/s, data wait) and every spectrogram
are PNGs embedded in the page; the audio players point at the run's own wavs by relative paths, so
keep the page beside the run. What it shows, where the run has it:

- the curves from `metrics.jsonl`, and the last step's figures;
- the test-caption samples of `--samples` (default `RUN_DIR/samples`): log-mel images with captions,
  players, the caption-conformance table (`python -m audioldm_dist.eval --conformance`) and the metrics
  (`SAMPLES.metrics.json`) that `eval` wrote beside the folder;
- every validation step's samples (`val_step*`), the reference clips (`val_reference`), and the
  `eval --log_path` summary;
- the config and the checkpoints with their steps.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from audioldm_dist.config import AudioConfig, from_dict
from audioldm_dist.data.melspec import MelFeatures
from audioldm_dist.eval.conformance import conformance_path, markdown as conformance_markdown
from audioldm_dist.eval.files import list_clips, load_mono, sidecar_captions, to_rate
from audioldm_dist.eval.runs import SUMMARY_NAME, metrics_path, validation_folders
from audioldm_dist.engine.checkpoint import TAG_PATTERN
from audioldm_dist.engine.validation import REFERENCE_DIR
from audioldm_dist.plots import curves_png, spectrogram_png

REPORT_NAME = "report.html"
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
h2{border-bottom:1px solid #ccc;padding-top:1em}
.grid{display:flex;flex-wrap:wrap;gap:1em}.card{width:420px;border:1px solid #ddd;padding:.5em;border-radius:4px}
.card img{width:100%}.card audio{width:100%}.ok{color:#080}.bad{color:#b00}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
pre{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}"""


class Page:
    """The report being written: sections of HTML, images embedded, audio linked relative to `out`."""

    def __init__(self, out: Path, audio: AudioConfig) -> None:
        self.out = out
        self.audio = audio
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def image(self, png: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    def clip_card(self, path: Path, caption: str, extra: str = "") -> str:
        waveform, rate = load_mono(path, min_seconds=0.0)
        waveform = to_rate(waveform, sample_rate=rate, target=self.audio.sampling_rate)
        whole = MelFeatures(replace(self.audio, duration=waveform.shape[-1] / self.audio.sampling_rate))
        log_mel = whole.batch(torch.from_numpy(waveform))[0][0]  # the whole clip, not the training crop
        png = spectrogram_png(log_mel, audio=self.audio, mel_basis=whole.mel_basis, title=caption)
        source = html.escape(Path(os.path.relpath(path.resolve(), self.out.parent.resolve())).as_posix())
        return (f'<div class="card"><b>{html.escape(path.stem)}</b> {extra}<br>{self.image(png, caption)}'
                f'<audio controls preload="none" src="{source}"></audio></div>')

    def clips(self, folder: Path, verdicts: dict[str, str] | None = None) -> None:
        clips = list_clips(folder)
        captions = sidecar_captions(clips)
        cards = [self.clip_card(path, captions.get(name, ""), (verdicts or {}).get(name, ""))
                 for name, path in clips.items()]
        self.add(f'<div class="grid">{"".join(cards)}</div>')

    def html(self, title: str) -> str:
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(self.parts)}</body></html>")


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (empty before the first step)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary_section(page: Page, records: list[dict]) -> None:
    page.add("<h2>Training</h2>")
    if not records:
        page.add("<p>No metrics.jsonl yet.</p>")
        return
    last = records[-1]
    vals = [r for r in records if r.get("val_loss") is not None]
    facts = [["last step", last["step"]], ["loss", f"{last['loss']:.5g}"]]
    if vals:
        facts.append([f"val loss (step {vals[-1]['step']})", f"{vals[-1]['val_loss']:.5g}"])
    facts.append(["samples / s (median)", f"{sorted(r['samples_per_s'] for r in records)[len(records) // 2]:.3g}"])
    page.add(_table(facts, ["", ""]))
    page.add(page.image(curves_png(records), "training curves"))


def _samples_section(page: Page, samples: Path) -> None:
    page.add(f"<h2>Test-caption samples: {html.escape(str(samples))}</h2>")
    verdicts: dict[str, str] = {}
    conformance = conformance_path(samples)
    if conformance.is_file():
        result = json.loads(conformance.read_text())
        page.add("<h3>Caption conformance</h3><pre>" + html.escape(conformance_markdown(result["conformance"]))
                 + "</pre>")
        for check in result["clips"]:
            ok = check["measured"] == check["expected"]
            verdicts[check["name"]] = verdicts.get(check["name"], "") + (
                f'<span class="{"ok" if ok else "bad"}">{html.escape(check["kind"])}: '
                f'{html.escape(check["measured"])} {"✓" if ok else "✗ (caption: " + html.escape(check["expected"]) + ")"}'
                f"</span> ")
    metrics = metrics_path(samples)
    if metrics.is_file():
        page.add("<h3>Metrics</h3><pre>" + html.escape(metrics.read_text()) + "</pre>")
    page.clips(samples, verdicts)


def _validation_section(page: Page, run_dir: Path) -> None:
    folders = validation_folders(run_dir)
    if not folders:
        return
    page.add("<h2>Validation samples (EMA weights)</h2>")
    summary = run_dir / SUMMARY_NAME
    if summary.is_file():
        page.add("<pre>" + html.escape(summary.read_text()) + "</pre>")
    for folder in folders:
        page.add(f"<h3>{html.escape(folder.name)}</h3>")
        page.clips(folder)
    reference = run_dir / REFERENCE_DIR
    if reference.is_dir():
        page.add("<h2>Reference clips (as the model hears them)</h2>")
        page.clips(reference)


def _checkpoints_section(page: Page, run_dir: Path, raw_config: dict) -> None:
    page.add("<h2>Checkpoints</h2>")
    root = run_dir / "checkpoints"
    rows = []
    for tag in sorted(root.iterdir() if root.is_dir() else [], key=lambda p: p.name):
        match = TAG_PATTERN.match(tag.name)
        if match:
            rows.append([tag.relative_to(run_dir).as_posix(), int(match.group(1)),
                         "complete" if (tag / "meta.json").is_file() else "incomplete"])
    rows += [[p.name, "", "exported"] for p in sorted(run_dir.glob("export_*.ckpt"))]
    page.add(_table(rows, ["path", "step", "state"]) if rows else "<p>none yet</p>")
    page.add("<h2>Config</h2><pre>" + html.escape(json.dumps(raw_config, indent=1)) + "</pre>")


def write_report(run_dir: Path, *, samples: Path | None = None, out: Path | None = None) -> Path:
    """Writes the report of `run_dir` (to `out`, default RUN_DIR/report.html) and returns its path."""
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir}: not a training run directory (no config.json)")
    raw_config = json.loads((run_dir / "config.json").read_text())
    out = out or run_dir / REPORT_NAME
    page = Page(out, from_dict(AudioConfig, raw_config["audio"], where=f"{run_dir}/config.json:audio"))
    records = read_records(run_dir)
    _summary_section(page, records)
    if samples is not None:
        _samples_section(page, samples)
    _validation_section(page, run_dir)
    _checkpoints_section(page, run_dir, raw_config)
    out.write_text(page.html(f"audioldm-dist run report: {run_dir}"), encoding="utf-8")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory (train.py --run-dir)")
    parser.add_argument("--samples", type=Path, help="folder of test-caption samples (default RUN_DIR/samples if any)")
    parser.add_argument("--out", type=Path, help=f"the HTML file (default RUN_DIR/{REPORT_NAME})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    samples = args.samples
    if samples is None and (args.run_dir / "samples").is_dir():
        samples = args.run_dir / "samples"
    try:
        out = write_report(args.run_dir, samples=samples, out=args.out)
    except ValueError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
