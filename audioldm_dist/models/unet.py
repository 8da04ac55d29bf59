"""AudioLDM's latent diffusion UNet, in the original `openaimodel` layout and parameter names.

`input_blocks` / `middle_block` / `output_blocks`, `time_embed`, `film_emb`, ResBlocks with
`in_layers` / `emb_layers` / `out_layers` / `skip_connection`, SpatialTransformers with `attn1` /
`attn2` / `ff` / `norm1..3`, so a released `model.diffusion_model.*` state dict loads by name. The
CLAP embedding enters through FiLM (`film_emb`, concatenated to the time embedding); the FLAN-T5
variant adds one cross-attention transformer per attention level after the self-attention one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from audioldm_dist.config import UNetConfig
from audioldm_dist.models.attention import CrossAttention, select_backend, set_attention_backend


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as the original), whatever the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim), [cos, sin] as in the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, *, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(dropout), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int | None, dropout: float) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context, mask=mask if context is not None else None) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Attention over the (H·W) positions of a feature map; `context_dim=None` is self-attention only."""

    def __init__(self, channels: int, *, heads: int, dim_head: int, depth: int, context_dim: int | None,
                 dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.uses_context = context_dim is not None
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads=heads, dim_head=dim_head, context_dim=context_dim, dropout=dropout)
            for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H·W, C)
        for block in self.transformer_blocks:
            h = block(h, context if self.uses_context else None, mask)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        return self.proj_out(h) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Passes the embedding to ResBlocks and the matching context to each transformer."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, contexts: list[torch.Tensor | None],
                masks: list[torch.Tensor | None], use_checkpoint: bool = False) -> torch.Tensor:
        context_index = 0
        for layer in self:
            if isinstance(layer, ResBlock):
                x = checkpoint(layer, x, emb, use_reentrant=False) if use_checkpoint else layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                context = mask = None
                if layer.uses_context:
                    context, mask = contexts[context_index], masks[context_index]
                    context_index += 1
                x = checkpoint(layer, x, context, mask, use_reentrant=False) if use_checkpoint else layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        time_dim = mc * 4
        emb_dim = time_dim * 2 if config.film_dim else time_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if config.film_dim:
            self.film_emb = nn.Linear(config.film_dim, time_dim)

        def attention_layers(channels: int) -> list[nn.Module]:
            heads = channels // config.num_head_channels
            kwargs = dict(heads=heads, dim_head=config.num_head_channels, depth=config.transformer_depth,
                          dropout=config.dropout)
            layers = [SpatialTransformer(channels, context_dim=None, **kwargs)]
            layers += [SpatialTransformer(channels, context_dim=dim, **kwargs) for dim in config.context_dims]
            return layers

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, out_channels=mc * mult, dropout=config.dropout)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers += attention_layers(ch)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, out_channels=ch, dropout=config.dropout), *attention_layers(ch),
            ResBlock(ch, emb_dim, out_channels=ch, dropout=config.dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, out_channels=mc * mult, dropout=config.dropout)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers += attention_layers(ch)
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, config.out_channels, 3, padding=1)))
        self.attention_backend = "sdpa"

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend)
        self.attention_backend = backend

    def select_attention_backend(self, *, device: torch.device | str, dtype: torch.dtype) -> str:
        """Resolves the configured backend (auto → self-tested xformers on CUDA, else SDPA) and applies it."""
        backend = select_backend(self.config.attention_backend, device=device, dtype=dtype)
        self.set_attention_backend(backend)
        return backend

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *, film: torch.Tensor | None = None,
                contexts: list[torch.Tensor] | None = None,
                context_masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """x (B, C, T, F) latents, timesteps (B,), film (B, film_dim), contexts [(B, N, dim)], masks [(B, N)]."""
        contexts = list(contexts or [])
        masks = list(context_masks or [None] * len(contexts))
        if len(contexts) != len(self.config.context_dims):
            raise ValueError(f"the UNet expects {len(self.config.context_dims)} contexts, got {len(contexts)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.config.film_dim:
            if film is None:
                raise ValueError("this UNet is FiLM-conditioned: pass film=(B, film_dim) embeddings")
            emb = torch.cat([emb, self.film_emb(film.reshape(film.shape[0], -1).to(emb.dtype))], dim=-1)
        use_checkpoint = self.config.gradient_checkpointing and self.training
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, contexts, masks, use_checkpoint)
            skips.append(h)
        h = self.middle_block(h, emb, contexts, masks, use_checkpoint)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, contexts, masks, use_checkpoint)
        return self.out(h)
