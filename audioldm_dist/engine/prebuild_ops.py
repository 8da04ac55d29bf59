"""`python -m audioldm_dist.engine.prebuild_ops`: builds DeepSpeed's JIT-compiled CPU ops once, at set-up.

On a CPU-only machine DeepSpeed compiles its ops (shared-memory all-reduce, fused Adam, CPU Adam for optimizer
offload) the first time a run needs them: ~70 s inside the first training run, on every rank's critical path.
`scripts/setup_env.sh` calls this so that the demo and the tests start with the ops in place. They go where the
engine looks for them (`distributed.extensions_dir()`: inside this environment, never the shared
~/.cache/torch_extensions). With a GPU accelerator nothing is built here: DeepSpeed's CUDA ops are prebuilt at
install (DS_BUILD_OPS=1) or JIT-built as DeepSpeed documents.
"""
from __future__ import annotations

import sys
import time

CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")
"""What runs on the CPU accelerator load: gloo's shared-memory all-reduce (deepspeed.comm), the optimizer of
configs/ds/*.json, and DeepSpeedCPUAdam for `offload_optimizer`."""


def main() -> int:
    from audioldm_dist.engine.distributed import extensions_dir

    folder = extensions_dir()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"prebuild_ops: accelerator {accelerator.device_name()}: nothing to build here")
        return 0
    for name in CPU_OPS:
        started = time.monotonic()
        builder = accelerator.create_op_builder(name)
        if builder is None:
            print(f"prebuild_ops: DeepSpeed has no {name} for the CPU; skipped", file=sys.stderr)
            continue
        builder.load(verbose=False)
        print(f"prebuild_ops: {builder.absolute_name()} ready in {time.monotonic() - started:.0f} s ({folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
