"""The DeepSpeed engine on 2 CPU ranks (gloo): train, checkpoint, exact resume, world-size change, signals, export."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

from audioldm_dist.config import TrainConfig
from audioldm_dist.engine.ds_config import load_ds_config
from processes import descendants, free_port, signal_all

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
_launched: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphan_runs():
    """A failed or timed-out test must not leave its ranks running into the next one."""
    yield
    while _launched:
        process = _launched.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _launch(run_dir: Path, shards: Path | str, *, ranks: int = 2, stage: int | str = 2, max_steps: int = 6, save_every: int = 3,
            extra: list[str] = (), wait: bool = True, ds_config: str | None = None, script: str = "train.py"):
    """`script` (train.py's arguments) replaces train.py: test_ds_configs launches a wrapper of its main."""
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script,
               "--deepspeed_config", ds_config or f"configs/ds/zero{stage}.json", "--config", "configs/tiny.yaml",
               "--run-dir", str(run_dir), "--train-data", str(shards), "--max-steps", str(max_steps),
               "--save-every", str(save_every), *extra]
    env = {**os.environ, "WANDB_MODE": "offline"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _launched.append(process)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-6000:]
    return subprocess.CompletedProcess(command, process.returncode, output, "")


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
def test_resume_continues_the_same_loss_curve(train_shards: Path, val_shards: Path, tmp_path: Path,
                                              stage: int) -> None:
    """With validation every 2 steps on: it must not disturb the resumed curve (and works under ZeRO-3)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    validation = ["--val-data", str(val_shards), "--set", "train.val_every=2", "--set", "train.val_num_samples=2"]
    _launch(whole, train_shards, stage=stage, max_steps=6, save_every=3, extra=validation)
    _launch(split, train_shards, stage=stage, max_steps=3, save_every=3, extra=validation)
    assert _latest_is_complete(split) == 3
    resumed = _launch(split, train_shards, stage=stage, max_steps=6, save_every=3, extra=validation)
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = _losses(whole), _losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert _latest_is_complete(split) == 6
    _check_validation_outputs(whole, steps=(2, 4, 6), num_samples=2)


def _check_validation_outputs(run_dir: Path, *, steps: tuple[int, ...], num_samples: int) -> None:
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(s for s, r in records.items() if "val_loss" in r) == list(steps)
    assert all(0 < records[s]["val_loss"] < 10 for s in steps)
    references = sorted((run_dir / "val_reference").glob("*.wav"))
    assert len(references) == num_samples
    for step in steps:
        folder = run_dir / f"val_step{step:07d}"
        assert sorted(p.name for p in folder.glob("*.wav")) == [p.name for p in references]
        for wav in folder.glob("*.wav"):
            info = soundfile.info(str(wav))
            assert info.samplerate == 16000 and info.frames == 20480
            assert wav.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            sidecar = json.loads(wav.with_suffix(".json").read_text())
            assert sidecar["step"] == step and sidecar["caption"]


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
    process = _launch(run, train_shards, max_steps=500, save_every=1000, wait=False,
                      extra=["--set", "train.logger=wandb"])
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    ranks = [subprocess.run(["pgrep", "-f", f"train.py --local_rank={rank}"], capture_output=True,
                            text=True).stdout.split() for rank in (0, 1)]
    assert all(ranks), f"rank processes not found: {ranks}"
    # As SLURM's preemption does, signal rank 1 and every helper process below the ranks (loader workers,
    # forkserver, wandb-core of rank 0); rank 0 hears of it through the agreed stop.
    helpers = [pid for rank in ranks for pid in descendants(int(rank[0]))]
    assert any(b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in helpers)
    signal_all([int(ranks[1][0]), *helpers], signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = _latest_is_complete(run)
    assert 3 <= step < 500 and max(_losses(run)) == step
    assert "received SIGTERM" in output and "stopped by signal" in output
    assert "wandb stopped working" in output  # and metrics.jsonl went on to the saved step (above)


@pytest.mark.slow
def test_trains_from_a_brace_pattern_of_tars_without_sizes_json(train_shards: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    tars = sorted(train_shards.glob("train-*.tar"))
    for tar in tars:
        shutil.copy(tar, bare)
    run = tmp_path / "run"
    result = _launch(run, f"{bare}/train-{{000000..{len(tars) - 1:06d}}}.tar", max_steps=3, save_every=3,
                     extra=["--set", "data.features_in_loader=false"])  # and the log-mel on the trainer
    assert "counting their samples from the tar headers" in result.stdout
    assert sorted(_losses(run)) == [1, 2, 3] and _latest_is_complete(run) == 3
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert json.loads((bare / "sizes.json").read_text()) == {s["name"]: s["num_samples"] for s in manifest["shards"]}


@pytest.mark.slow
def test_bf16_training_runs_and_saves(train_shards: Path, tmp_path: Path) -> None:
    """The engine really trains in bfloat16: the weights DeepSpeed holds and saves, not only the JSON's flag."""
    import torch

    run = tmp_path / "bf16"
    result = _launch(run, train_shards, stage="2_bf16", max_steps=4, save_every=4)
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < loss < 10 for loss in losses.values())
    assert _latest_is_complete(run) == 4
    assert json.loads((run / "checkpoints" / "global_step4" / "meta.json").read_text())["dtype"] == "bfloat16"
    assert "DeepSpeed engine: UNetModel in bfloat16" in result.stdout
    module = torch.load(run / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    assert {tensor.dtype for tensor in module.values() if tensor.is_floating_point()} == {torch.bfloat16}


@pytest.mark.slow
def test_vae_target_trains_with_a_cosine_schedule_validates_and_exports(train_shards: Path, val_shards: Path,
                                                                       tmp_path: Path) -> None:
    """train.target=vae: the VAE engine (+ the discriminator's) trains the autoencoder; WarmupCosineLR follows its formula."""
    import math

    import torch

    from audioldm_dist.config import load_config
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import load_pretrained

    run = tmp_path / "vae"
    max_steps, warmup, lr = 30, 3, 5e-3
    _launch(run, train_shards, stage="2_cosine", max_steps=max_steps, save_every=max_steps,
            extra=["--set", "train.target=vae", "--set", f"train.warmup_steps={warmup}", "--val-data", str(val_shards),
                   "--set", f"train.learning_rate={lr}", "--set", "train.val_every=15", "--set", "train.val_batches=2"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    for record in records:  # the lr of each step's update: WarmupCosineLR (linear warm-up, cos_min 0.01) at step-1
        iteration = record["step"] - 1
        if iteration < warmup:
            ratio = iteration / warmup
        else:
            progress = min(1.0, (iteration - warmup + 1) / (max_steps - warmup))
            ratio = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
        assert record["lr"] == pytest.approx(lr * ratio, rel=1e-4, abs=1e-9), record
    losses = [r["nll_loss"] for r in records]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses  # the reconstruction is learning
    assert all(r["disc_factor"] == (r["step"] > 3) for r in records)  # tiny.yaml: disc_start 3
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    assert not list(run.glob("val_step*")), "the vae target validates the loss only"

    export = subprocess.run([sys.executable, "-m", "audioldm_dist.export", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    exported = torch.load(run / f"export_global_step{max_steps}.ckpt", map_location="cpu", weights_only=False)
    frozen = torch.load(run / "frozen_parts.pt", map_location="cpu", weights_only=False)
    assert frozen["trained"] == "vae" and "vae" not in frozen and "unet" in frozen
    config = load_config(ROOT / "configs" / "tiny.yaml")
    model = AudioLDM(config, captions=exported["audioldm_dist"]["captions"])
    report = load_pretrained(model, run / f"export_global_step{max_steps}.ckpt")
    assert not report.parts["vae"].missing and not report.parts["unet"].missing
    first = next(iter(frozen["unet"]))
    assert torch.equal(model.unet.state_dict()[first], frozen["unet"][first])  # the UNet did not train


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_vae_gan_resume_continues_the_same_losses_past_disc_start(train_shards: Path, tmp_path: Path) -> None:
    """train.target=vae with tiny.yaml's disc_start 3: both engines (VAE, discriminator) resume exactly."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    vae = ["--set", "train.target=vae", "--set", "train.learning_rate=0.001", "--set", "train.warmup_steps=0"]
    _launch(whole, train_shards, max_steps=6, save_every=6, extra=vae, ds_config="configs/ds/vae.json")
    _launch(split, train_shards, max_steps=4, save_every=4, extra=vae, ds_config="configs/ds/vae.json")
    assert (split / "checkpoints" / "global_step4" / "discriminator").is_dir()
    resumed = _launch(split, train_shards, max_steps=6, save_every=6, extra=vae, ds_config="configs/ds/vae.json")
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = _records(whole), _records(split)
    assert sorted(got) == list(range(1, 7))
    terms = ("loss", "rec_loss", "nll_loss", "kl_loss", "g_loss", "d_weight", "disc_factor", "disc_loss")
    for step in range(1, 7):
        for name in terms:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (step, name)
    assert [expected[s]["disc_factor"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert all(expected[s]["disc_loss"] == 0 for s in (1, 2, 3)) and all(expected[s]["disc_loss"] > 0 for s in (4, 5, 6))
    assert all(expected[s]["lr"] == pytest.approx(1e-3) for s in range(1, 7))  # no warm-up
    # the discriminator trained: its logits on real data moved after disc_start, not before
    assert expected[4]["logits_real"] != expected[6]["logits_real"]
