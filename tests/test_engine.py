"""The DeepSpeed engine on 2 CPU ranks (gloo): train, checkpoint, exact resume, world-size change, signals, export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audioldm_dist.config import TrainConfig
from audioldm_dist.engine.ds_config import load_ds_config

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
_ports = iter(range(29610, 29700))


def _launch(run_dir: Path, shards: Path, *, ranks: int = 2, stage: int | str = 2, max_steps: int = 6, save_every: int = 3,
            extra: list[str] = (), wait: bool = True):
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(next(_ports)), "train.py",
               "--deepspeed_config", f"configs/ds/zero{stage}.json", "--config", "configs/tiny.yaml",
               "--run-dir", str(run_dir), "--train-data", str(shards), "--max-steps", str(max_steps),
               "--save-every", str(save_every), *extra]
    env = {**os.environ, "WANDB_MODE": "offline"}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _latest_is_complete(run_dir: Path) -> int:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())
    assert tag == f"global_step{meta['step']}"
    assert all((run_dir / "checkpoints" / tag / f"rng_rank{r}.pt").is_file() for r in range(meta["world_size"]))
    return meta["step"]


def test_micro_batch_mismatch_with_the_deepspeed_json_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=4 disagrees with train.micro_batch_size=2"):
        load_ds_config(path, TrainConfig(micro_batch_size=2), world_size=2)
    filled = load_ds_config(ROOT / "configs" / "ds" / "zero2.json", TrainConfig(micro_batch_size=2,
                                                                                 gradient_accumulation_steps=3),
                            world_size=2)
    assert filled["train_batch_size"] == 12 and filled["optimizer"]["params"]["lr"] == 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_the_same_loss_curve(train_shards: Path, tmp_path: Path, stage: int) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    _launch(whole, train_shards, stage=stage, max_steps=6, save_every=3)
    _launch(split, train_shards, stage=stage, max_steps=3, save_every=3)
    assert _latest_is_complete(split) == 3
    resumed = _launch(split, train_shards, stage=stage, max_steps=6, save_every=3)
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = _losses(whole), _losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert _latest_is_complete(split) == 6


@pytest.mark.slow
def test_one_rank_resumes_a_two_rank_checkpoint_and_exported_weights_finetune(train_shards: Path,
                                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    _launch(run, train_shards, ranks=2, max_steps=4, save_every=4)
    one = _launch(run, train_shards, ranks=1, max_steps=6, save_every=2)
    assert "converting to a universal checkpoint" in one.stdout + one.stderr
    assert sorted(_losses(run)) == list(range(1, 7)) and _latest_is_complete(run) == 6
    export = subprocess.run([sys.executable, "-m", "audioldm_dist.export", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    exported = run / "export_global_step6.ckpt"
    finetune = _launch(tmp_path / "finetune", train_shards, ranks=2, max_steps=2, save_every=2,
                       extra=["--reload_from_ckpt", str(exported)])
    log = finetune.stdout + finetune.stderr
    assert "unet              210        0           0             0" in log
    assert "conditioner        85        0           0             0" in log


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_a_complete_checkpoint_and_exits_zero(train_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = _launch(run, train_shards, max_steps=500, save_every=1000, wait=False)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    rank1 = subprocess.run(["pgrep", "-f", "train.py --local_rank=1"], capture_output=True, text=True).stdout.split()
    assert rank1, "rank 1 process not found"
    os.kill(int(rank1[0]), signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = _latest_is_complete(run)
    assert 3 <= step < 500 and max(_losses(run)) == step
    assert "received SIGTERM" in output and "stopped by signal" in output


@pytest.mark.slow
def test_bf16_training_runs_and_saves(train_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "bf16"
    _launch(run, train_shards, stage="2_bf16", max_steps=4, save_every=4)
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < loss < 10 for loss in losses.values())
    assert _latest_is_complete(run) == 4
