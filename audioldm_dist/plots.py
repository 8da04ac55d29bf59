"""Pictures people can read: log-mel spectrograms with a colour map, axes in seconds and Hz and the caption
as title (validation samples, the run report), and the run's curves. matplotlib's object API with the
Agg canvas only: no pyplot state, no display needed, safe beside training threads.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from audioldm_dist.config import AudioConfig

CURVES = (("loss", "training loss"), ("val_loss", "validation loss"), ("lr", "learning rate"),
          ("samples_per_s", "samples / s"), ("data_wait", "data wait (fraction of step)"))


def _save(figure: Figure, path: Path | None) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def spectrogram_png(log_mel: torch.Tensor | np.ndarray, *, audio: AudioConfig, mel_basis: torch.Tensor,
                    title: str = "", path: Path | None = None) -> bytes:
    """(frames, mels) log-mel → PNG bytes (and the file at `path`): time in seconds across, the mel bands'
    centre frequencies in Hz up, magma colours with a bar, `title` (the caption) wrapped above."""
    values = np.asarray(torch.as_tensor(log_mel).float().cpu()).T  # (mels, frames)
    seconds = values.shape[1] * audio.hop_length / audio.sampling_rate
    centres = np.fft.rfftfreq(audio.filter_length, 1.0 / audio.sampling_rate)[mel_basis.argmax(dim=1).numpy()]
    figure = Figure(figsize=(6.4, 3.0))
    axes = figure.add_subplot()
    image = axes.imshow(values, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                        extent=(0.0, seconds, -0.5, values.shape[0] - 0.5))
    ticks = np.linspace(0, values.shape[0] - 1, 6).round().astype(int)
    axes.set_yticks(ticks, [f"{centres[t]:.0f}" for t in ticks])
    axes.set_xlabel("time (s)")
    axes.set_ylabel("frequency (Hz, mel bands)")
    if title:
        axes.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    figure.colorbar(image, ax=axes, label="log-mel")
    return _save(figure, path)


def curves_png(records: list[dict], *, path: Path | None = None) -> bytes:
    """metrics.jsonl records → one PNG of every curve in `CURVES` that the run logged, against the step."""
    present = [(key, label) for key, label in CURVES if any(r.get(key) is not None for r in records)]
    figure = Figure(figsize=(6.4, 2.2 * max(len(present), 1)))
    for index, (key, label) in enumerate(present):
        axes = figure.add_subplot(len(present), 1, index + 1)
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        axes.set_ylabel(label, fontsize=8)
        axes.grid(alpha=0.3)
        if key in ("loss", "val_loss") and min(values) > 0:
            axes.set_yscale("log")
    if present:
        figure.axes[-1].set_xlabel("step")
    return _save(figure, path)
