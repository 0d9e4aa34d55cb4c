"""AdamW with decoupled weight decay on the matrices that should shrink, and nothing else.

Decay pulls weights towards zero; that regularises the >= 2-D weights of linear layers, but on
norm gains, biases and embedding tables it only hurts (an embedding row that is rarely seen would
be decayed every step while seldom receiving a gradient). A tied output head is the embedding
itself and appears once in `named_parameters()`, so it is counted once, without decay.
"""

from __future__ import annotations

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and everything else."""
    embedding_ids = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():  # shared (tied) parameters appear once
        if not parameter.requires_grad:
            continue
        if parameter.ndim >= 2 and id(parameter) not in embedding_ids:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where the device supports it, else the default (foreach)."""
    groups = parameter_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
