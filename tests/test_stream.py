"""The streaming loader: parity, splitting, order, exact resume, faults, evaluation, sources."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from audioldm_dist.config import AudioConfig
from audioldm_dist.data.batch import collate
from audioldm_dist.data.mapstyle import MetadataDataset
from audioldm_dist.data.metadata import DatasetRoot
from audioldm_dist.data.sources import resolve_specs
from audioldm_dist.data.stream import ShardStream, StreamOptions, StreamTracker, make_loader
from audioldm_dist.data.stream_plan import StreamState
from processes import descendants, signal_all

# shared/ sits beside the checkout (CI and developers' machines) or inside it.
REFERENCE = next((base / "shared" / "reference" / "seed_feature_reference.npz"
                  for base in Path(__file__).resolve().parents[1:3]
                  if (base / "shared" / "reference" / "seed_feature_reference.npz").is_file()),
                 Path("shared/reference/seed_feature_reference.npz (not found beside or inside the checkout)"))
AUDIO = AudioConfig(duration=1.28)  # short crops keep the tests fast; the code path is the same


def _stream(shards_dir: Path, *, rank: int = 0, world_size: int = 1, num_workers: int = 0, batch_size: int = 4,
            seed: int = 0, state: StreamState | None = None, **options) -> ShardStream:
    return ShardStream(resolve_specs([str(shards_dir)]), audio=AUDIO, state=state,
                       options=StreamOptions(batch_size=batch_size, rank=rank, world_size=world_size,
                                             num_workers=num_workers, seed=seed, **options))


def _keys(batches) -> list[str]:
    return [key for batch in batches for key, valid in zip(batch["key"], batch["valid"]) if valid]


def test_features_cli_reproduces_the_original_pipeline(tmp_path: Path) -> None:
    reference = np.load(REFERENCE)
    audio_path = tmp_path / "clip.wav"
    soundfile.write(str(audio_path), reference["input_audio_44100hz"], 44100, subtype="FLOAT")
    out = tmp_path / "features.npz"
    config = Path(__file__).resolve().parents[1] / "configs" / "audioldm_s.yaml"
    result = subprocess.run([sys.executable, "-m", "audioldm_dist.features", str(audio_path), "--config", str(config),
                             "--start", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ours = np.load(out)
    assert ours["waveform"].shape == (1, 163840)
    assert np.abs(ours["waveform"] - reference["waveform_16000hz"]).max() < 1e-4
    assert np.abs(ours["log_mel_spec"] - reference["log_mel_spec"]).max() < 1e-4
    assert np.abs(ours["stft"] - reference["stft_magnitude"]).max() < 1e-4


def test_batches_have_the_original_keys_and_shapes(train_shards: Path) -> None:
    batch = next(iter(_stream(train_shards, max_epochs=1)))
    frames = AUDIO.num_frames
    assert batch["waveform"].shape == (4, 1, AUDIO.num_samples)
    assert batch["log_mel_spec"].shape == (4, frames, 64)
    assert batch["stft"].shape == (4, frames, 512)
    assert len(batch["text"]) == len(batch["fname"]) == 4 and all(batch["text"])
    assert batch["duration"].tolist() == [1.28] * 4 and batch["sampling_rate"].tolist() == [16000] * 4
    assert torch.isfinite(batch["log_mel_spec"]).all()
    peak = batch["waveform"].abs().amax(dim=-1).flatten()
    assert torch.allclose(peak, torch.full_like(peak, 0.5), atol=0.02)  # the original peak normalisation


def test_map_style_loader_yields_the_same_batch_format(demo_root: Path, train_shards: Path) -> None:
    root = DatasetRoot.load(demo_root)
    labels = root.label_index("demo")
    dataset = MetadataDataset(root, ["demo"], "train", audio=AUDIO, labels=labels)
    batch = collate([dataset[i] for i in range(4)])
    streamed = next(iter(_stream(train_shards, max_epochs=1)))
    for key in ("waveform", "log_mel_spec", "stft", "duration", "sampling_rate"):
        assert batch[key].shape == streamed[key].shape, key
    assert batch["label_vector"].shape == (4, 8) and batch["label_vector"].sum() >= 4


@pytest.mark.slow
def test_two_ranks_two_workers_cover_the_epoch_with_disjoint_samples(train_shards: Path) -> None:
    per_rank = []
    for rank in range(2):
        batches = list(make_loader(_stream(train_shards, rank=rank, world_size=2, num_workers=2, max_epochs=1)))
        assert len(batches) == 4  # 32 samples / (4 per batch × 2 ranks)
        per_rank.append(_keys(batches))
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = Counter(per_rank[0] + per_rank[1])
    assert len(everything) == 32 and max(everything.values()) == 1


def test_same_seed_same_order_other_seed_or_epoch_other_order(train_shards: Path) -> None:
    first = _keys(_stream(train_shards, max_epochs=2))
    assert first == _keys(_stream(train_shards, max_epochs=2))
    assert first != _keys(_stream(train_shards, max_epochs=2, seed=1))
    assert first[:32] != first[32:] and sorted(first[:32]) == sorted(first[32:])  # each epoch reshuffled


def _run(shards_dir: Path, num_batches: int, *, state: StreamState | None = None, **kwargs
         ) -> tuple[list[str], StreamState]:
    stream = _stream(shards_dir, state=state, **kwargs)
    tracker = StreamTracker(stream)
    keys = []
    for batch, _ in zip(make_loader(stream), range(num_batches)):
        tracker.advance(batch)
        keys.extend(_keys([batch]))
    return keys, tracker.state


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(train_shards: Path) -> None:
    # 8 batches per epoch; stop after 5 (mid-epoch), resume through the next epoch.
    uninterrupted, _ = _run(train_shards, 14, num_workers=2)
    before, state = _run(train_shards, 5, num_workers=2)
    restored = StreamState.from_dict(json.loads(json.dumps(state.to_dict())))  # as stored in a checkpoint
    after, _ = _run(train_shards, 9, num_workers=2, state=restored)
    assert before + after == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("new_workers,new_world,new_batch,new_buffer", [(1, 1, 4, 256), (0, 2, 2, 256), (2, 1, 4, 5)])
def test_resume_with_other_workers_or_ranks_sees_every_sample_of_the_epoch_once(
        train_shards: Path, new_workers: int, new_world: int, new_batch: int, new_buffer: int) -> None:
    before, state = _run(train_shards, 3, num_workers=2)  # 12 of 32 samples of epoch 0; 20 left
    restored = StreamState.from_dict(state.to_dict())
    after = []
    for rank in range(new_world):
        stream = _stream(train_shards, rank=rank, world_size=new_world, num_workers=new_workers, state=restored,
                         batch_size=new_batch, shuffle_buffer=new_buffer)
        steps = stream.steps_in_plan(stream.state)
        batches = [batch for batch, _ in zip(make_loader(stream), range(steps))]
        assert all(batch["stream"]["epoch"] == 0 for batch in batches)
        after.extend(_keys(batches))
    combined = Counter(before + after)
    assert len(combined) == 32 and max(combined.values()) == 1


def _rewrite_member(tar_path: Path, member_suffix: str, data: bytes) -> None:
    """Replaces the bytes of the first member whose name ends with `member_suffix`."""
    with tarfile.open(tar_path) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive]
    replaced = False
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, content in members:
            if not replaced and member.name.endswith(member_suffix):
                content, replaced = data, True
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))


@pytest.mark.slow
def test_corrupt_sample_and_truncated_tar_are_skipped_and_counted(train_shards: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(train_shards, damaged)
    _rewrite_member(damaged / "train-000000.tar", ".flac", b"not audio at all")
    truncated = damaged / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:60_000])
    stream = _stream(damaged, num_workers=2, max_epochs=1, max_failed_fraction=0.5)
    tracker = StreamTracker(stream)
    batches = []
    for batch in make_loader(stream):
        tracker.advance(batch)
        batches.append(batch)
    assert len(batches) == 8  # the same number of batches as with sound shards: no rank can fall behind
    counters = tracker.counters()
    assert counters["items"] == 32
    assert 2 <= counters["failed"] < 8  # the corrupt sample + the lost tail of the truncated shard
    assert counters["replaced"] == counters["failed"]
    with pytest.raises(RuntimeError, match="max_failed_fraction"):
        list(_stream(damaged, max_epochs=1, max_failed_fraction=0.01))


def _read_through_job_signals(shards_dir: Path) -> None:
    import os
    import signal

    expected = list(make_loader(_stream(shards_dir, num_workers=2, max_epochs=1)))
    batches = iter(make_loader(_stream(shards_dir, num_workers=2, max_epochs=1)))
    got = [next(batches) for _ in range(2)]
    helpers = descendants(os.getpid(), cmdline_contains=b"multiprocessing")
    assert len(helpers) >= 4, helpers  # forkserver, resource tracker, 2 workers
    for signum in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM):
        signal_all(helpers, signum)
    got += list(batches)
    assert _keys(got) == _keys(expected)


def test_loader_processes_live_through_the_job_signals_slurm_sends_to_the_whole_step(train_shards: Path) -> None:
    """SLURM's `--signal=USR2@N` and preemption's SIGTERM reach every process of the step; the workers,
    forkserver and resource tracker must ignore them so the trainer can still reach its save. In a fresh
    interpreter, as in `train.py`: here a forkserver started by an earlier test (make-shards) would not."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from pathlib import Path; from test_stream import _read_through_job_signals; "
              f"_read_through_job_signals(Path({str(train_shards)!r}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fewer_shards_than_readers_is_a_clear_error(train_shards: Path) -> None:
    with pytest.raises(ValueError, match=r"6 shards for 2 ranks × 4 workers = 8 readers"):
        _stream(train_shards, world_size=2, num_workers=4)
    allowed = _stream(train_shards, world_size=2, num_workers=4, allow_shard_sharing=True)
    assert allowed.steps_in_plan(allowed.state) == 4


def test_evaluation_loader_sees_every_sample_exactly_once_across_ranks(train_shards: Path) -> None:
    seen, batch_counts = [], []
    for rank in range(2):  # 32 samples, batches of 3 on 2 ranks: 6 batches each, 4 padding slots
        batches = list(_stream(train_shards, rank=rank, world_size=2, batch_size=3, shuffle=False, drop_last=False,
                               max_epochs=1))
        batch_counts.append(len(batches))
        seen.extend(_keys(batches))
    assert batch_counts == [6, 6]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 32


def test_brace_patterns_and_pipe_urls_read_the_same_samples(train_shards: Path) -> None:
    pattern = str(train_shards / "train-{000000..000005}.tar")
    piped = f"pipe:cat {pattern}::sizes={train_shards / 'sizes.json'}"
    from_folder = _keys(_stream(train_shards, max_epochs=1))
    for spec in (pattern, piped):
        stream = ShardStream(resolve_specs([spec]), audio=AUDIO, options=StreamOptions(batch_size=4, max_epochs=1))
        assert _keys(stream) == from_folder
    with pytest.raises(ValueError, match="no manifest.json"):
        resolve_specs([str(train_shards.parent)])


def test_weights_mix_sources_by_reads_per_epoch(demo_root: Path, train_shards: Path, tmp_path: Path) -> None:
    from shards.make import make_shards
    from shards.plan import ShardOptions

    val_dir = tmp_path / "val"
    make_shards(metadata_root=demo_root, dataset="demo", split="val", out_dir=val_dir,
                options=ShardOptions(max_count=2, prefix="val"), show_progress=False)
    shards = resolve_specs([f"{train_shards}::weight=0.5", f"{val_dir}::weight=2"])
    stream = ShardStream(shards, audio=AUDIO, options=StreamOptions(batch_size=2, max_epochs=1, drop_last=False))
    counts = Counter(_keys(stream))
    val_counts = [n for key, n in counts.items() if key.startswith("val-")]
    train_counts = [n for key, n in counts.items() if key.startswith("train-")]
    assert val_counts == [2] * 4  # every val sample read twice
    assert set(train_counts) == {1} and 12 <= len(train_counts) <= 20  # 3 ± 1 of the 6 train shards, once
    with pytest.raises(ValueError, match="weight=W with W >= 0"):
        resolve_specs([f"{train_shards}::weight=-1"])


def test_waveform_only_batches_give_the_same_features_on_the_trainer_side(train_shards: Path) -> None:
    from audioldm_dist.data.melspec import MelFeatures

    full = next(iter(_stream(train_shards, max_epochs=1)))
    lean = next(iter(_stream(train_shards, max_epochs=1, features_in_loader=False)))
    assert "log_mel_spec" not in lean and "stft" not in lean
    assert torch.equal(full["waveform"], lean["waveform"])
    log_mel, stft = MelFeatures(AUDIO).batch(lean["waveform"])
    assert torch.allclose(log_mel, full["log_mel_spec"], atol=1e-5)
    assert torch.allclose(stft, full["stft"], atol=1e-4)


def test_loader_workers_left_running_are_ended_before_exit(train_shards: Path) -> None:
    """A loader iterator kept alive by a reference cycle keeps its workers, which ignore SIGTERM: Python's exit
    hook (terminate, then join) would wait on them forever. end_loader_workers() leaves no worker behind."""
    import multiprocessing

    from audioldm_dist.data.stream import end_loader_workers

    batches = iter(make_loader(_stream(train_shards, num_workers=2)))
    next(batches)
    holder: dict = {"batches": batches}
    holder["self"] = holder  # a cycle: only the garbage collector frees it
    del batches, holder
    assert multiprocessing.active_children()
    end_loader_workers()
    assert not multiprocessing.active_children()


def test_tars_without_sizes_json_are_counted_from_their_headers_once_and_cached(train_shards: Path,
                                                                                tmp_path: Path, caplog,
                                                                                monkeypatch) -> None:
    expected = resolve_specs([str(train_shards)])  # the make-shards manifest's counts
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in expected:
        shutil.copy(shard.url, bare)
    pattern = str(bare / f"train-{{000000..{len(expected) - 1:06d}}}.tar")
    with caplog.at_level(logging.WARNING, logger="audioldm_dist.data.tar_counts"):
        counted = resolve_specs([pattern], cache_dir=tmp_path / "run")
    assert [s.num_samples for s in counted] == [s.num_samples for s in expected]
    assert "counting their samples from the tar headers" in caplog.text
    assert json.loads((bare / "sizes.json").read_text()) == {Path(s.url).name: s.num_samples for s in expected}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="audioldm_dist.data.tar_counts"):
        assert resolve_specs([pattern]) == counted  # read from the cache: not counted again
    assert not caplog.text
    # a folder that cannot be written (faked: the tests may run as root): the counts go to the run
    # directory; a pipe: is streamed once
    (bare / "sizes.json").unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != bare and real_access(path, mode))
    for spec in (pattern, f"pipe:cat {pattern}"):
        assert [s.num_samples for s in resolve_specs([spec], cache_dir=tmp_path / "run")] == \
            [s.num_samples for s in expected]
    assert not (bare / "sizes.json").exists()
    assert len(list((tmp_path / "run" / "tar_counts").glob("sizes-*.json"))) == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-000000.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="train-000000.tar: cannot count its samples"):
        resolve_specs([str(broken / "train-000000.tar")])


def test_the_data_section_sets_the_loader_and_features_go_to_a_gpu_trainer() -> None:
    from audioldm_dist.config import load_config
    from audioldm_dist.data.stream import loader_options

    data = load_config(None, ["data.num_workers=3", "data.shuffle_buffer=7", "data.max_failed_fraction=0.2",
                              "data.allow_shard_sharing=true"]).data
    options = loader_options(data, device=torch.device("cpu"))
    assert options == {"num_workers": 3, "shuffle_buffer": 7, "features_in_loader": True,
                       "max_failed_fraction": 0.2, "allow_shard_sharing": True}
    assert loader_options(data, device=torch.device("cuda", 0))["features_in_loader"] is False  # the default: auto
    forced = load_config(None, ["data.features_in_loader=true"]).data
    assert loader_options(forced, device=torch.device("cuda", 0))["features_in_loader"] is True
    StreamOptions(batch_size=2, **options)  # every key is a StreamOptions field
