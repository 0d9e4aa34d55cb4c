"""Building blocks shared by every architecture: linear layers, norms, MLP variants and rotary
tables."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from promethean.config import ModelConfig

# Rows below which an fp32 product stays on F.linear (oneDNN's fixed cost per call dominates).
ONEDNN_MIN_ROWS = 4


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this PyTorch has oneDNN's dense linear (`mkldnn::_linear_pointwise`) and it gives
    F.linear's result on a small product (checked once)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8, 24, generator=generator)
        weight = torch.randn(16, 24, generator=generator)
        bias = torch.randn(16, generator=generator)
        got = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        back = torch.ops.mkldnn._linear_pointwise(got, weight.t(), None, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, weight, bias), atol=1e-4)
                    and torch.allclose(back, got @ weight, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b on oneDNN, and its gradients: grad x = gy W on oneDNN too; grad W = gy^T x on
    whichever library is faster for the shape (measured on an AMD Zen 4: oneDNN when the layer
    narrows, K > N, else MKL)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            if weight.shape[1] > weight.shape[0]:
                grad_weight = _onednn(grad.t(), x.t(), None)
            else:
                grad_weight = grad.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with fp32 products on a CPU run by oneDNN where PyTorch has it: there it is
    1.1-1.5x faster than MKL, which runs a slow code path on AMD CPUs (docs/BENCHMARKS.md,
    training). Under autocast, in other dtypes, on other devices, for a few rows and inside
    `torch.compile` (whose inductor lowers oneDNN's op only for constant weights), F.linear."""
    if (torch.compiler.is_compiling() or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or (bias is not None and bias.dtype != torch.float32)
            or torch.is_autocast_enabled("cpu") or x.dim() < 2
            or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1] or not _onednn_linear_works()):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _OneDnnLinear.apply(rows, weight, bias)
    else:
        y = _onednn(rows, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and hooks) whose fp32 CPU products run on oneDNN
    (`linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
    """The feed-forward sublayer: plain GELU (GPT-2's tanh form, or exact as in nanoGPT) or a
    gated variant (SwiGLU, GeGLU-tanh)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.up_proj = Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.down_proj = Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            # GPT-2 was trained with the tanh approximation of GELU.
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        elif self.kind == "gelu_exact":
            hidden = F.gelu(self.up_proj(x))
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
