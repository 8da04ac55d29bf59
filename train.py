"""`deepspeed train.py --deepspeed_config configs/ds/zero2.json --config configs/audioldm_s.yaml --run-dir RUN ...`"""
import sys

from audioldm_dist.engine.trainer import main

if __name__ == "__main__":
    sys.exit(main())
