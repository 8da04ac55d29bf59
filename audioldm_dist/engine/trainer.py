"""The training entry: `deepspeed train.py --deepspeed_config configs/ds/zero2.json --config CONFIG ...`.

Only the UNet goes to `deepspeed.initialize` (and so to the optimizer and ZeRO partitioning); the
frozen VAE, conditioner and vocoder stay plain modules on every rank. Each step: next batch from the
streaming loader → latents and condition outside the engine → `engine(x_t, t, ...)` → backward/step
(DeepSpeed handles accumulation) → EMA → log → maybe checkpoint. Resuming restores the engine, EMA,
VAE scale, data stream state and every rank's RNG, so the loss curve continues exactly.
With train.target=vae the engine wraps the VAE and `engine/vae_gan.py` adds the discriminator's engine
(the original's adversarial VAE loss); its state is part of every checkpoint.

`train` strings together named steps, each given what it needs: `plan_run` (DeepSpeed JSON, resume point),
`build` (config → model, engines, EMA, objective), `restore` (a checkpoint → the loop's state), `open_data`,
then per step `train_step` (one optimizer step), `validate`, `log_step` and `save`. `main` turns the command
line into a `RunOptions` once; nothing below it sees the argparse namespace.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from audioldm_dist.build import build_model_with_weights, check_encoded_shards, tokenizer_captions
from audioldm_dist.config import Config, load_config, to_dict
from audioldm_dist.data.sources import ShardInfo, resolve_specs
from audioldm_dist.data.stream import (ShardStream, StreamOptions, StreamTracker, end_loader_workers, loader_options,
                                       make_loader)
from audioldm_dist.data.stream_plan import StreamState
from audioldm_dist.diffusion.ema import EMA
from audioldm_dist.engine import checkpoint
from audioldm_dist.engine.distributed import (DistEnv, attempt_id, build_lock_warning, collective_device,
                                              destroy_process_group, device_for, init_process_group)
from audioldm_dist.engine.guard import JobGuard, inject_test_fault
from audioldm_dist.engine.ds_config import initialize_engine, load_ds_config, training_dtype
from audioldm_dist.engine.run_log import MetricsLogger
from audioldm_dist.engine.run_config import check_run_config
from audioldm_dist.engine.signals import StopSignal
from audioldm_dist.engine.validation import Validator
from audioldm_dist.engine.vae_gan import VAEGAN, build_vae_gan, check_vae_ds_config, mean_metrics
from audioldm_dist.models.lpips import load_lpips
from audioldm_dist.engine.objectives import TRAINED_PART, Objective, make_objective

log = logging.getLogger("audioldm_dist.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an AudioLDM latent diffusion model with DeepSpeed.")
    parser.add_argument("--config", required=True, help="experiment YAML (configs/…)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (configs/ds/…)")
    parser.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl and logs go here")
    parser.add_argument("--train-data", action="append", default=None,
                        help="make-shards folder or brace pattern (repeat to mix; SPEC::weight=W)")
    parser.add_argument("--val-data", action="append", default=None,
                        help="validation shards (as --train-data); loss and samples every train.val_every steps")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a tag folder")
    parser.add_argument("--reload_from_ckpt", help="released AudioLDM weights to start from (finetuning)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "train.save_every"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.train_data:
        overrides.append("data.train=" + json.dumps(args.train_data))
    if args.val_data:
        overrides.append("data.val=" + json.dumps(args.val_data))
    return load_config(args.config, overrides)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What `train` takes from train.py's command line besides the config."""

    run_dir: Path
    """Checkpoints, metrics.jsonl, config.json and validation samples go here."""
    config_path: str
    """The experiment YAML (named in `check_run_config`'s errors)."""
    deepspeed_config: str
    resume: str = "auto"
    """auto (newest complete checkpoint), none, or a tag folder."""
    reload_from_ckpt: str | None = None
    """Released AudioLDM weights to start from (finetuning)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(run_dir=Path(args.run_dir), config_path=args.config, deepspeed_config=args.deepspeed_config,
                   resume=args.resume, reload_from_ckpt=args.reload_from_ckpt)


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s rank {env.rank}/{env.world_size} %(name)s: %(message)s", force=True)


def rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = DistEnv.from_environ()
    setup_logging(env)
    try:
        config = resolve_config(args)
    except ValueError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    options = RunOptions.from_args(args)
    init_process_group(env, timeout_s=config.train.hang_timeout_long)
    stop = StopSignal(rank=env.rank)
    guard = JobGuard(run_dir=options.run_dir, attempt=attempt_id(), rank=env.rank,
                     hang_timeout=config.train.hang_timeout, hang_timeout_long=config.train.hang_timeout_long)
    try:
        status = train(config, options=options, env=env, stop=stop, guard=guard)
    except BaseException as error:  # noqa: BLE001 — every failure ends the job: guard.fail never returns
        guard.fail(error)
    with guard.phase("shutdown"):
        killed = end_loader_workers()  # else Python's exit hook may wait forever on a worker (stream.py)
        if killed:
            log.warning("rank %d: %d loader worker(s) still running after training; killed", env.rank, killed)
        destroy_process_group()
    guard.close()
    if stop.stopped_early:
        stop.forward()  # e.g. submitit's requeue, now that the checkpoint is complete
    stop.restore()
    return status


@dataclass(kw_only=True)
class Built:
    """What `build` makes: the model on this rank's device and what trains its `TRAINED_PART`."""

    model: nn.Module
    """The whole AudioLDM (`ldm.AudioLDM`)."""
    engine: Any
    """The DeepSpeed engine over the trained part (the UNet, or the VAE with train.target=vae)."""
    ema: EMA
    objective: Objective
    gan: VAEGAN | None
    """train.target=vae: the discriminator's engine and the GAN step (`vae_gan.py`); else None."""
    encoding: dict | None
    """Encoded training shards: the model's encoding fingerprints; audio shards: None."""
    device: torch.device
    zero_stage: int


@dataclass(kw_only=True)
class LoopState:
    """What the loop carries from step to step; a checkpoint holds all of it (`save`, `restore`)."""

    step: int
    generator: torch.Generator
    """The trainer's RNG: noise, timesteps and condition dropout (one stream per rank)."""
    needs_scale: bool
    """scale_by_std still to be estimated from the first batch."""
    stream_state: StreamState | None = None
    wandb_id: str | None = None


@dataclass(kw_only=True)
class StepResult:
    """One optimizer step, as `log_step` reports it."""

    loss: torch.Tensor
    """Mean over the micro-batches and the ranks."""
    learning_rate: float
    data_wait: float
    """Seconds spent waiting for batches."""
    seconds: float
    gan_terms: list[dict[str, torch.Tensor]] = field(default_factory=list)


def train(config: Config, *, options: RunOptions, env: DistEnv, stop: StopSignal, guard: JobGuard) -> int:
    options.run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls where the GPU has them, as the original (TLD:47-50)
    ds, point = plan_run(config, options=options, env=env)
    shards = training_shards(config, run_dir=options.run_dir)
    built = build(config, shards=shards, ds=ds, env=env, resuming=point is not None,
                  reload_from_ckpt=options.reload_from_ckpt)
    state = fresh_state(config, built=built, env=env)
    if point is not None:
        restore(built, state, point=point, config=config, env=env, run_dir=options.run_dir)
    elif env.is_main:
        (options.run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1))
    if env.is_main and not (options.run_dir / checkpoint.FROZEN_PARTS).is_file():
        checkpoint.save_frozen_parts(built.model, options.run_dir / checkpoint.FROZEN_PARTS,
                                     trained=TRAINED_PART[config.train.target])
    tracker, batches = open_data(shards, config=config, built=built, env=env, state=state.stream_state)
    logger = MetricsLogger(options.run_dir, enabled=env.is_main, use_wandb=config.train.logger == "wandb",
                           start_step=state.step, max_steps=config.train.max_steps, wandb_id=state.wandb_id,
                           config=to_dict(config))
    validator = build_validator(config, built=built, env=env, run_dir=options.run_dir)
    built.model.train()
    failed = False
    try:
        run_loop(built, state, config=config, env=env, batches=batches, tracker=tracker, logger=logger,
                 validator=validator, stop=stop, guard=guard, run_dir=options.run_dir)
    except BaseException:
        failed = True  # the guard ends this rank and wandb's process with it: no wandb.finish() that may hang
        raise
    finally:
        if not failed:
            logger.close()
    if not stop.stopped_early:
        log.info("training finished at step %d", state.step)
    return 0


def plan_run(config: Config, *, options: RunOptions, env: DistEnv) -> tuple[dict, checkpoint.ResumePoint | None]:
    """The DeepSpeed config (filled from ours) and the checkpoint to resume from, converted to a universal one
    when it was written by another number of ranks; checks the run directory belongs to this config."""
    ds = load_ds_config(options.deepspeed_config, config.train, world_size=env.world_size)
    check_run_config(options.run_dir, config, config_path=options.config_path)
    point = checkpoint.find_resume_point(options.run_dir, options.resume)
    if config.train.target == "vae":
        check_vae_ds_config(ds)
    if point is not None and point.meta["world_size"] != env.world_size:
        if config.train.target == "vae":
            raise ValueError(f"train.target=vae: the checkpoint {point.our_dir} was written by "
                             f"{point.meta['world_size']} ranks; resume it with that many (the discriminator's "
                             f"checkpoint is not converted to a universal one)")
        point = checkpoint.universal_for(point, rank=env.rank)
        ds["checkpoint"] = {"load_universal": True}
    return ds, point


def training_shards(config: Config, *, run_dir: Path) -> list[ShardInfo]:
    if not config.data.train:
        raise ValueError("no training data: pass --train-data (a make-shards folder) or set data.train")
    return resolve_specs(config.data.train, cache_dir=run_dir)


def build(config: Config, *, shards: list[ShardInfo], ds: dict, env: DistEnv, resuming: bool,
          reload_from_ckpt: str | None) -> Built:
    """Config → the model on this rank's device, its trained part in a DeepSpeed engine (with train.target=vae
    also the discriminator's), the EMA of the trained part and the objective."""
    device = device_for(env)
    captions = tokenizer_captions(config, shards, reload_from_ckpt=reload_from_ckpt)
    model, report = build_model_with_weights(config, captions=captions, reload_from_ckpt=reload_from_ckpt,
                                             resuming=resuming)
    encoding = check_encoded_shards(shards, model=model, config=config)
    model = model.to(device)
    model.unet.select_attention_backend(device=device, dtype=training_dtype(ds))
    trained = getattr(model, TRAINED_PART[config.train.target])  # the UNet, or the VAE with train.target=vae
    trained.requires_grad_(True)
    lpips = load_lpips(weights=config.vae.lpips_weights, random_init=config.vae.lpips_random_init,
                       seed=config.train.seed) if config.train.target == "vae" else None
    objective = make_objective(model, config.train.target, lpips=lpips.to(device) if lpips is not None else None)
    ema = EMA(trained, decay=config.diffusion.ema_decay)  # before ZeRO-3 partitions the parameters
    if report is not None and report.ema and config.train.target == "ldm":  # finetuning goes on with its EMA
        ema.start_from(report.ema, num_updates=report.ema_num_updates)
        log.info("EMA: %d tensors from %s (num_updates %s)", len(report.ema), reload_from_ckpt,
                 report.ema_num_updates)
    with build_lock_warning(rank=env.rank):
        engine = initialize_engine(trained, ds, fresh=not resuming)
    gan = build_vae_gan(model, vae_engine=engine, ds=ds, config=config, device=device,
                        lpips=lpips) if config.train.target == "vae" else None
    return Built(model=model, engine=engine, ema=ema, objective=objective, gan=gan, encoding=encoding, device=device,
                 zero_stage=engine.zero_optimization_stage())


def fresh_state(config: Config, *, built: Built, env: DistEnv) -> LoopState:
    # scale_by_std as the original (ddpm.py:1087-1110): estimated only when a run starts from nothing and the
    # scale is still 1; a scale that a checkpoint carries (--reload_from_ckpt, or the config) is used as it is.
    needs_scale = (config.vae.scale_by_std and config.train.target == "ldm"
                   and float(built.model.vae.scale_factor) == 1.0)
    return LoopState(step=0, generator=torch.Generator().manual_seed(config.train.seed * 100_003 + env.rank),
                     needs_scale=needs_scale)


def restore(built: Built, state: LoopState, *, point: checkpoint.ResumePoint, config: Config, env: DistEnv,
            run_dir: Path) -> None:
    """Loads the checkpoint into the engine(s), the EMA, the VAE scale and `state`: the run goes on exactly
    where it was saved (another world size: the same weights, a new deterministic RNG stream per rank)."""
    built.engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_module_strict=True)
    if built.gan is not None:
        built.gan.load(point.our_dir)
    client = checkpoint.load_client_state(point)
    state.step = point.meta["step"]
    built.model.vae.scale_factor.fill_(client["scale_factor"])
    state.needs_scale = False
    built.ema.load_state_dict(client["ema"])
    state.stream_state = StreamState.from_dict(client["stream"])
    state.wandb_id = client.get("wandb_id")
    rng = checkpoint.load_rng_state(point, rank=env.rank)
    if rng is not None:
        state.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
    else:  # another world size: a deterministic new stream of randomness per rank
        state.generator.manual_seed(config.train.seed * 100_003 + env.rank + 7919 * state.step)
    log.info("resumed from %s at step %d", point.our_dir, state.step)
    if env.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", after_step=state.step)


def open_data(shards: list[ShardInfo], *, config: Config, built: Built, env: DistEnv,
              state: StreamState | None) -> tuple[StreamTracker, Iterator[dict]]:
    """This rank's batches, from the stream state a checkpoint carried (None: the start), and the tracker that
    follows which of them the loop consumed."""
    stream = ShardStream(shards, audio=config.audio, state=state, options=StreamOptions(
        batch_size=config.train.micro_batch_size, rank=env.rank, world_size=env.world_size, seed=config.train.seed,
        encoding=built.encoding, **loader_options(config.data, device=built.device)))
    return StreamTracker(stream), iter(make_loader(stream))


def build_validator(config: Config, *, built: Built, env: DistEnv, run_dir: Path) -> Validator | None:
    if not config.data.val:
        return None
    val_shards = resolve_specs(config.data.val, cache_dir=run_dir)
    return Validator(val_shards, config=config, objective=built.objective, rank=env.rank, world_size=env.world_size,
                     run_dir=run_dir, encoding=check_encoded_shards(val_shards, model=built.model, config=config))


def run_loop(built: Built, state: LoopState, *, config: Config, env: DistEnv, batches: Iterator[dict],
             tracker: StreamTracker, logger: MetricsLogger, validator: Validator | None, stop: StopSignal,
             guard: JobGuard, run_dir: Path) -> None:
    """Steps until train.max_steps, or until a stop signal (after saving; `stop.stopped_early`). Validation comes
    before saving: a resumed run replays the same steps."""
    max_steps = config.train.max_steps
    while state.step < max_steps:
        result = train_step(built, state, config=config, env=env, batches=batches, tracker=tracker, guard=guard)
        step = state.step
        val_metrics = {}
        if validator is not None and (step % config.train.val_every == 0 or step == max_steps):
            with guard.phase(f"validation at step {step}"):
                val_metrics = validate(validator, built=built, logger=logger, step=step)  # before saving: exact resume
        if step % config.train.log_every == 0 or val_metrics:
            log_step(logger, result, step=step, engine=built.engine, tracker=tracker, config=config, env=env,
                     val_metrics=val_metrics)
        logger.advance()
        stopping = stop.should_stop()
        if step % config.train.save_every == 0 or step == max_steps or stopping:
            with guard.phase(f"checkpoint at step {step}"):
                save(built, state, tracker=tracker, config=config, env=env, run_dir=run_dir, wandb_id=logger.wandb_id)
        if stopping and step < max_steps:
            stop.stopped_early = True
            log.warning("rank %d: stopped by signal after saving step %d", env.rank, step)
            return


def train_step(built: Built, state: LoopState, *, config: Config, env: DistEnv, batches: Iterator[dict],
               tracker: StreamTracker, guard: JobGuard) -> StepResult:
    """One optimizer step over train.gradient_accumulation_steps micro-batches, then the EMA update."""
    guard.set_phase(f"step {state.step + 1}")
    inject_test_fault(rank=env.rank, step=state.step + 1)
    started = time.perf_counter()
    engine = built.engine
    learning_rate = float(engine.get_lr()[0])  # what this step's update uses (the scheduler moves after it)
    data_wait = 0.0
    losses, gan_terms = [], []
    for _ in range(config.train.gradient_accumulation_steps):
        fetch = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - fetch
        if state.needs_scale:
            _set_scale_from_rank0(built.model, batch)
            state.needs_scale = False
        if built.gan is not None:  # target=vae: discriminator step, then the VAE's (vae_gan.py)
            gan_terms.append(built.gan.micro_step(batch, generator=state.generator, step=state.step))
            loss = gan_terms[-1]["loss"]
        else:
            loss = built.objective(batch, generator=state.generator, network=engine)
            engine.backward(loss)
            engine.step()
        tracker.advance(batch)
        losses.append(loss.detach().float())
    state.step += 1
    _update_ema(built.ema, engine, zero_stage=built.zero_stage)
    guard.step_done(time.perf_counter() - started)
    mean_loss = torch.stack(losses).mean()
    if dist.is_initialized():
        dist.all_reduce(mean_loss)
        mean_loss /= env.world_size
    return StepResult(loss=mean_loss, learning_rate=learning_rate, data_wait=data_wait,
                      seconds=time.perf_counter() - started, gan_terms=gan_terms)


def log_step(logger: MetricsLogger, result: StepResult, *, step: int, engine, tracker: StreamTracker, config: Config,
             env: DistEnv, val_metrics: dict) -> None:
    """One metrics.jsonl record (and wandb's): loss, learning rate, gradient norm, throughput, data health."""
    elapsed = result.seconds
    samples = config.train.micro_batch_size * config.train.gradient_accumulation_steps * env.world_size
    grad_norm = engine.get_global_grad_norm()
    counters = tracker.counters()
    logger.log(step, {"loss": float(result.loss), "lr": result.learning_rate,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "step_seconds": elapsed, "samples_per_s": samples / elapsed,
                      "audio_s_per_s": samples * config.audio.duration / elapsed,
                      "data_wait": result.data_wait / elapsed, "epoch": tracker.state.epoch,
                      "failed_samples": counters["failed"], **val_metrics,
                      **(mean_metrics(result.gan_terms, world_size=env.world_size) if result.gan_terms else {})})


def _update_ema(ema: EMA, engine, *, zero_stage: int) -> None:
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them for the update."""
    if zero_stage < 3:
        ema.update(engine.module)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        ema.update(engine.module)


def validate(validator: Validator, *, built: Built, logger: MetricsLogger, step: int) -> dict:
    """The val loss on every rank; rank 0 writes (and logs) samples of the EMA weights."""
    started = time.perf_counter()
    val_loss = validator.loss(built.engine)
    paths = validator.write_samples(built.model, built.ema, step=step)
    logger.log_samples(step, paths, captions=[prompt.caption for prompt in validator.prompts],
                       sample_rate=built.model.config.audio.sampling_rate)
    log.info("step %d: val_loss %.5f, %d samples in %s", step, val_loss, len(paths),
             paths[0].parent if paths else "-")
    return {"val_loss": val_loss, "val_seconds": time.perf_counter() - started}


def _set_scale_from_rank0(model: nn.Module, batch: dict) -> None:
    scale = torch.tensor([model.latent_scale_from(batch)], device=collective_device())
    if dist.is_initialized():
        dist.broadcast(scale, src=0)  # every rank uses rank 0's first batch, as one process would
    model.vae.scale_factor.fill_(float(scale))
    log.info("scale_by_std: latent scale factor %.5f from the first batch", float(scale))


def save(built: Built, state: LoopState, *, tracker: StreamTracker, config: Config, env: DistEnv, run_dir: Path,
         wandb_id: str | None) -> None:
    """A complete checkpoint of every rank: engine(s), EMA, VAE scale, stream state, this rank's RNG."""
    client = {"step": state.step, "scale_factor": float(built.model.vae.scale_factor),
              "stream": tracker.state.to_dict(), "ema": built.ema.state_dict(), "config": to_dict(config),
              "wandb_id": wandb_id}
    checkpoint.save(built.engine, run_dir=run_dir, step=state.step, client_state=client,
                    rng_state=rng_state(state.generator), rank=env.rank, world_size=env.world_size,
                    zero_stage=built.zero_stage, keep_last=config.train.keep_last,
                    stop_on_low_disk=config.train.stop_on_low_disk,
                    save_extra=built.gan.save if built.gan is not None else None)


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drops records a killed run logged after the checkpoint it resumes from, so the curve has no repeats."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))
