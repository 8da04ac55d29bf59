"""make-shards: round trip, determinism, restart after a kill, faults, verify."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
import webdataset as wds

from audioldm_dist.data.metadata import DatasetRoot
from audioldm_dist.data.schema import sample_key
from shards.cli import main as make_shards_main
from shards.make import OptionsMismatchError, make_shards
from shards.manifest import Manifest
from shards.plan import ShardOptions
from shards.verify import verify_folder

MAKE_SHARDS = [sys.executable, "-m", "shards.cli"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE_SHARDS, "--quiet", *map(str, args)], capture_output=True, text=True, timeout=300)


def _read_samples(folder: Path) -> dict[str, dict]:
    manifest = Manifest.load(folder)
    urls = [str(folder / shard.name) for shard in manifest.shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert sample["__key__"] not in samples, f"duplicate key {sample['__key__']}"
        samples[sample["__key__"]] = sample
    return samples


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_keeps_every_entry_once_with_captions_and_resampled_audio(demo_root: Path,
                                                                            train_shards: Path) -> None:
    entries = DatasetRoot.load(demo_root).entries("demo", "train")
    samples = _read_samples(train_shards)
    assert sorted(samples) == sorted(sample_key("demo", "train", entry.index) for entry in entries)
    for entry in entries:
        sample = samples[sample_key("demo", "train", entry.index)]
        metadata = json.loads(sample["json"])
        assert metadata["captions"] == entry.captions
        assert metadata["labels"] == entry.label_mids
        assert metadata["sample_rate"] == 16000
        stored, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert rate == 16000
        # The original code's resample, applied to the downmixed source.
        source, source_rate = soundfile.read(str(entry.audio_path), dtype="float32", always_2d=True)
        assert metadata["original_sample_rate"] == source_rate
        assert metadata["original_channels"] == source.shape[1]
        expected = torchaudio.functional.resample(torch.from_numpy(source.mean(axis=1)), source_rate, 16000).numpy()
        assert stored.shape == expected.shape
        assert np.abs(stored - np.clip(expected, -1, 1)).max() <= 1 / 32768 + 1e-6  # 16-bit quantisation
        assert metadata["duration"] == pytest.approx(len(expected) / 16000)


def test_manifest_and_sizes_describe_the_shards(train_shards: Path) -> None:
    manifest = json.loads((train_shards / "manifest.json").read_text())
    sizes = json.loads((train_shards / "sizes.json").read_text())
    assert manifest["totals"]["num_samples"] == 32 == sum(sizes.values())
    assert manifest["totals"]["num_shards"] == 6  # 32 samples, at most 6 per shard
    for shard in manifest["shards"]:
        path = train_shards / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert sizes[shard["name"]] == shard["num_samples"] <= 6
    assert manifest["totals"]["seconds"] == pytest.approx(sum(s["seconds"] for s in manifest["shards"]), abs=1e-2)
    assert verify_folder(train_shards, show_progress=False) == []


def test_two_runs_give_byte_identical_shards_whatever_the_worker_count(demo_root: Path, train_shards: Path,
                                                                      tmp_path: Path) -> None:
    make_shards(metadata_root=demo_root, dataset="demo", split="train", out_dir=tmp_path / "again",
                options=ShardOptions(max_count=6), workers=2, show_progress=False)
    first = {s.name: s.sha256 for s in Manifest.load(train_shards).shards}
    second = {s.name: s.sha256 for s in Manifest.load(tmp_path / "again").shards}
    assert first == second


def test_max_size_bounds_every_shard(demo_root: Path, tmp_path: Path) -> None:
    max_size = 600_000
    make_shards(metadata_root=demo_root, dataset="demo", split="train", out_dir=tmp_path / "out",
                options=ShardOptions(max_count=1000, max_size=max_size), workers=1, show_progress=False)
    manifest = Manifest.load(tmp_path / "out")
    assert len(manifest.shards) > 1
    assert all(shard.bytes <= max_size for shard in manifest.shards)
    assert manifest.num_samples == 32


@pytest.mark.slow
def test_restart_after_kill_finishes_with_identical_shards(demo_root: Path, train_shards: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["--metadata-root", demo_root, "--dataset", "demo", "--split", "train", "--out", out,
            "--workers", "1", "--max-count", "6"]
    process = subprocess.Popen([*MAKE_SHARDS, "--quiet", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("train-*.tar"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the run had finished"
    assert 2 <= len(list(out.glob("train-*.tar"))) < 6
    # complete = tar and record: the kill may land between a tar's rename and its record, which is redone
    done_before = sum((out / record.stem).is_file() for record in (out / ".make-shards").glob("train-*.json"))
    assert done_before >= 1
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{6 - done_before} written, {done_before} reused" in result.stdout
    assert not list(out.glob(".*tmp*")), "temp files left behind"
    assert {s.name: s.sha256 for s in Manifest.load(out).shards} == \
        {s.name: s.sha256 for s in Manifest.load(train_shards).shards}


def test_bad_files_are_skipped_counted_and_listed(demo_copy: Path, tmp_path: Path) -> None:
    entries = DatasetRoot.load(demo_copy).entries("demo", "train")
    entries[0].audio_path.unlink()  # missing
    entries[1].audio_path.write_bytes(b"")  # empty
    # truncated: corrupt data (a FLAC: a truncated WAV is only a shorter clip)
    flac = next(i for i, entry in enumerate(entries) if i > 4 and entry.audio_path.suffix == ".flac")
    entries[flac].audio_path.write_bytes(entries[flac].audio_path.read_bytes()[:300])
    soundfile.write(str(entries[3].audio_path), np.zeros((50, 1), np.float32), 16000,
                    format=entries[3].audio_path.suffix[1:].upper())  # too short
    (entries[4].audio_path).write_bytes(b"RIFF not really a wav file at all" * 10)  # garbage header
    input_before = _tree_digest(demo_copy.parent.parent)
    out = tmp_path / "out"
    args = ["--metadata-root", demo_copy, "--dataset", "demo", "--split", "train", "--out", out, "--workers", "2",
            "--max-count", "6"]
    strict = _run_cli(*args)  # 5 of 32 = 15.6% > the default 5%
    assert strict.returncode == 1
    assert "more than --max-failures" in strict.stderr
    lenient = _run_cli(*args, "--max-failures", "0.2")
    assert lenient.returncode == 0, lenient.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {failure["index"]: failure["reason"] for failure in failures}
    assert reasons[0] == "missing" and reasons[1] == "empty" and reasons[3] == "too_short"
    assert reasons[flac] in {"corrupt", "unreadable"} and reasons[4] in {"corrupt", "unreadable"}
    assert len(failures) == 5
    manifest = Manifest.load(out)
    assert manifest.num_failed == 5 and manifest.num_samples == 27
    assert len(_read_samples(out)) == 27
    assert _tree_digest(demo_copy.parent.parent) == input_before, "input folder was modified"


def test_malformed_metadata_is_a_clear_error_naming_file_entry_and_field(demo_copy: Path, tmp_path: Path) -> None:
    split_file = DatasetRoot.load(demo_copy).split_path("demo", "train")
    raw = json.loads(split_file.read_text())
    del raw["data"][7]["wav"]
    split_file.write_text(json.dumps(raw))
    result = _run_cli("--metadata-root", demo_copy, "--dataset", "demo", "--split", "train", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert f'{split_file}: entry 7: field "wav" is missing' in result.stderr
    unknown = _run_cli("--metadata-root", demo_copy, "--dataset", "nope", "--split", "train", "--out", tmp_path / "o")
    assert unknown.returncode == 2 and "unknown dataset 'nope'; registered: demo" in unknown.stderr


def test_verify_catches_a_truncated_tar(train_shards: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(train_shards, damaged)
    victim = damaged / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    problems = verify_folder(damaged, show_progress=False)
    assert any("train-000002.tar" in problem and "bytes" in problem for problem in problems)
    assert make_shards_main(["--verify", str(damaged), "--quiet", "--workers", "1"]) == 1
    assert make_shards_main(["--verify", str(train_shards), "--quiet", "--workers", "1"]) == 0


def test_rerun_with_other_options_refuses_to_mix_shards(demo_root: Path, train_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(train_shards, out)
    with pytest.raises(OptionsMismatchError, match="changed: max_count"):
        make_shards(metadata_root=demo_root, dataset="demo", split="train", out_dir=out,
                    options=ShardOptions(max_count=7), show_progress=False)
    make_shards(metadata_root=demo_root, dataset="demo", split="train", out_dir=out,
                options=ShardOptions(max_count=7), overwrite=True, show_progress=False)
    assert [s.num_samples for s in Manifest.load(out).shards] == [7, 7, 7, 7, 4]
    assert len(list(out.glob("train-*.tar"))) == 5


def test_keep_source_stores_the_original_bytes(demo_root: Path, tmp_path: Path) -> None:
    make_shards(metadata_root=demo_root, dataset="demo", split="val", out_dir=tmp_path / "val",
                options=ShardOptions(keep_source=True, prefix="val"), show_progress=False)
    entries = {sample_key("demo", "val", e.index): e for e in DatasetRoot.load(demo_root).entries("demo", "val")}
    samples = _read_samples(tmp_path / "val")
    assert sorted(samples) == sorted(entries)
    for key, sample in samples.items():
        extension = entries[key].audio_path.suffix[1:]
        assert sample[extension] == entries[key].audio_path.read_bytes()
        assert json.loads(sample["json"])["sample_rate"] == json.loads(sample["json"])["original_sample_rate"]
