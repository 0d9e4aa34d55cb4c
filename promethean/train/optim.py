"""AdamW with decoupled weight decay on the matrices that should shrink, and nothing else.

Decay pulls weights towards zero; that regularises the >= 2-D weights of linear layers, but on
norm gains, biases and embedding tables it only hurts (an embedding row that is rarely seen would
be decayed every step while seldom receiving a gradient). A tied output head is the embedding
itself and appears once in `named_parameters()`, so it is counted once, without decay.

AdamW's two moments are 8 bytes per parameter in fp32, half of what a 124M model's training
holds (weights 4 + gradients 4 + moments 8). `BFloat16MomentsAdamW` keeps them in bf16 (4 bytes),
which is what lets GPT-2 small train in about 2.4 GB.
"""

from __future__ import annotations

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and everything else (vectors, embeddings, and
    what a module names in its `no_weight_decay_parameters`, such as the SSM's A_log). Marked by
    name on the module rather than on the tensor, so that it survives a load that replaces the
    parameters (load_state_dict(assign=True))."""
    exempt = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    for module in model.modules():
        for name in getattr(module, "no_weight_decay_parameters", ()):
            exempt.add(id(getattr(module, name)))
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():  # shared (tied) parameters appear once
        if not parameter.requires_grad:
            continue
        if parameter.ndim >= 2 and id(parameter) not in exempt:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Moments are updated this many elements at a time, so the fp32 working copies stay small
# (16 MB) however large the tensor (the GPT-2 embedding is 38.6M elements).
_SLICE = 1 << 22


class BFloat16MomentsAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, the same update as `torch.optim.AdamW`)
    whose moments are stored in bf16. Each step reads a moment slice into fp32, updates it, uses
    the fp32 values for this step's update, and rounds only what it stores back."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(parameter, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                step_size = lr / (1 - beta1**step)
                root_correction = (1 - beta2**step) ** 0.5
                if decay:
                    parameter.mul_(1 - lr * decay)
                weights = parameter.view(-1)
                grads = parameter.grad.reshape(-1)
                first, second = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for start in range(0, weights.numel(), _SLICE):
                    part = slice(start, start + _SLICE)
                    grad = grads[part].float()
                    m = first[part].float().lerp_(grad, 1 - beta1)
                    v = second[part].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    first[part] = m
                    second[part] = v
                    denominator = v.sqrt_().div_(root_correction).add_(eps)
                    weights[part].addcdiv_(m, denominator, value=-step_size)
        return loss

    def load_state_dict(self, state_dict) -> None:
        # torch casts loaded moments to the parameter's dtype (fp32); store them as bf16 again,
        # which is exact for moments saved by this optimizer.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    moments_dtype: str = "fp32",
) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where the device supports it, else the default (foreach);
    with `moments_dtype="bf16"`, `BFloat16MomentsAdamW`."""
    groups = parameter_groups(model, weight_decay)
    if moments_dtype == "bf16":
        return BFloat16MomentsAdamW(groups, lr=lr, betas=betas)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
