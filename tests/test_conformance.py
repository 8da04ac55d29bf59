"""Caption conformance (eval/conformance.py) and the Griffin-Lim vocoder it listens through."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from audioldm_dist.config import load_config
from audioldm_dist.data.audio import resample
from audioldm_dist.data.melspec import MelFeatures, waveform_to_features
from audioldm_dist.demo_data import NOTE_NAMES, make_clip
from audioldm_dist.eval import conformance
from audioldm_dist.eval.cli import main as eval_main
from audioldm_dist.models.griffinlim import GriffinLim

RATE = conformance.RATE


def demo_clips(count: int, seed: int = 0, *, crop: bool) -> list[tuple[str, np.ndarray]]:
    """Demo clips at 16 kHz: whole, or as the model hears them (the demo config's random crop, normalised).
    A crop can miss what a caption counts on (no click of a 60 bpm beat in 0.64 s); a whole clip cannot."""
    config = load_config("configs/demo.yaml").audio
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        clip = make_clip(rng)
        mono = clip["samples"].T.mean(0, keepdims=True)
        if crop:
            waveform = waveform_to_features(mono, clip["sample_rate"], config=config, mel=None, rng=rng).waveform
        else:
            waveform = resample(mono, orig_freq=clip["sample_rate"], new_freq=RATE)
        clips.append((clip["caption"], waveform[0]))
    return clips


def tone(hz: float, seconds: float = 1.28) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(RATE * seconds)) / RATE)).astype(np.float32)


def test_captions_parse_into_their_checks():
    checks = conformance.checks_for("A steady square wave tone at 440 Hz, the note A4")
    assert [(c.kind, c.expected) for c in checks] == [("tone note", "A4"), ("tone wave", "square")]
    assert checks[0].chance == pytest.approx(1 / 7)
    assert [(c.kind, c.expected) for c in conformance.checks_for("A falling chirp sweeping from 3000 Hz to 200 Hz")] \
        == [("chirp direction", "falling")]
    assert conformance.checks_for("A dog barks") == []


def test_clean_demo_clips_score_100_percent():
    table = conformance.score({str(i): clip for i, clip in enumerate(demo_clips(90, crop=False))})["conformance"]
    assert set(table) == set(conformance.KINDS)
    for kind in conformance.KINDS:
        assert table[kind]["accuracy"] == 1.0, (kind, table[kind])


def test_white_noise_scores_at_chance():
    """Captions balanced over the notes and directions; the clips are white noise."""
    rng = np.random.default_rng(3)
    clips = {}
    for repeat in range(10):
        for hz, note in NOTE_NAMES.items():
            clips[f"t{repeat}{note}"] = (f"A steady sine wave tone at {hz:g} Hz, the note {note}",
                                         rng.standard_normal(RATE).astype(np.float32) * 0.3)
        for direction in ("rising", "falling"):
            clips[f"c{repeat}{direction}"] = (f"A {direction} chirp sweeping from 300 Hz to 2000 Hz",
                                              rng.standard_normal(RATE).astype(np.float32) * 0.3)
    table = conformance.score(clips)["conformance"]
    assert abs(table["tone note"]["accuracy"] - 1 / 7) < 0.1, table["tone note"]
    assert abs(table["chirp direction"]["accuracy"] - 1 / 2) < 0.25, table["chirp direction"]


def test_a_tone_on_the_wrong_note_fails():
    result = conformance.score({"x": ("A steady sine wave tone at 440 Hz, the note A4", tone(NOTE_NAMES_HZ["E5"]))})
    assert result["conformance"]["tone note"]["correct"] == 0
    assert result["clips"][0]["measured"] == "E5"
    right = conformance.score({"x": ("A steady sine wave tone at 440 Hz, the note A4", tone(440.0))})
    assert right["conformance"]["tone note"]["correct"] == 1


NOTE_NAMES_HZ = {name: hz for hz, name in NOTE_NAMES.items()}


def test_a_dimmed_fundamental_is_still_the_pitch():
    """A3 square whose fundamental a vocoder dimmed below its 3rd harmonic (E5's frequency) is A3; an E5 tone
    with a faint A3 beside it (20 dB down) stays E5."""
    caption = "A steady square wave tone at 220 Hz, the note A3"
    dimmed = tone(220.0) * 0.8 + tone(660.0) + tone(1100.0) * 0.6
    assert conformance.score({"x": (caption, dimmed)})["clips"][0]["measured"] == "A3"
    faint = tone(659.26) + tone(220.0) * 0.1
    assert conformance.score({"x": ("A steady sine wave tone at 659.26 Hz, the note E5", faint)})["clips"][0][
        "measured"] == "E5"


def test_griffin_lim_keeps_what_the_captions_say():
    """Our log-mel → Griffin-Lim → audio: every demo fact the metric measures survives (the demo's vocoder)."""
    config = load_config("configs/demo.yaml")
    mel = MelFeatures(config.audio)
    vocoder = GriffinLim(config.audio, mel_basis=mel.mel_basis, num_iters=config.vocoder.griffinlim_iters)
    clips = demo_clips(60, seed=1, crop=True)
    log_mel = torch.stack([mel(waveform[None])[0] for _, waveform in clips])  # (B, frames, mels)
    audio = vocoder(log_mel.transpose(1, 2))
    assert audio.shape == (len(clips), 1, config.audio.num_samples)
    table = conformance.score({str(i): (caption, audio[i, 0].numpy())
                               for i, (caption, _) in enumerate(clips)})["conformance"]
    assert table["tone note"]["accuracy"] == 1.0 and table["chirp direction"]["accuracy"] == 1.0, table
    # and it is the same sound: the vocoded clip's log-mel is close to the one it came from
    again = mel.batch(audio)[0]
    assert (again - log_mel).abs().median() < 1.0


def test_eval_cli_conformance_mode(tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    for name, hz, caption_hz in (("a", 440.0, 440.0), ("b", 880.0, 220.0)):
        soundfile.write(folder / f"{name}.wav", tone(hz), RATE)
        note = NOTE_NAMES[caption_hz]
        (folder / f"{name}.json").write_text(json.dumps(
            {"caption": f"A steady sine wave tone at {caption_hz:g} Hz, the note {note}"}))
    assert eval_main(["--conformance", "--generated", str(folder)]) == 0
    result = json.loads((tmp_path / "samples.conformance.json").read_text())
    assert result["conformance"]["tone note"] == {"count": 2, "correct": 1, "chance": pytest.approx(1 / 7),
                                                  "accuracy": 0.5}
    assert "| tone note | 2 | 1 | 50% | 14% |" in capsys.readouterr().out
    bare = tmp_path / "bare"
    bare.mkdir()
    soundfile.write(bare / "c.wav", tone(300.0), RATE)  # no sidecar: nothing to check against
    assert eval_main(["--conformance", "--generated", str(bare)]) == 2
    assert "no clip has a caption" in capsys.readouterr().err
    (bare / "c.json").write_text(json.dumps({"caption": "A steady sine wave tone at 440 Hz, the note A4"}))
    (bare / "c.wav").write_bytes(b"not audio at all")
    assert eval_main(["--conformance", "--generated", str(bare)]) == 2
    assert "cannot score" in capsys.readouterr().err
