"""encode-shards: deterministic output, the crop rule, the fingerprint check, and 2-rank training on encoded
shards that matches training on the audio shards and resumes exactly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audioldm_dist.build import build_model_with_weights, check_encoded_shards, tokenizer_captions
from audioldm_dist.config import load_config
from audioldm_dist.data.encoded import EncodingMismatchError
from audioldm_dist.data.sources import resolve_specs
from shards.encode import crop_starts
from shards.encode_cli import main as encode_main
from shards.manifest import Manifest
from processes import free_port
from test_engine import _launch, _losses

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
WHOLE_CLIPS = ["--set", "audio.duration=5.12"]  # every demo clip (1.5-5 s) is one crop: the loader's crop too


def _encode(out: Path, source: Path, *extra: str, workers: int = 2) -> None:
    assert encode_main(["--config", TINY, "--out", str(out), "--workers", str(workers), "--quiet", *extra,
                        str(source)]) == 0


def _tars(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}


def test_crop_rule_windows_every_hop_plus_the_tail() -> None:
    assert crop_starts(100, 10, duration=20.0, hop=0.0, max_crops=0) == [0]  # shorter than a crop: one, padded
    assert crop_starts(250, 10, duration=10.0, hop=0.0, max_crops=0) == [0, 100, 150]  # the tail ends at 250
    assert crop_starts(250, 10, duration=10.0, hop=5.0, max_crops=0) == [0, 50, 100, 150]
    assert crop_starts(250, 10, duration=10.0, hop=5.0, max_crops=2) == [0, 50]


def test_encoding_with_two_workers_or_two_ranks_is_byte_identical_and_verifies(train_shards: Path, tmp_path: Path) -> None:
    _encode(tmp_path / "a", train_shards)
    # the same job on 2 ranks (the trainer's launcher), one worker each: the same bytes
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "shards/encode_cli.py", "--config", TINY, "--out", str(tmp_path / "b"), "--workers", "1",
               "--quiet", str(train_shards)]
    ranks = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stdout[-3000:] + ranks.stderr[-3000:]
    first, second = _tars(tmp_path / "a"), _tars(tmp_path / "b")
    assert len(first) == len(Manifest.load(train_shards).shards) and first == second
    manifest = Manifest.load(tmp_path / "a")
    assert manifest.created_by == "encode-shards" and manifest.num_failed == 0
    assert manifest.num_samples > manifest.num_entries  # demo clips are longer than tiny's 1.28 s: several crops
    assert set(manifest.source["encoding"]) == {"vae", "conditioner", "audio", "fingerprint"}
    assert "crop_rule" in manifest.options and manifest.options["config"]["audio"]["duration"] == 1.28
    assert (tmp_path / "a" / "sizes.json").read_bytes() == (tmp_path / "b" / "sizes.json").read_bytes()
    # a rerun reuses every shard
    _encode(tmp_path / "a", train_shards)
    assert _tars(tmp_path / "a") == first
    assert encode_main(["--verify", str(tmp_path / "a"), "--quiet"]) == 0


def test_shards_encoded_with_another_vae_are_refused_naming_both_fingerprints(train_shards: Path,
                                                                               tmp_path: Path) -> None:
    _encode(tmp_path / "other", train_shards, "--set", "train.seed=1", workers=1)  # another random VAE
    config = load_config(TINY)
    shards = resolve_specs([str(tmp_path / "other")])
    model, _ = build_model_with_weights(config, captions=tokenizer_captions(config, shards, reload_from_ckpt=None),
                                        reload_from_ckpt=None, resuming=False)
    found = Manifest.load(tmp_path / "other").source["encoding"]
    with pytest.raises(EncodingMismatchError, match="encoded with other weights") as error:
        check_encoded_shards(shards, model=model, config=config)
    assert found["fingerprint"] in str(error.value) and f"vae {found['vae']} there" in str(error.value)
    assert found["conditioner"] not in str(error.value)  # only the part that differs is named


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four 2-rank launches; on a shared 2-core machine one takes minutes
def test_two_ranks_on_encoded_shards_match_audio_shards_and_resume_exactly(train_shards: Path,
                                                                          tmp_path: Path) -> None:
    encoded = tmp_path / "encoded"
    _encode(encoded, train_shards, "--storage", "float32", *WHOLE_CLIPS)
    assert Manifest.load(encoded).num_samples == Manifest.load(train_shards).num_samples  # one crop per clip
    sets = [token for flag in WHOLE_CLIPS[1::2] for token in ("--set", flag)]
    _launch(tmp_path / "audio", train_shards, max_steps=4, save_every=4, extra=sets)
    whole = _launch(tmp_path / "whole", encoded, max_steps=4, save_every=4, extra=sets)
    assert "encoded shards (fingerprint" in whole.stdout
    audio, got = _losses(tmp_path / "audio"), _losses(tmp_path / "whole")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(audio[step], abs=1e-5), (step, got, audio)
    _launch(tmp_path / "split", encoded, max_steps=2, save_every=2, extra=sets)
    _launch(tmp_path / "split", encoded, max_steps=4, save_every=2, extra=sets)
    resumed = _losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(got[step], abs=1e-6), step


def test_stored_arrays_read_back_and_damaged_ones_are_corrupt_samples() -> None:
    from audioldm_dist.data.audio import AudioDecodeError
    from audioldm_dist.data.encoded import array_bytes, read_array

    value = torch.randn(8, 16, 4)
    for storage, tolerance in (("float32", 0.0), ("float16", 1e-2)):
        assert torch.allclose(read_array(array_bytes(value, dtype=storage), name="x"), value, atol=tolerance)
    mask = torch.tensor([True, False, True])
    assert torch.equal(read_array(array_bytes(mask, dtype="float16"), name="m"), mask)
    data = array_bytes(value, dtype="float16")
    for damaged in (data[:-10], b"not npy" + data, array_bytes(torch.tensor([1.0, float("nan")]), dtype="float32")):
        with pytest.raises(AudioDecodeError, match="x.npy"):
            read_array(damaged, name="x.npy")
