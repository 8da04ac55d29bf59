"""DeepSpeed training step of the AudioLDM-S UNet on 2 CPU ranks: ZeRO-0 (DDP-equivalent), 1, 2, 3.

    python benchmarks/train_step.py [--steps 3] [--ranks 2] [--micro-batch 1]

For each stage, one `deepspeed --num_gpus RANKS` launch of this file in worker mode builds the S-size
UNet (185M parameters), runs one warm-up and `--steps` timed steps (forward + backward + AdamW step
on an 8 × 256 × 16 latent with a 512-d FiLM condition), and reports per rank: samples/s, the bytes
of optimizer state it holds (AdamW moments and fp32 master copies) and its peak RSS. Stages run one
after the other in the same invocation. Prints a markdown table, then one line of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(engine) -> int:
    """AdamW moments plus the fp32 partitions ZeRO keeps (what ZeRO shards across ranks)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    total = _tensor_bytes(list(base.state.values()))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        total += _tensor_bytes(getattr(optimizer, name, []))
    return total


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from audioldm_dist.config import UNetConfig
    from audioldm_dist.models.unet import UNetModel

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig())
    unet.set_attention_backend("sdpa")
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": args.stage},
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=unet, model_parameters=unet.parameters(), config=config)
    x = torch.randn(args.micro_batch, 8, 256, 16)
    t = torch.full((args.micro_batch,), 500)
    film = torch.randn(args.micro_batch, 512)
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        loss = engine(x, t, film=film).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if step:
            times.append(time.perf_counter() - started)
    result = {"rank": rank, "stage": args.stage, "seconds_per_step": sorted(times)[len(times) // 2],
              "optimizer_state_mb": optimizer_state_bytes(engine) / 2**20,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.result_dir, f"stage{args.stage}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.stage is not None:
        worker(args)
        return
    deepspeed_bin = str(Path(sys.executable).parent / "deepspeed")
    rows = {}
    with tempfile.TemporaryDirectory() as result_dir:
        for port, stage in enumerate((0, 1, 2, 3), start=29810):
            subprocess.run([deepspeed_bin, "--num_gpus", str(args.ranks), "--master_port", str(port), __file__,
                            "--stage", str(stage), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                            "--result-dir", result_dir], cwd=ROOT, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))})
            per_rank = [json.loads(Path(result_dir, f"stage{stage}_rank{r}.json").read_text()) for r in range(args.ranks)]
            seconds = max(r["seconds_per_step"] for r in per_rank)
            rows[stage] = {"samples_per_s": args.micro_batch * args.ranks / seconds,
                           "optimizer_state_mb": max(r["optimizer_state_mb"] for r in per_rank),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank)}
    base = rows[0]
    print(f"AudioLDM-S UNet (185M), {args.ranks} CPU ranks (gloo), micro-batch {args.micro_batch}, fp32, "
          f"median of {args.steps} steps\n")
    print("| ZeRO stage | samples/s | vs ZeRO-0 | optimizer state MB / rank | vs ZeRO-0 | peak RSS MB / rank |")
    print("|---|---|---|---|---|---|")
    for stage, row in rows.items():
        print(f"| {stage} | {row['samples_per_s']:.3f} | {row['samples_per_s'] / base['samples_per_s']:.2f}x | "
              f"{row['optimizer_state_mb']:.0f} | {row['optimizer_state_mb'] / base['optimizer_state_mb']:.2f}x | "
              f"{row['peak_rss_mb']:.0f} |")
    print(json.dumps({f"zero{stage}": {k: round(v, 3) for k, v in row.items()} for stage, row in rows.items()}))


if __name__ == "__main__":
    main()
