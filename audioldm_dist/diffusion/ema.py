"""Exponential moving average of the UNet's weights, used for all generation (decay 0.9999)."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of the trainable parameters, in float32, updated after each optimizer step."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # The original warms the decay up: min(decay, (1 + n) / (10 + n)).
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(parameter.detach().float(), 1.0 - decay)

    def start_from(self, shadow: dict[str, torch.Tensor], *, num_updates: int | None) -> None:
        """Continue a checkpoint's EMA (finetuning): its weights, and its update count where it has one (LitEma's
        `num_updates`; the original restores both with the rest of the state dict)."""
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.shadow = {name: shadow[name].detach().float().clone() for name in self.shadow}
        self.num_updates = num_updates or 0

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                parameter.copy_(self.shadow[name].to(parameter.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.shadow = {name: tensor.float().clone() for name, tensor in state["shadow"].items()}
