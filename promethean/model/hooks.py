"""The type of a forward hook that adds an adapter's update to a layer's output.

promethean.continual's LoRA adapters reach the model through one forward hook per targeted linear
layer (`promethean.continual.adapters.LoraHook`). Code that replaces layers, hooks and all
(promethean.inference, preparing a model for inference), must tell such a hook from any other,
and ask whether the update it adds is already folded into the weights. It recognises one by this
type, which it can name without importing promethean.continual (a higher layer).
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterHook:
    """A forward hook (`module.register_forward_hook(hook)`) that adds an adapter's update to
    its layer's output."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unmerged_adapter(self) -> str | None:
        """The active adapter when its update is not merged into the layer's weights (the hook
        adds it, or will once re-enabled); None when no adapter is active or the active one is
        merged. What replacing the layer without its hook would lose."""
        raise NotImplementedError
