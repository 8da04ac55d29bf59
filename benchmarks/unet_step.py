"""AudioLDM-S UNet training step: `math` vs `sdpa` attention (and xformers on CUDA), with peak memory.

    python benchmarks/unet_step.py [--steps 3] [--device cpu|cuda] [--dtype float32|bfloat16]

One step = forward + backward + AdamW on batch 1 of an 8 × 256 × 16 latent with a 512-d FiLM
condition (the S-size model: 185M parameters). Rows are measured side by side in one run; each is
the median of `--steps` timed steps after one warm-up step. Each row runs in its own fresh process,
one after the other, so peak memory is comparable: CUDA's max allocated, or on the CPU the process's
peak RSS (model, AdamW state, activations and the Python/torch runtime). Reference: the original code takes about 5.0 s per such step on a 2-core CPU.
Prints a markdown table, then one line of JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from audioldm_dist.config import UNetConfig
from audioldm_dist.models.unet import UNetModel

ORIGINAL_SECONDS_PER_STEP = 5.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(unet: UNetModel, backend: str, *, steps: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    unet.set_attention_backend(backend)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(1, 8, 256, 16, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    film = torch.randn(1, 512, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        unet(x, t, film=film).float().pow(2).mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return statistics.median(times), peak


def run_row(backend: str, args: argparse.Namespace) -> None:
    """One backend in this process; prints its JSON line for the parent."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).to(device=device, dtype=dtype).train()
    seconds, peak = measure(unet, backend, steps=args.steps, device=device, dtype=dtype)
    print(json.dumps({"backend": backend, "seconds": seconds, "peak_mb": peak}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one backend in this process
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.only:
        run_row(args.only, args)
        return
    device = torch.device(args.device)
    import importlib.util

    has_xformers = importlib.util.find_spec("xformers") is not None  # the optional extra
    backends = ["math", "sdpa"] + (["xformers"] if device.type == "cuda" and has_xformers else [])
    results = {}
    for backend in backends:
        output = subprocess.run([sys.executable, __file__, "--only", backend, "--steps", str(args.steps),
                                 "--device", args.device, "--dtype", args.dtype],
                                capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        results[backend] = (row["seconds"], row["peak_mb"])
    print(f"AudioLDM-S UNet (185M), batch 1, latent 8x256x16, {args.dtype}, {device.type}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps, one process per row\n")
    print("| attention | s/step | vs original (5.0 s) | peak memory MB |")
    print("|---|---|---|---|")
    for backend, (seconds, peak) in results.items():
        print(f"| {backend} | {seconds:.2f} | {seconds / ORIGINAL_SECONDS_PER_STEP:.2f}x | {peak:.0f} |")
    sdpa_over_math = results["sdpa"][0] / results["math"][0]
    print(f"\nsdpa / math step time: {sdpa_over_math:.2f} (measured in the same run); "
          f"sdpa / original 5.0 s: {results['sdpa'][0] / ORIGINAL_SECONDS_PER_STEP:.2f} (goal <= 0.8)")
    print(json.dumps({"device": device.type, "dtype": args.dtype,
                      **{f"s_per_step_{b}": round(s, 3) for b, (s, _) in results.items()},
                      **{f"peak_mb_{b}": round(m) for b, (_, m) in results.items()},
                      "sdpa_vs_math": round(sdpa_over_math, 3)}))


if __name__ == "__main__":
    main()
