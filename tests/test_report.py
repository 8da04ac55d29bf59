"""The run report (audioldm_dist/report.py), opened in a real headless Chromium."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile

from audioldm_dist.config import load_config, to_dict
from audioldm_dist.eval.conformance import score_folder
from audioldm_dist.eval.files import list_clips, sidecar_captions
from audioldm_dist.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "scripts" / "install_chromium.sh"
RATE = 16000
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight]);
  const audio = [...document.querySelectorAll('audio')].map(a => a.src);
  document.body.setAttribute('data-check', JSON.stringify({images, audio}));
});
</script></body>"""


def chromium() -> str:
    """The Chromium binary; installs it (scripts/install_chromium.sh, as CI does) when missing; never skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError(f"no chromium and {INSTALL_SCRIPT} could not install it:\n{proc.stdout}\n{proc.stderr}")
    return found


def write_clip(folder: Path, name: str, hz: float, caption: str, **sidecar) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(RATE * 1.28)) / RATE
    soundfile.write(folder / f"{name}.wav", (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32), RATE)
    (folder / f"{name}.json").write_text(json.dumps({"caption": caption, **sidecar}))


def fake_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory as train.py leaves it (two validation steps, reference, checkpoint) and test samples."""
    run = tmp_path / "demo_run" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(load_config(ROOT / "configs/demo.yaml"))))
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "samples_per_s": 9.0, "data_wait": 0.01,
                **({"val_loss": 0.5 / s} if s % 10 == 0 else {})} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (10, 20):
        write_clip(run / f"val_step{step:07d}", "00001_tone", 440.0, "A steady sine wave tone at 440 Hz, the note A4",
                   step=step)
    write_clip(run / "val_reference", "00001_tone", 440.0, "A steady sine wave tone at 440 Hz, the note A4")
    (run / "checkpoints" / "global_step20").mkdir(parents=True)
    (run / "checkpoints" / "global_step20" / "meta.json").write_text("{}")
    samples = tmp_path / "demo_run" / "samples"
    write_clip(samples, "00200_tone", 440.0, "A steady sine wave tone at 440 Hz, the note A4")
    write_clip(samples, "00201_tone", 262.0, "A steady sine wave tone at 880 Hz, the note A5")
    score_folder(samples, captions=sidecar_captions(list_clips(samples)))
    return run, samples


def test_report_renders_in_a_headless_browser(tmp_path, capsys):
    run, samples = fake_run(tmp_path)
    assert report_main([str(run), "--samples", str(samples)]) == 0
    report = run / "report.html"
    assert f"report: {report}" in capsys.readouterr().out
    page = report.read_text()
    for text in ("Caption conformance", "| tone note | 2 | 1 | 50% | 14% |", "val_step0000010", "val_step0000020",
                 "Reference clips", "global_step20", "A steady sine wave tone at 880 Hz", "griffinlim"):
        assert html.escape(text) in page or text in page, text

    # A copy with a probe that records, after load, every image's rendered size and every player's source.
    probe = report.with_name("report_probe.html")
    probe.write_text(page.replace("</body>", CHECK_SCRIPT))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    match = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert match, f"chromium rendered no probe result (rc {proc.returncode}):\n{proc.stderr[-2000:]}"
    check = json.loads(html.unescape(match.group(1)))
    # curves + 2 samples + 2 validation steps + 1 reference, each rendered with a real size
    assert len(check["images"]) == 6, check["images"]
    for alt, width, height in check["images"]:
        assert width > 200 and height > 100, (alt, width, height)
    assert len(check["audio"]) == 5
    for source in check["audio"]:
        path = Path(unquote(urlparse(source).path))
        assert urlparse(source).scheme == "file" and path.is_file(), source

    screenshot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,2400", f"--screenshot={screenshot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 50_000  # a page with plots, not a blank one
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["REPORT_SCREENSHOT"])


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "not a training run directory (no config.json)" in capsys.readouterr().err
