"""The training entry: `deepspeed train.py --deepspeed_config configs/ds/zero2.json --config CONFIG ...`.

Only the UNet goes to `deepspeed.initialize` (and so to the optimizer and ZeRO partitioning); the
frozen VAE, conditioner and vocoder stay plain modules on every rank. Each step: next batch from the
streaming loader → latents and condition outside the engine → `engine(x_t, t, ...)` → backward/step
(DeepSpeed handles accumulation) → EMA → log → maybe checkpoint. Resuming restores the engine, EMA,
VAE scale, data stream state and every rank's RNG, so the loss curve continues exactly.
With train.target=vae the engine wraps the VAE and `engine/vae_gan.py` adds the discriminator's engine
(the original's adversarial VAE loss); its state is part of every checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from audioldm_dist.build import build_model_with_weights, tokenizer_captions
from audioldm_dist.config import Config, load_config, to_dict
from audioldm_dist.data.sources import resolve_specs
from audioldm_dist.data.encoded import check_encoding
from audioldm_dist.data.stream import (ShardStream, detect_encoding, StreamOptions, StreamTracker, end_loader_workers, loader_options,
                                       make_loader)
from audioldm_dist.data.stream_plan import StreamState
from audioldm_dist.diffusion.ema import EMA
from audioldm_dist.engine import checkpoint
from audioldm_dist.engine.distributed import (DistEnv, attempt_id, build_lock_warning, collective_device,
                                              destroy_process_group, device_for, init_process_group)
from audioldm_dist.engine.guard import JobGuard, inject_test_fault
from audioldm_dist.engine.ds_config import initialize_engine, load_ds_config, training_dtype
from audioldm_dist.engine.metrics import MetricsLogger
from audioldm_dist.engine.run_config import check_run_config
from audioldm_dist.engine.signals import StopSignal
from audioldm_dist.encoding import model_encoding
from audioldm_dist.engine.vae_gan import VAEGAN, build_vae_gan, check_vae_ds_config, mean_metrics
from audioldm_dist.models.lpips import load_lpips
from audioldm_dist.objectives import TRAINED_PART, make_objective

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
    init_process_group(env, timeout_s=config.train.hang_timeout_long)
    stop = StopSignal(rank=env.rank)
    guard = JobGuard(run_dir=Path(args.run_dir), attempt=attempt_id(), rank=env.rank,
                     hang_timeout=config.train.hang_timeout, hang_timeout_long=config.train.hang_timeout_long)
    try:
        status = train(config, args, env, stop=stop, guard=guard)
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


def train(config: Config, args: argparse.Namespace, env: DistEnv, *, stop: StopSignal, guard: JobGuard) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls where the GPU has them, as the original (TLD:47-50)
    device = device_for(env)
    ds = load_ds_config(args.deepspeed_config, config.train, world_size=env.world_size)
    dtype = training_dtype(ds)
    check_run_config(run_dir, config, config_path=args.config)
    point = checkpoint.find_resume_point(run_dir, args.resume)
    if config.train.target == "vae":
        check_vae_ds_config(ds)
    if point is not None and point.meta["world_size"] != env.world_size:
        if config.train.target == "vae":
            raise ValueError(f"train.target=vae: the checkpoint {point.our_dir} was written by "
                             f"{point.meta['world_size']} ranks; resume it with that many (the discriminator's "
                             f"checkpoint is not converted to a universal one)")
        point = checkpoint.universal_for(point, rank=env.rank)
        ds["checkpoint"] = {"load_universal": True}
    if not config.data.train:
        raise ValueError("no training data: pass --train-data (a make-shards folder) or set data.train")
    shards = resolve_specs(config.data.train, cache_dir=run_dir)

    captions = tokenizer_captions(config, shards, reload_from_ckpt=args.reload_from_ckpt)
    model, report = build_model_with_weights(config, captions=captions, reload_from_ckpt=args.reload_from_ckpt,
                                             resuming=point is not None)
    encoding = _check_encoded_shards(model, config, shards)
    model = model.to(device)
    model.unet.select_attention_backend(device=device, dtype=dtype)
    trained = getattr(model, TRAINED_PART[config.train.target])  # the UNet, or the VAE with train.target=vae
    trained.requires_grad_(True)
    lpips = load_lpips(weights=config.vae.lpips_weights, random_init=config.vae.lpips_random_init,
                       seed=config.train.seed) if config.train.target == "vae" else None
    objective = make_objective(model, config.train.target, lpips=lpips.to(device) if lpips is not None else None)
    ema = EMA(trained, decay=config.diffusion.ema_decay)  # before ZeRO-3 partitions the parameters
    if report is not None and report.ema and config.train.target == "ldm":  # finetuning goes on with its EMA
        ema.start_from(report.ema, num_updates=report.ema_num_updates)
        log.info("EMA: %d tensors from %s (num_updates %s)", len(report.ema), args.reload_from_ckpt,
                 report.ema_num_updates)
    with build_lock_warning(rank=env.rank):
        engine = initialize_engine(trained, ds, fresh=point is None)
    gan = build_vae_gan(model, vae_engine=engine, ds=ds, config=config, device=device,
                        lpips=lpips) if config.train.target == "vae" else None
    zero_stage = engine.zero_optimization_stage()
    generator = torch.Generator().manual_seed(config.train.seed * 100_003 + env.rank)
    step, stream_state, wandb_id = 0, None, None
    # scale_by_std as the original (ddpm.py:1087-1110): estimated only when a run starts from nothing and the
    # scale is still 1; a scale that a checkpoint carries (--reload_from_ckpt, or the config) is used as it is.
    needs_scale = (config.vae.scale_by_std and config.train.target == "ldm"
                   and float(model.vae.scale_factor) == 1.0)

    if point is not None:
        engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_module_strict=True)
        if gan is not None:
            gan.load(point.our_dir)
        client = checkpoint.load_client_state(point)
        step = point.meta["step"]
        model.vae.scale_factor.fill_(client["scale_factor"])
        needs_scale = False
        ema.load_state_dict(client["ema"])
        stream_state = StreamState.from_dict(client["stream"])
        wandb_id = client.get("wandb_id")
        rng = checkpoint.load_rng_state(point, rank=env.rank)
        if rng is not None:
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
        else:  # another world size: a deterministic new stream of randomness per rank
            generator.manual_seed(config.train.seed * 100_003 + env.rank + 7919 * step)
        log.info("resumed from %s at step %d", point.our_dir, step)
        if env.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", after_step=step)
    elif env.is_main:
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1))
    if env.is_main and not (run_dir / checkpoint.FROZEN_PARTS).is_file():
        checkpoint.save_frozen_parts(model, run_dir / checkpoint.FROZEN_PARTS,
                                     trained=TRAINED_PART[config.train.target])

    stream = ShardStream(shards, audio=config.audio, state=stream_state, options=StreamOptions(
        batch_size=config.train.micro_batch_size, rank=env.rank, world_size=env.world_size, seed=config.train.seed,
        encoding=encoding, **loader_options(config.data, device=device)))
    tracker = StreamTracker(stream)
    batches = iter(make_loader(stream))
    logger = MetricsLogger(run_dir, enabled=env.is_main, use_wandb=config.train.logger == "wandb", start_step=step,
                           max_steps=config.train.max_steps, wandb_id=wandb_id, config=to_dict(config))
    validator = None
    if config.data.val:
        from audioldm_dist.engine.validation import Validator

        val_shards = resolve_specs(config.data.val, cache_dir=run_dir)
        validator = Validator(val_shards, config=config, objective=objective, rank=env.rank,
                              world_size=env.world_size, run_dir=run_dir,
                              encoding=_check_encoded_shards(model, config, val_shards))
    model.train()
    failed = False
    try:
        while step < config.train.max_steps:
            guard.set_phase(f"step {step + 1}")
            inject_test_fault(rank=env.rank, step=step + 1)
            started = time.perf_counter()
            learning_rate = float(engine.get_lr()[0])  # what this step's update uses (the scheduler moves after it)
            data_wait = 0.0
            losses, gan_terms = [], []
            for _ in range(config.train.gradient_accumulation_steps):
                fetch = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - fetch
                if needs_scale:
                    _set_scale_from_rank0(model, batch)
                    needs_scale = False
                if gan is not None:  # target=vae: discriminator step, then the VAE's (vae_gan.py)
                    gan_terms.append(gan.micro_step(batch, generator=generator, step=step))
                    loss = gan_terms[-1]["loss"]
                else:
                    loss = objective(batch, generator=generator, network=engine)
                    engine.backward(loss)
                    engine.step()
                tracker.advance(batch)
                losses.append(loss.detach().float())
            step += 1
            _update_ema(ema, engine, zero_stage=zero_stage)
            guard.step_done(time.perf_counter() - started)
            mean_loss = torch.stack(losses).mean()
            if dist.is_initialized():
                dist.all_reduce(mean_loss)
                mean_loss /= env.world_size
            elapsed = time.perf_counter() - started
            samples = config.train.micro_batch_size * config.train.gradient_accumulation_steps * env.world_size
            val_metrics = {}
            if validator is not None and (step % config.train.val_every == 0 or step == config.train.max_steps):
                with guard.phase(f"validation at step {step}"):
                    val_metrics = _validate(validator, model, engine, ema, logger, step=step)  # before saving: exact resume
            if step % config.train.log_every == 0 or val_metrics:
                grad_norm = engine.get_global_grad_norm()
                counters = tracker.counters()
                logger.log(step, {"loss": float(mean_loss), "lr": learning_rate,
                                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                  "step_seconds": elapsed, "samples_per_s": samples / elapsed,
                                  "audio_s_per_s": samples * config.audio.duration / elapsed,
                                  "data_wait": data_wait / elapsed, "epoch": tracker.state.epoch,
                                  "failed_samples": counters["failed"], **val_metrics,
                                  **(mean_metrics(gan_terms, world_size=env.world_size) if gan_terms else {})})
            logger.advance()
            stopping = stop.should_stop()
            if step % config.train.save_every == 0 or step == config.train.max_steps or stopping:
                with guard.phase(f"checkpoint at step {step}"):
                    _save(engine, model, ema, tracker, generator, run_dir=run_dir, step=step, env=env,
                          zero_stage=zero_stage, config=config, wandb_id=logger.wandb_id, gan=gan)
            if stopping and step < config.train.max_steps:
                stop.stopped_early = True
                log.warning("rank %d: stopped by signal after saving step %d", env.rank, step)
                return 0
    except BaseException:
        failed = True  # the guard ends this rank and wandb's process with it: no wandb.finish() that may hang
        raise
    finally:
        if not failed:
            logger.close()
    log.info("training finished at step %d", step)
    return 0


def _check_encoded_shards(model, config: Config, shards) -> dict | None:
    """Encoded shards (encode-shards): the model's encoding fingerprints, after checking that the shards were
    encoded with this VAE, conditioner and audio config (else EncodingMismatchError naming both); audio
    shards: None."""
    found = detect_encoding(shards)
    if found is None:
        return None
    if config.train.target != "ldm":
        raise ValueError(f"{shards[0].url}: encoded shards hold VAE posteriors, not log-mels; train.target="
                         f"{config.train.target} needs audio shards (make-shards output)")
    expected = model_encoding(model, config)
    check_encoding(found, expected, where=shards[0].url)
    log.info("encoded shards (fingerprint %s): no audio decode, STFT, VAE encoder or conditioner forward in "
             "training", expected["fingerprint"])
    return expected


def _update_ema(ema: EMA, engine, *, zero_stage: int) -> None:
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them for the update."""
    if zero_stage < 3:
        ema.update(engine.module)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        ema.update(engine.module)


def _validate(validator, model, engine, ema: EMA, logger: MetricsLogger, *, step: int) -> dict:
    started = time.perf_counter()
    val_loss = validator.loss(engine)
    paths = validator.write_samples(model, ema, step=step)
    logger.log_samples(step, paths, captions=[prompt.caption for prompt in validator.prompts],
                       sample_rate=model.config.audio.sampling_rate)
    log.info("step %d: val_loss %.5f, %d samples in %s", step, val_loss, len(paths),
             paths[0].parent if paths else "-")
    return {"val_loss": val_loss, "val_seconds": time.perf_counter() - started}


def _set_scale_from_rank0(model, batch: dict) -> None:
    scale = torch.tensor([model.latent_scale_from(batch)], device=collective_device())
    if dist.is_initialized():
        dist.broadcast(scale, src=0)  # every rank uses rank 0's first batch, as one process would
    model.vae.scale_factor.fill_(float(scale))
    log.info("scale_by_std: latent scale factor %.5f from the first batch", float(scale))


def _save(engine, model, ema, tracker, generator, *, run_dir: Path, step: int, env: DistEnv, zero_stage: int,
          config: Config, wandb_id: str | None, gan: VAEGAN | None) -> None:
    client = {"step": step, "scale_factor": float(model.vae.scale_factor), "stream": tracker.state.to_dict(),
              "ema": ema.state_dict(), "config": to_dict(config), "wandb_id": wandb_id}
    checkpoint.save(engine, run_dir=run_dir, step=step, client_state=client, rng_state=rng_state(generator),
                    rank=env.rank, world_size=env.world_size, zero_stage=zero_stage, keep_last=config.train.keep_last,
                    stop_on_low_disk=config.train.stop_on_low_disk, save_extra=gan.save if gan is not None else None)


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drops records a killed run logged after the checkpoint it resumes from, so the curve has no repeats."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))
