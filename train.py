"""Training entry point: `deepspeed train.py --deepspeed_config configs/ds/zero2.json --config ...`.

The training loop lands with the DeepSpeed engine issue; until then this says so instead of pretending.
"""
import sys

if __name__ == "__main__":
    sys.exit("train.py: the DeepSpeed training engine is not implemented yet (see the project's issues)")
