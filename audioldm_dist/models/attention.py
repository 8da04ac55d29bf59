"""Attention with swappable kernels: `xformers`, `sdpa` (the default) and `math` (the reference).

Model code calls `scaled_dot_product(q, k, v, backend=...)` and never branches on the backend itself.
`select_backend("auto")` picks xformers only on CUDA, only if it imports, and only after a
forward + backward self-test in the training dtype agrees with the math kernel; otherwise SDPA. The
choice is logged once. `AUDIOLDM_ATTENTION=xformers|sdpa|math` overrides the config.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("xformers", "sdpa", "math")
ENV_VAR = "AUDIOLDM_ATTENTION"
_logged: set[str] = set()


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    import xformers.ops  # optional extra: pip install audioldm-dist[xformers]

    bias = None
    if mask is not None:  # (B, Nk) keep-mask → additive bias (B, H, Nq, Nk)
        bias = torch.zeros(mask.shape[0], q.shape[1], q.shape[2], mask.shape[-1], dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_bias=bias)  # xformers wants (B, N, H, D)
    return out.transpose(1, 2)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    attn_mask = mask[:, None, None, :] if mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


_KERNELS = {"xformers": _xformers_attention, "sdpa": _sdpa_attention, "math": _math_attention}


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for (B, H, N, D) tensors; `mask` (B, Nk) is True where keys may be attended."""
    return _KERNELS[backend](q, k, v, mask)


def _xformers_self_test(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when xformers agrees with the math kernel forward and backward, else the reason it does not."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # ImportError, or a wheel built for another torch
        return f"xformers not importable: {error}"
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (2, 4, 64, 32)
    tensors = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]
    try:
        fast = _xformers_attention(*tensors, None)
        fast.sum().backward()
        fast_grads = [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
        reference = _math_attention(*[t.float() for t in tensors], None)
        reference.sum().backward()
    except Exception as error:
        return f"xformers self-test failed: {type(error).__name__}: {error}"
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    if not torch.allclose(fast.float(), reference, atol=tolerance, rtol=tolerance):
        return "xformers forward disagrees with the math kernel"
    for fast_grad, tensor in zip(fast_grads, tensors):
        if not torch.allclose(fast_grad.float(), tensor.grad.float(), atol=tolerance * 10, rtol=tolerance * 10):
            return "xformers backward disagrees with the math kernel"
    return None


def select_backend(requested: str = "auto", *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> str:
    """The backend to use: the env var, else `requested`, resolving `auto` as described above."""
    requested = os.environ.get(ENV_VAR, requested) or "auto"
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"attention backend {requested!r}: expected one of auto, {', '.join(BACKENDS)}")
    device = torch.device(device)
    if requested == "xformers" and device.type != "cuda":
        raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' or 'auto' on the CPU")
    chosen, reason = requested, "requested"
    if requested == "auto":
        if device.type == "cuda":
            failure = _xformers_self_test(device, dtype)
            chosen, reason = ("xformers", "passed its self-test") if failure is None else ("sdpa", failure)
        else:
            chosen, reason = "sdpa", "xformers is CUDA-only"
    message = f"attention backend: {chosen} ({reason}; device {device.type}, {dtype})"
    if message not in _logged:
        _logged.add(message)
        log.info(message)
    return chosen


class CrossAttention(nn.Module):
    """Multi-head attention with the original parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(self, query_dim: int, *, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, H·D) → (B, H, N, D)
            return t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)

        out = scaled_dot_product(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
                                 backend=self.backend, mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(batch, x.shape[1], -1))


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Points every attention layer of `module` at one backend."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    for layer in module.modules():
        if isinstance(layer, CrossAttention):
            layer.backend = backend
