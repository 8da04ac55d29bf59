"""One check of a CUDA machine: attention kernels, the S-UNet's ZeRO-2 bf16 step and its MFU, the M model
under a 15 GiB cap, an fp16 loss-scaled step, and encoded vs on-the-fly data. Run it through the wrapper:

    bash benchmarks/gpu_check.sh               # a CUDA machine; ≤ 8 minutes on an H100/H200
    bash benchmarks/gpu_check.sh --cpu-smoke   # every part at toy sizes on the CPU (what the test runs)

Each part runs in its own process (`--part NAME`) under its own timeout, and the parts share one
overall budget (`Sizes.budget_s`), so a crash, an out-of-memory or a hang prints its error in that
part's rows while the others still run; the M part's memory cap holds for its process only. A part that
cannot run here says why in its status cell: "needs CUDA", "not installed", "encode-shards not available".

- attention: xformers, SDPA and math kernels of `models/attention.py`, forward + backward in bf16 on
  (B, H, N, D) tensors the size of the S-UNet's largest attention (1024 latent positions, 8 heads of 32),
  unmasked self-attention and masked cross-attention (a (B, Nk) key padding mask, as FLAN-T5's tokens).
  The reference is the math kernel in float32 on the same bf16 inputs. bf16 rounding alone puts the bf16
  math kernel ~1e-2 away from it, so, as PyTorch's SDPA tests derive their tolerances, a kernel agrees
  when the max error of its output and of each input gradient is within max(1e-3, 2 × the bf16 math
  kernel's error on that tensor). Speed: mean of timed forward + backward calls after two warm-up calls.
- S ZeRO-2 bf16: a real DeepSpeed engine through `engine/ds_config.py` (configs/ds/zero2_bf16.json
  reconciled with configs/audioldm_s.yaml, one rank) training the UNet on synthetic latents and FiLM
  conditions with the package's diffusion loss. FLOPs of one forward + backward are counted with
  `torch.utils.flop_counter.FlopCounterMode` (math attention, whose einsums it sees); MFU = counted
  FLOPs × steps/s ÷ the card's dense bf16 peak (`PEAK_BF16_TFLOPS`; unknown cards: MFU unknown).
- M offload: configs/audioldm_m.yaml at micro-batch 2 with `unet.gradient_checkpointing`, ZeRO-2 with
  AdamW offloaded to the CPU (configs/ds/zero2_offload.json, bf16 on) under
  `torch.cuda.set_per_process_memory_fraction` = 15 GiB; an out-of-memory is the answer "does not fit".
- fp16: the S-UNet under configs/ds/zero2_fp16.json (dynamic loss scale from 2¹⁶): the last loss, whether
  it is finite, the loss scale after the steps and how many steps overflowed (skipped).
- encoded vs on-the-fly: when `encode-shards` is on PATH (or `shards.encode` imports), demo shards are
  encoded and train.py runs a few steps on each; samples/s from its metrics.jsonl.
Prints a markdown table, then one line of JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path (benchmarks/shards.py would hide the package) and an
# editable install elsewhere could win over this tree: the repository root goes first.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (Path(__file__).parent, ROOT)]

GIB = 2**30
MEMORY_CAP_GIB = 15.0
TITLES = {  # part → the check its row names (several rows for attention: one per kernel and case)
    "attention": "attention kernels",
    "s_zero2_bf16": "S-UNet ZeRO-2 bf16 step",
    "m_offload": f"M ZeRO-2 + CPU offload + checkpointing, {MEMORY_CAP_GIB:g} GiB cap",
    "fp16": "S-UNet fp16 step, dynamic loss scale",
    "encoded": "train.py step, encoded vs on-the-fly shards",
}


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """What one mode runs: model configs, batch sizes, step counts and each part's time limit."""

    attention_shape: tuple[int, int, int, int]  # (B, H, N, D)
    num_keys: int  # cross-attention keys (text tokens)
    attention_iters: int
    s_config: str
    s_micro_batch: int
    m_config: str
    m_micro_batch: int
    warmup_steps: int
    timed_steps: int
    encoded_clips: int
    timeouts: dict[str, float]
    """Each part's limit in seconds, its process start-up included."""
    budget_s: float
    """All parts together. On the GPU 450 s: with the wrapper's few seconds the whole stays under 8 minutes."""


GPU = Sizes(attention_shape=(8, 8, 1024, 32), num_keys=128, attention_iters=20, s_config="configs/audioldm_s.yaml",
            s_micro_batch=8, m_config="configs/audioldm_m.yaml", m_micro_batch=2, warmup_steps=3, timed_steps=10,
            encoded_clips=48,
            timeouts={"attention": 45, "s_zero2_bf16": 150, "m_offload": 150, "fp16": 60, "encoded": 100},
            budget_s=450)  # S and M include DeepSpeed's first build of fused_adam / cpu_adam where not prebuilt
CPU_SMOKE = Sizes(attention_shape=(2, 2, 64, 16), num_keys=16, attention_iters=2, s_config="configs/tiny.yaml",
                  s_micro_batch=2, m_config="configs/tiny.yaml", m_micro_batch=2, warmup_steps=1, timed_steps=1,
                  encoded_clips=12,
                  timeouts={"attention": 60, "s_zero2_bf16": 240, "m_offload": 240, "fp16": 240, "encoded": 300},
                  budget_s=900)  # the CPU is slow and DeepSpeed's shared op-build lock may be held by others

PEAK_BF16_TFLOPS = (  # dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets; first match wins
    (("H100", "PCIE"), 756.0), (("H100", "NVL"), 835.0), (("H100",), 989.0), (("H200",), 989.0),
    (("H800",), 989.0), (("GH200",), 989.0), (("B200",), 2250.0), (("A100",), 312.0), (("A800",), 312.0),
    (("L40S",), 362.0), (("L4",), 121.0), (("A10G",), 70.0), (("A10",), 125.0), (("A6000",), 155.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from its `torch.cuda.get_device_name`, or None when not in the table."""
    words = device_name.upper().replace("-", " ").split()  # "NVIDIA A100-SXM4-80GB" → [..., "A100", "SXM4", ...]
    for keys, tflops in PEAK_BF16_TFLOPS:
        if all(key in words for key in keys):
            return tflops * 1e12
    return None


def row(check: str, status: str, *, speed: str = "", memory: str = "", detail: str = "", **metrics) -> dict:
    return {"check": check, "status": status, "speed": speed, "memory": memory, "detail": detail, "metrics": metrics}


def format_memory(num_bytes: float | None, *, what: str) -> str:
    return "" if num_bytes is None else f"{what} {num_bytes / GIB:.2f} GiB"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_rank_environment(port: int) -> dict[str, str]:
    """One rank on this machine, as the deepspeed launcher would describe it."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


# ---------------------------------------------------------------- attention kernels

ATTENTION_ATOL = 1e-3
ATTENTION_FUDGE = 2.0
"""A bf16 kernel agrees when each of its errors is within max(1e-3, 2 × the bf16 math kernel's own error)."""


def kernel_unavailable(backend: str, device) -> str | None:
    """Why `backend` cannot run on `device` ("not installed", "needs CUDA", "not importable: …"), else None."""
    if backend != "xformers":
        return None
    if importlib.util.find_spec("xformers") is None:
        return "not installed"
    if device.type != "cuda":
        return "needs CUDA"
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # a wheel built for another torch fails here, not at find_spec
        return f"not importable: {type(error).__name__}: {error}"
    return None


def attention_inputs(sizes: Sizes, *, masked: bool, device) -> dict:
    """bf16 q (B, H, N, D), k/v (B, H, Nk, D), an upstream gradient, and for `masked` a (B, Nk) keep-mask
    whose rows keep from a quarter to all of the keys (padded text tokens)."""
    import torch

    batch, heads, tokens, dim = sizes.attention_shape
    num_keys = sizes.num_keys if masked else tokens
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device=device, dtype=torch.bfloat16)

    mask = None
    if masked:
        lengths = torch.randint(num_keys // 4, num_keys + 1, (batch,), generator=generator)
        mask = (torch.arange(num_keys)[None, :] < lengths[:, None]).to(device)
    return {"q": randn(batch, heads, tokens, dim), "k": randn(batch, heads, num_keys, dim),
            "v": randn(batch, heads, num_keys, dim), "grad": randn(batch, heads, tokens, dim), "mask": mask}


def attention_forward_backward(backend: str, inputs: dict, *, dtype) -> list:
    """[output, dq, dk, dv] of one forward + backward of `backend` in `dtype`."""
    from audioldm_dist.models.attention import scaled_dot_product

    q, k, v = (inputs[name].to(dtype).detach().requires_grad_() for name in ("q", "k", "v"))
    out = scaled_dot_product(q, k, v, backend=backend, mask=inputs["mask"])
    out.backward(inputs["grad"].to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def time_call(fn, *, iters: int, device) -> float:
    """Mean seconds per call of `fn` after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters


def max_errors(results: list, reference: list) -> list[float]:
    """Max |result − reference| of the output and each input gradient."""
    return [float((result.float() - expected).abs().max()) for result, expected in zip(results, reference)]


def attention_case_rows(case: str, inputs: dict, sizes: Sizes, device) -> list[dict]:
    import torch

    from audioldm_dist.models.attention import BACKENDS

    reference = attention_forward_backward("math", inputs, dtype=torch.float32)
    math_errors = max_errors(attention_forward_backward("math", inputs, dtype=torch.bfloat16), reference)
    tolerances = [max(ATTENTION_ATOL, ATTENTION_FUDGE * error) for error in math_errors]
    rows, seconds = [], {}
    for backend in BACKENDS:
        check = f"attention {backend}, {case}"
        reason = kernel_unavailable(backend, device)
        if reason:
            rows.append(row(check, reason))
            continue
        errors = max_errors(attention_forward_backward(backend, inputs, dtype=torch.bfloat16), reference)
        agrees = all(error <= tolerance for error, tolerance in zip(errors, tolerances))
        seconds[backend] = time_call(lambda: attention_forward_backward(backend, inputs, dtype=torch.bfloat16),
                                     iters=sizes.attention_iters, device=device)
        status = "reference" if backend == "math" else "agrees" if agrees else "DISAGREES"
        rows.append(row(check, status, speed=f"{seconds[backend] * 1e3:.3f} ms fwd+bwd",
                        detail="max abs error vs float32 math (out, dq, dk, dv): "
                               + ", ".join(f"{e:.1e}" for e in errors)
                               + "; tolerance " + ", ".join(f"{t:.1e}" for t in tolerances),
                        backend=backend, case=case, agrees=agrees, ms=round(seconds[backend] * 1e3, 4),
                        max_abs_errors=[float(f"{e:.3g}") for e in errors],
                        tolerances=[float(f"{t:.3g}") for t in tolerances]))
    for entry in rows:
        backend = entry["metrics"].get("backend")
        if backend and "sdpa" in seconds:
            entry["speed"] += f" ({seconds['sdpa'] / seconds[backend]:.2f}x sdpa's speed)"
    return rows


def attention_rows(sizes: Sizes, device) -> list[dict]:
    batch, heads, tokens, dim = sizes.attention_shape
    rows = []
    for case, masked in ((f"self {tokens}x{tokens}, unmasked", False),
                         (f"cross {tokens}x{sizes.num_keys}, key mask", True)):
        inputs = attention_inputs(sizes, masked=masked, device=device)
        rows += attention_case_rows(f"{case}, B{batch} H{heads} D{dim}", inputs, sizes, device)
    return rows


# ---------------------------------------------------------------- DeepSpeed training steps

@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """One engine to build: a model config, a shipped DeepSpeed JSON and what this check changes in them."""

    config: str
    ds_config: str
    micro_batch: int
    overrides: tuple[str, ...] = ()
    ds_changes: dict = field(default_factory=dict)
    memory_cap_gib: float | None = None
    count_flops: bool = False


def synthetic_batch(unet_config, *, shape: tuple[int, ...], device, dtype) -> dict:
    """Latents x0 (B, C, T, F) and the UNet's conditioning: FiLM (B, film_dim) and/or contexts (B, 32, dim)
    whose key masks keep the first half of the tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = shape[0]

    def randn(*size):
        return torch.randn(size, generator=generator).to(device=device, dtype=dtype)

    condition = {"film": randn(batch, unet_config.film_dim) if unet_config.film_dim else None,
                 "contexts": [randn(batch, 32, dim) for dim in unet_config.context_dims],
                 "context_masks": [(torch.arange(32) < 16).expand(batch, 32).to(device)
                                   for _ in unet_config.context_dims]}
    return {"x0": randn(*shape), "condition": condition}


def step_loss(network, batch: dict, *, schedule, generator):
    """The package's diffusion loss (random t and noise) of `network` on the synthetic batch."""
    from audioldm_dist.diffusion.objective import diffusion_loss

    return diffusion_loss(lambda x_t, t: network(x_t, t, **batch["condition"]), batch["x0"], schedule=schedule,
                          generator=generator)


def count_step_flops(unet, batch: dict, *, schedule) -> int:
    """FLOPs of one forward + backward, counted by FlopCounterMode. Math attention for the count: its einsums
    are ops the counter knows on every device (the fused kernels do the same arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backend = unet.attention_backend
    unet.set_attention_backend("math")
    with FlopCounterMode(display=False) as counter:
        step_loss(unet, batch, schedule=schedule, generator=torch.Generator().manual_seed(0)).backward()
    unet.zero_grad(set_to_none=True)
    unet.set_attention_backend(backend)
    return counter.get_total_flops()


def timed_engine_steps(engine, batch: dict, *, schedule, sizes: Sizes, device) -> tuple[float, list[float]]:
    """Seconds per step over the timed steps (after `sizes.warmup_steps`), and every step's loss."""
    import torch

    generator = torch.Generator().manual_seed(0)
    losses, started = [], time.perf_counter()
    for step in range(sizes.warmup_steps + sizes.timed_steps):
        if step == sizes.warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = step_loss(engine, batch, schedule=schedule, generator=generator)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / sizes.timed_steps, [float(loss) for loss in losses]


def peak_memory_bytes(device) -> tuple[float, str]:
    """CUDA's max allocated since the last reset, or on the CPU the process's peak RSS."""
    import resource

    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated()), "peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "peak RSS"


def cap_memory(gib: float, device) -> str:
    """Caps this process's CUDA allocations at `gib`; what was done, for the row."""
    import torch

    if device.type != "cuda":
        return f"no {gib:g} GiB cap (the cap needs CUDA)"
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    return f"capped at {gib:g} GiB of {total / GIB:.0f} GiB"


def measure_training(spec: TrainSpec, sizes: Sizes, device) -> dict:
    """Builds the UNet and its engine as the trainer does (load_config → load_ds_config → initialize_engine) and
    times `sizes.timed_steps` steps. Raises torch.cuda.OutOfMemoryError when it does not fit."""
    import torch

    from audioldm_dist.config import load_config
    from audioldm_dist.diffusion.schedule import NoiseSchedule
    from audioldm_dist.engine.ds_config import initialize_engine, load_ds_config, training_dtype
    from audioldm_dist.ldm import latent_shape
    from audioldm_dist.models.unet import UNetModel

    config = load_config(ROOT / spec.config, [f"train.micro_batch_size={spec.micro_batch}", *spec.overrides])
    ds = {**load_ds_config(ROOT / spec.ds_config, config.train, world_size=1), **spec.ds_changes}
    dtype = training_dtype(ds)
    cap = cap_memory(spec.memory_cap_gib, device) if spec.memory_cap_gib else ""
    torch.manual_seed(0)
    unet = UNetModel(config.unet).to(device=device, dtype=dtype).train()
    batch = synthetic_batch(config.unet, shape=(spec.micro_batch, *latent_shape(config)), device=device, dtype=dtype)
    schedule = NoiseSchedule(config.diffusion)
    flops = count_step_flops(unet, batch, schedule=schedule) if spec.count_flops else None
    backend = unet.select_attention_backend(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = initialize_engine(unet, ds, fresh=True)
    seconds, losses = timed_engine_steps(engine, batch, schedule=schedule, sizes=sizes, device=device)
    peak, peak_kind = peak_memory_bytes(device)
    return {"samples_per_s": spec.micro_batch / seconds, "seconds_per_step": seconds, "flops_per_step": flops,
            "peak_bytes": peak, "peak_kind": peak_kind, "losses": losses, "attention": backend, "cap": cap,
            "num_params": sum(p.numel() for p in unet.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "loss_scale": getattr(engine.optimizer, "loss_scale", None),
            "skipped_steps": getattr(engine, "skipped_steps", None)}


def mfu_text(result: dict, device) -> tuple[str, float | None]:
    """("MFU 41.2%", 0.412), or why it is unknown."""
    import torch

    if device.type != "cuda":
        return "MFU n/a on the CPU", None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    if peak is None:
        return f"MFU unknown ({name} not in the peak table)", None
    mfu = result["flops_per_step"] / result["seconds_per_step"] / peak
    return f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOPS", mfu


def training_detail(result: dict, spec: TrainSpec) -> str:
    return (f"{spec.config}, micro-batch {spec.micro_batch}, {result['num_params'] / 1e6:.0f}M params, "
            f"{result['dtype']}, attention {result['attention']}, {spec.ds_config}")


def s_zero2_bf16_rows(sizes: Sizes, device) -> list[dict]:
    spec = TrainSpec(config=sizes.s_config, ds_config="configs/ds/zero2_bf16.json", micro_batch=sizes.s_micro_batch,
                     count_flops=True)
    result = measure_training(spec, sizes, device)
    mfu, value = mfu_text(result, device)
    finite = all(map(_finite, result["losses"]))
    return [row(TITLES["s_zero2_bf16"], "ok" if finite else "loss not finite",
                speed=f"{result['samples_per_s']:.2f} samples/s, {mfu}",
                memory=format_memory(result["peak_bytes"], what=result["peak_kind"]),
                detail=f"{result['flops_per_step'] / 1e12:.3f} TFLOP per forward+backward (FlopCounterMode); "
                       + training_detail(result, spec),
                samples_per_s=round(result["samples_per_s"], 3), mfu=None if value is None else round(value, 4),
                flops_per_step=result["flops_per_step"], peak_gib=round(result["peak_bytes"] / GIB, 3),
                peak_kind=result["peak_kind"], micro_batch=spec.micro_batch)]


def m_offload_rows(sizes: Sizes, device) -> list[dict]:
    import torch

    spec = TrainSpec(config=sizes.m_config, ds_config="configs/ds/zero2_offload.json",
                     micro_batch=sizes.m_micro_batch, overrides=("unet.gradient_checkpointing=true",),
                     ds_changes={"bf16": {"enabled": True}}, memory_cap_gib=MEMORY_CAP_GIB)
    check = TITLES["m_offload"]
    try:
        result = measure_training(spec, sizes, device)
    except torch.cuda.OutOfMemoryError as error:
        peak, kind = peak_memory_bytes(device)
        return [row(check, "does not fit", memory=format_memory(peak, what=kind),
                    detail=f"out of memory: {str(error).splitlines()[0]}", fits=False)]
    return [row(check, "fits", speed=f"{result['samples_per_s']:.2f} samples/s",
                memory=format_memory(result["peak_bytes"], what=result["peak_kind"]),
                detail=f"{result['cap']}; " + training_detail(result, spec), fits=True,
                samples_per_s=round(result["samples_per_s"], 3), peak_gib=round(result["peak_bytes"] / GIB, 3),
                peak_kind=result["peak_kind"], micro_batch=spec.micro_batch)]


def fp16_rows(sizes: Sizes, device) -> list[dict]:
    spec = TrainSpec(config=sizes.s_config, ds_config="configs/ds/zero2_fp16.json", micro_batch=sizes.s_micro_batch)
    result = measure_training(spec, sizes, device)
    loss, steps = result["losses"][-1], len(result["losses"])
    finite = _finite(loss)
    return [row(TITLES["fp16"], "ok" if finite else "loss not finite",
                speed=f"{result['samples_per_s']:.2f} samples/s",
                memory=format_memory(result["peak_bytes"], what=result["peak_kind"]),
                detail=f"last loss {loss:.4f}, loss scale {result['loss_scale']} after {steps} steps "
                       f"({result['skipped_steps']} skipped on overflow); " + training_detail(result, spec),
                loss=loss, loss_finite=finite, loss_scale=result["loss_scale"], skipped_steps=result["skipped_steps"],
                samples_per_s=round(result["samples_per_s"], 3))]


def _finite(value: float) -> bool:
    import math

    return math.isfinite(value)


# ---------------------------------------------------------------- encoded vs on-the-fly data

def encode_shards_command() -> list[str] | None:
    """The `encode-shards` CLI: on PATH, beside this Python, or `python -m shards.encode_cli`."""
    import shutil

    found = shutil.which("encode-shards") or shutil.which("encode-shards", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    if importlib.util.find_spec("shards.encode_cli") is not None:
        return [sys.executable, "-m", "shards.encode_cli"]
    return None


def run_quietly(command: list[str], *, what: str, env: dict | None = None) -> None:
    """Runs `command`; on failure a RuntimeError with its last output lines."""
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} exited with {done.returncode}: {tail}")


def train_samples_per_s(config: str, data: Path, run_dir: Path, *, device, steps: int) -> float:
    """train.py on one rank for `steps` steps; the median samples/s of its metrics.jsonl after two warm-up steps."""
    import statistics

    ds_config = "configs/ds/zero2_bf16.json" if device.type == "cuda" else "configs/ds/zero2.json"
    env = {**os.environ, **single_rank_environment(free_port()), "PYTHONPATH": str(ROOT)}
    run_quietly([sys.executable, str(ROOT / "train.py"), "--config", config, "--deepspeed_config", ds_config,
                 "--run-dir", str(run_dir), "--train-data", str(data), "--max-steps", str(steps)],
                what=f"train.py on {data.name}", env=env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rates = [record["samples_per_s"] for record in records if "samples_per_s" in record]
    return statistics.median(rates[2:] or rates)


def encoded_rows(sizes: Sizes, device) -> list[dict]:
    import tempfile

    from audioldm_dist.demo_data import write_demo_dataset
    from shards.make import make_shards
    from shards.plan import ShardOptions

    command = encode_shards_command()
    config = "configs/demo.yaml" if device.type == "cuda" else "configs/tiny.yaml"
    steps = sizes.warmup_steps + sizes.timed_steps + 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_encoded_") as tmp:
        root = write_demo_dataset(Path(tmp, "demo"), num_clips=sizes.encoded_clips, seed=0)
        audio, encoded = Path(tmp, "audio_shards"), Path(tmp, "encoded_shards")
        make_shards(metadata_root=root, dataset="demo", split="train", out_dir=audio,
                    options=ShardOptions(max_count=8), workers=1, show_progress=False)
        run_quietly([*command, "--config", config, "--out", str(encoded), "--workers", "2", str(audio)],
                    what="encode-shards")
        on_the_fly = train_samples_per_s(config, audio, Path(tmp, "run_audio"), device=device, steps=steps)
        from_latents = train_samples_per_s(config, encoded, Path(tmp, "run_encoded"), device=device, steps=steps)
    return [row(TITLES["encoded"], "ok",
                speed=f"{from_latents:.2f} vs {on_the_fly:.2f} samples/s ({from_latents / on_the_fly:.2f}x)",
                detail=f"{config}, demo data, median of {steps - 2} steps each, {' '.join(Path(c).name for c in command)}",
                encoded_samples_per_s=round(from_latents, 3), on_the_fly_samples_per_s=round(on_the_fly, 3))]


# ---------------------------------------------------------------- the parts, each in its own process

PARTS = {"attention": attention_rows, "s_zero2_bf16": s_zero2_bf16_rows, "m_offload": m_offload_rows,
         "fp16": fp16_rows, "encoded": encoded_rows}
"""Part name → its function of (sizes, device) → rows, in the table's order."""
ENGINE_PARTS = ("s_zero2_bf16", "m_offload", "fp16")
"""Parts that build a DeepSpeed engine in their own process (one rank: the process group is theirs)."""
NEEDS_DEEPSPEED = (*ENGINE_PARTS, "encoded")


def part_blocker(name: str, *, cuda: bool) -> str | None:
    """Why part `name` cannot run in this environment (its status cell), or None."""
    if name in NEEDS_DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        return "not installed: deepspeed"
    if name == "fp16" and not cuda:
        return "needs CUDA"  # DeepSpeed's CPU accelerator refuses fp16
    if name == "encoded" and encode_shards_command() is None:
        return "encode-shards not available"
    return None


def run_part_here(name: str, sizes: Sizes) -> None:
    """Child mode: one part in this process; its rows as the last line of stdout."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and sizes is GPU else "cpu")
    if name not in ENGINE_PARTS:
        rows = PARTS[name](sizes, device)
    else:
        from audioldm_dist.engine.distributed import DistEnv, destroy_process_group, init_process_group

        os.environ.update(single_rank_environment(free_port()))
        init_process_group(DistEnv.from_environ(), timeout_s=300)
        try:
            rows = PARTS[name](sizes, device)
        finally:
            destroy_process_group(barrier=False)  # one rank: nobody to wait for
    print(json.dumps({"rows": rows}))


def error_line(stderr: str) -> str:
    """The exception line of a traceback (else the last line), short enough for a table cell."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ("Error" in line or "Exception" in line) and not line.startswith("File ")]
    text = (errors or lines or ["no output"])[-1]
    return text[:300]


def end_process_group(child: subprocess.Popen) -> None:
    """Kills the part and everything it started (op builds, loader workers, train.py), then reaps it."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.communicate()


def run_part_process(name: str, *, sizes: Sizes, smoke: bool, timeout: float, log_dir: Path) -> list[dict]:
    """Part `name` in a child process with its own session (killed whole on timeout); its log in `log_dir`."""
    title = TITLES[name]
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name] + (["--cpu-smoke"] if smoke else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                 start_new_session=True)
        try:
            stdout, _ = child.communicate(timeout=timeout)
        except BaseException as error:  # the timeout, or Ctrl-C: the child's own session would not see the latter
            end_process_group(child)
            if not isinstance(error, subprocess.TimeoutExpired):
                raise
            return [row(title, f"timeout after {timeout:.0f} s", detail=f"log: {log_path}")]
    log_path.with_suffix(".stdout").write_text(stdout)  # DeepSpeed's own messages, kept apart from the errors
    if child.returncode == 0:
        for line in reversed(stdout.strip().splitlines()):  # DeepSpeed prints too: the rows are the last JSON line
            if line.startswith('{"rows": '):
                rows = json.loads(line)["rows"]
                rows[0]["metrics"]["part_seconds"] = round(time.monotonic() - started, 1)
                return rows
    return [row(title, "error", detail=f"{error_line(log_path.read_text())} (exit {child.returncode}; log: {log_path})")]


# ---------------------------------------------------------------- the report

def environment_summary(*, cuda: bool) -> dict:
    """Device, versions, and the optional packages this environment lacks."""
    import torch

    versions, missing = {"python": sys.version.split()[0], "torch": torch.__version__}, []
    for package in ("deepspeed", "xformers"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # ImportError, or a wheel built for another torch
            missing.append(package if isinstance(error, ImportError) else f"{package} ({type(error).__name__})")
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    if cuda:
        versions["cuda"] = torch.version.cuda
    if encode_shards_command() is None:
        missing.append("encode-shards")
    return {"device": device, "executable": sys.executable, "versions": versions, "missing": missing}


def cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def print_report(rows: list[dict], summary: dict, *, smoke: bool, seconds: float) -> None:
    mode = "CPU smoke (toy sizes)" if smoke else "CUDA"
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    print(f"GPU check, {mode}: {summary['device']}; {versions}; missing: {', '.join(summary['missing']) or 'nothing'}; "
          f"{seconds:.0f} s\n")
    print("| check | status | speed | memory | detail |")
    print("|---|---|---|---|---|")
    for entry in rows:
        print("| " + " | ".join(cell(entry[key]) for key in ("check", "status", "speed", "memory", "detail")) + " |")
    print(json.dumps({"mode": "cpu-smoke" if smoke else "cuda", **summary, "seconds": round(seconds, 1),
                      "rows": [{"check": e["check"], "status": e["status"], **e["metrics"]} for e in rows]}))


def run_all(*, sizes: Sizes, smoke: bool, cuda: bool, log_dir: Path) -> list[dict]:
    """Every part in turn, each under its own timeout and all within `sizes.budget_s`."""
    deadline = time.monotonic() + sizes.budget_s
    rows = []
    for name in PARTS:
        title = TITLES[name]
        blocker = part_blocker(name, cuda=cuda and not smoke)
        remaining = deadline - time.monotonic()
        if blocker:
            rows.append(row(title, blocker))
        elif remaining < 15:
            rows.append(row(title, f"skipped: the {sizes.budget_s:.0f} s budget is spent"))
        else:
            rows += run_part_process(name, sizes=sizes, smoke=smoke, timeout=min(sizes.timeouts[name], remaining),
                                     log_dir=log_dir)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU (tests)")
    parser.add_argument("--log-dir", type=Path, help="each part's log (default: a new temporary folder)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # child mode: one part
    return parser


def main() -> int:
    args = build_parser().parse_args()
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    if args.part:
        run_part_here(args.part, sizes)
        return 0
    import tempfile

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu_check: error: no CUDA device visible to torch (torch.cuda.is_available() is False); this check "
              "needs one. --cpu-smoke runs every part at toy sizes on the CPU.", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = run_all(sizes=sizes, smoke=args.cpu_smoke, cuda=cuda, log_dir=log_dir)
    print_report(rows, environment_summary(cuda=cuda), smoke=args.cpu_smoke, seconds=time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
