"""Building blocks shared by every architecture: norms, MLP variants and rotary tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promethean.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 for stability and cast back.

    With `unit_offset` the gain is (1 + weight), weight starting at 0 (Gemma's form)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        return (normed * gain).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop only the bias)."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)
    return LayerNorm(dim, config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """The feed-forward sublayer: plain GELU (GPT-2) or a gated variant (SwiGLU, GeGLU-tanh)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.gated = config.mlp != "gelu"
        if self.gated:
            self.gate_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            # GPT-2 was trained with the tanh approximation of GELU.
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        elif self.kind == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        return self.dropout(self.down_proj(hidden))


def rotary_inverse_frequencies(head_size: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))


def rotary_cos_sin(
    positions: torch.Tensor, inverse_frequencies: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions: (..., T) -> (..., T, head_size)."""
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x (B, H, T, D) — the "rotate half" layout LLaMA and Gemma use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
