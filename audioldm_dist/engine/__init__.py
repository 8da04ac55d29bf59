"""Training: distributed set-up, DeepSpeed, the loop, checkpoints, logging, signals. Only here is deepspeed imported."""
