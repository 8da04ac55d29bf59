"""Every shipped DeepSpeed JSON: validated without a launch, and the ones a CPU can run trained on 2 gloo ranks.

Layers, cheapest first: each `configs/ds/*.json` × each `configs/*.yaml` through our reconciliation
(`load_ds_config`) and DeepSpeed's own parser; then ZeRO-1 with gradient accumulation, ZeRO-2 with the
optimizer offloaded to the CPU and ZeRO-2 in fp16, 2 steps each; then accumulation 2 × micro-batch 1
against micro-batch 2 × accumulation 1 (same data, same gradients). `configs/*.yaml` are loaded by
test_config.py.

Launched elsewhere: zero2.json and zero3.json (test_engine.py's resume test), zero2_bf16.json
(test_engine.py's bf16 test), zero2_cosine.json and vae.json (its VAE tests). zero2_fp16.json is launched
only where DeepSpeed's accelerator takes float16 (`_fp16_refusal`); elsewhere the load test covers it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from audioldm_dist.config import load_config
from audioldm_dist.engine.ds_config import load_ds_config, training_dtype
from test_engine import _latest_is_complete, _launch, _no_orphan_runs  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((ROOT / "configs" / "ds").glob("*.json"))
MODEL_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

PROMISED = {  # what each file's name (and the README) promises: ZeRO stage, training dtype, optimizer on the CPU
    "vae": (2, torch.float32, False),
    "zero1": (1, torch.float32, False),
    "zero2": (2, torch.float32, False),
    "zero2_bf16": (2, torch.bfloat16, False),
    "zero2_cosine": (2, torch.float32, False),
    "zero2_fp16": (2, torch.float16, False),
    "zero2_offload": (2, torch.float32, True),
    "zero3": (3, torch.float32, False),
}


def test_every_shipped_deepspeed_config_is_listed_here() -> None:
    assert sorted(p.stem for p in DS_CONFIGS) == sorted(PROMISED), "add the new JSON to PROMISED (and launch it)"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_config_reconciles_with_every_model_config_and_deepspeed_accepts_it(path: Path) -> None:
    """Our reconciliation fills every "auto" from each shipped YAML without a disagreement; DeepSpeed's parser
    (batch arithmetic, ZeRO and precision sections) accepts the result and reads what the name promises."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from audioldm_dist.engine.vae_gan import check_vae_ds_config

    stage, dtype, offload = PROMISED[path.stem]
    for model_config in MODEL_CONFIGS:
        train = load_config(model_config).train
        ds = load_ds_config(path, train, world_size=2)
        assert ds["train_batch_size"] == train.micro_batch_size * train.gradient_accumulation_steps * 2
        assert ds["optimizer"]["params"]["lr"] == train.learning_rate, model_config.name
        assert "auto" not in json.dumps(ds), (model_config.name, ds)
        assert training_dtype(ds) == dtype
        # DeepSpeedConfig takes the world size from torch.distributed, 1 when no group is up (as here)
        parsed = DeepSpeedConfig(load_ds_config(path, train, world_size=1))
        assert parsed.zero_optimization_stage == stage, model_config.name
        assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == (dtype == torch.bfloat16,
                                                                                  dtype == torch.float16)
        offloaded = parsed.zero_config.offload_optimizer
        assert (offloaded is not None and offloaded.device == "cpu") == offload
        if train.target == "vae":
            if stage == 3:
                with pytest.raises(ValueError, match="ZeRO stages 0-2"):
                    check_vae_ds_config(ds)
            else:
                check_vae_ds_config(ds)


def _check_trained(run: Path, *, steps: int, zero_stage: int, dtype: str = "float32") -> None:
    """Every step logged a finite loss and gradient norm; the last step's checkpoint is complete and records
    the ZeRO stage and the dtype the engine trained in."""
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, steps + 1))
    for step, record in records.items():
        assert math.isfinite(record["loss"]) and 0 < record["loss"] < 10, (step, record)
        assert record["grad_norm"] is not None and math.isfinite(record["grad_norm"]), (step, record)
    assert _latest_is_complete(run) == steps
    meta = json.loads((run / "checkpoints" / f"global_step{steps}" / "meta.json").read_text())
    assert (meta["zero_stage"], meta["dtype"]) == (zero_stage, dtype)


def _engine_line(output: str) -> str:
    """What `initialize_engine` logged about the engine it built (rank 0)."""
    return next(line for line in output.splitlines() if "DeepSpeed engine: " in line)


def _model_states(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


@pytest.mark.slow
def test_zero1_with_gradient_accumulation_trains_and_saves(train_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "zero1"
    result = _launch(run, train_shards, ds_config="configs/ds/zero1.json", max_steps=2, save_every=2,
                     extra=["--set", "train.gradient_accumulation_steps=2"])
    _check_trained(run, steps=2, zero_stage=1)
    assert "ZeRO stage 1" in _engine_line(result.stdout) and "gradient accumulation 2" in _engine_line(result.stdout)
    states = _model_states(run, 2)  # 2 updates of 2 micro-batches × 2 samples × 2 ranks
    assert (states["global_steps"], states["global_samples"]) == (2, 16)
    client = torch.load(run / "checkpoints" / "global_step2" / "client_state.pt", weights_only=False)
    assert client["stream"]["steps_done"] == 4  # each rank consumed 2 micro-batches per step


@pytest.mark.slow
def test_zero2_with_the_optimizer_offloaded_to_the_cpu_trains_and_saves(train_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "offload"
    result = _launch(run, train_shards, ds_config="configs/ds/zero2_offload.json", max_steps=2, save_every=2)
    _check_trained(run, steps=2, zero_stage=2)
    engine = _engine_line(result.stdout)
    assert "optimizer DeepSpeedCPUAdam, offloaded to the CPU" in engine, engine  # not the in-place FusedAdam


def _fp16_refusal() -> str | None:
    """Why DeepSpeed's accelerator here refuses float16, or None. Its CPU accelerator takes float16 only where
    oneDNN reports fp16 support (`torch.ops.mkldnn._is_mkldnn_fp16_supported`: CPUs with AVX512-FP16 or
    AMX-FP16); elsewhere `deepspeed.initialize` raises "Type fp16 is not supported on your device"."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return None
    return f"DeepSpeed's {accelerator.device_name()} accelerator does not support float16 on this machine"


@pytest.mark.slow
def test_zero2_fp16_trains_with_loss_scaling_and_saves_where_the_accelerator_takes_fp16(train_shards: Path,
                                                                                      tmp_path: Path) -> None:
    refusal = _fp16_refusal()
    if refusal:
        pytest.skip(f"{refusal}; zero2_fp16.json is covered by the load test above")
    run = tmp_path / "fp16"
    result = _launch(run, train_shards, ds_config="configs/ds/zero2_fp16.json", max_steps=2, save_every=2)
    _check_trained(run, steps=2, zero_stage=2, dtype="float16")
    assert "UNetModel in float16" in _engine_line(result.stdout)
    optimizer = torch.load(run / "checkpoints" / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           map_location="cpu", weights_only=False)["optimizer_state_dict"]
    # the JSON's loss_scale 0: dynamic, from 2^16 (initial_scale_power), no overflow in 2 steps
    assert optimizer["dynamic_loss_scale"] and optimizer["loss_scaler"].cur_scale == 2.0 ** 16


# Accumulation 2 × micro-batch 1 against micro-batch 2 × accumulation 1, on 2 ranks.
#
# What is the same in both layouts by construction, and so must give the same numbers:
# - the samples of each step: a rank reads its chunk of the epoch in one order whatever the micro-batch
#   (stream_plan.py: chunks are cut by batches × batch size = the same 16 items here, and the shuffle
#   buffer's RNG depends on (seed, epoch, rank, worker), not on the batch size), so step 1 of rank r is
#   its items 1-2 either as one micro-batch or as two;
# - the weights (same seed) and the learning rate: warm-up off (the first update would have lr 0) and
#   scale_by_std off (its scale comes from rank 0's first micro-batch, 1 sample or 2: different by design).
# What is not the same, and is made so: the trainer draws the CLAP text/audio switch, guidance dropout,
# the posterior sample, t and the noise per micro-batch from one generator per rank, so the draws of a
# micro-batch of 2 differ from those of two micro-batches of 1. A wrapper of train.py (below; only the
# objective changes) draws each sample's randomness from a generator seeded by the sample's key and
# forwards one sample at a time (the UNet's GroupNorm and attention are per sample, so a sample's loss is
# the same function of it as in a batched forward); a micro-batch's loss is the mean of its samples'.
# Then the mean gradient over the global batch of 4 must be equal whether DeepSpeed averages 2
# micro-batches (loss / accumulation steps, then the ranks' mean) or autograd averages 2 samples.
# Compared: each step's logged loss and gradient norm; after steps 1 and 2 each rank's ZeRO-2 partition
# of Adam's moments (exp_avg is 0.1 × the step-1 gradient itself, and holds both steps' gradients after
# step 2), to float32 round-off relative to the tensor's scale; the fp32 master weights after the first
# update to 1e-8. Not the weights after step 2: where a gradient is round-off-sized (|g| ~ 1e-9, below
# Adam's eps), Adam's update lr·g/(|g| + eps) turns the round-off into differences of 1e-5 (seen).
PER_SAMPLE_NOISE = """
import sys
import zlib

sys.path.insert(0, {root!r})  # this checkout's package: the launcher puts the script's folder first
import torch

from audioldm_dist.engine import trainer


def per_sample_noise(make_objective):
    def make(model, target, **kwargs):
        objective = make_objective(model, target, **kwargs)

        def each_sample(batch, *, generator, network, evaluation=False):
            assert not evaluation, "no validation in this run"
            losses = []
            for i, key in enumerate(batch["key"]):
                sample = {{name: value if name == "stream" else value[i:i + 1] for name, value in batch.items()}}
                own = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                losses.append(objective(sample, generator=own, network=network))
            return torch.stack(losses).mean()
        return each_sample
    return make


if __name__ == "__main__":  # not in the loader's forkserver, which imports this file as __mp_main__
    trainer.make_objective = per_sample_noise(trainer.make_objective)
    sys.exit(trainer.main())
"""
SAME_DRAWS = ["--set", "train.warmup_steps=0", "--set", "vae.scale_by_std=false"]


def _zero_partitions(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Each rank's ZeRO-1/2 partition of the flat parameters: fp32 master weights and Adam's moments."""
    found = {}
    for rank in range(2):
        state = torch.load(run / "checkpoints" / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           map_location="cpu", weights_only=False)["optimizer_state_dict"]
        (moments,) = state["base_optimizer_state"]["state"].values()  # one parameter group: the UNet
        (weights,) = state["single_partition_of_fp32_groups"]
        found |= {f"rank {rank} weights": weights, f"rank {rank} exp_avg": moments["exp_avg"],
                  f"rank {rank} exp_avg_sq": moments["exp_avg_sq"]}
    return found


@pytest.mark.slow
def test_accumulating_two_micro_batches_of_one_equals_one_micro_batch_of_two(train_shards: Path,
                                                                            tmp_path: Path) -> None:
    script = tmp_path / "train_per_sample_noise.py"
    script.write_text(PER_SAMPLE_NOISE.format(root=str(ROOT)))
    accumulated, batched = tmp_path / "accumulated", tmp_path / "batched"
    _launch(accumulated, train_shards, script=str(script), max_steps=2, save_every=1,
            extra=[*SAME_DRAWS, "--set", "train.micro_batch_size=1", "--set", "train.gradient_accumulation_steps=2"])
    _launch(batched, train_shards, script=str(script), max_steps=2, save_every=1,
            extra=[*SAME_DRAWS, "--set", "train.micro_batch_size=2", "--set", "train.gradient_accumulation_steps=1"])
    _check_trained(accumulated, steps=2, zero_stage=2)
    _check_trained(batched, steps=2, zero_stage=2)
    assert _model_states(accumulated, 2)["ds_config"]["gradient_accumulation_steps"] == 2
    assert _model_states(batched, 2)["ds_config"]["gradient_accumulation_steps"] == 1

    records = [{r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
               for run in (accumulated, batched)]
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            assert records[0][step][key] == pytest.approx(records[1][step][key], rel=1e-5), (step, key)
    for step in (1, 2):
        got, expected = _zero_partitions(accumulated, step), _zero_partitions(batched, step)
        assert any(expected[f"rank {rank} exp_avg"].abs().max() > 0 for rank in (0, 1))  # real gradients
        for key in expected:
            if key.endswith("weights"):
                if step == 1:  # every update is about lr = 1e-3; 1e-8 is 1e-5 of one
                    torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-8, msg=key)
                continue  # step 2: Adam turns round-off-sized gradients (|g| ~ 1e-9 < eps) into updates ~lr
            # float32 round-off of the gradient sums relative to the tensor's scale (seen: 3e-7 of it at most)
            scale = float(expected[key].abs().max())
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5 * scale, msg=f"step {step}: {key}")
