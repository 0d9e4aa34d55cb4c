"""A prepared model's decode steps in a single call of Promethean's kernels.

At batch 1 a decode step's matrix products stream the weights at close to the memory bandwidth;
what else a step costs is the time between them. Run from Python, each of a block's ~20 small
operations (norms, the q/k/v split and views, rotary, the cache write, attention, residual adds)
pays ~10 us of interpreter and module overhead: about 2 ms per GPT-2-small step, as much as an
int8 model's weight reads at batch 1. `kernels.decode_blocks` runs every block of a step in C++
instead, calling the same kernels and ATen operations in the same order as the model's layers
(`promethean.inference.kernel_layers`), so its result is bit-identical to them
(tests/test_fused_decode.py).

`install(model)` is called by `prepare_for_inference` when the kernels run here; the model then
uses it for every decode step (one new token per sequence, with a KV cache that has room for it:
`generate`, the serving engine's batches) and its layers for everything else (prompts). Models it
cannot express (SSM mixers) keep the layers throughout; so does any step while a forward hook is
set on a module it stands in for, or while gradients are on.
"""

from __future__ import annotations

import copy

import torch

# PyTorch's registries of hooks that every module runs (nn.modules.module.register_module_*).
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from promethean.inference import kernels
from promethean.inference.kernel_layers import KernelAttention, KernelLinear, KernelMLP, KernelNorm
from promethean.model import Transformer
from promethean.model.cache import KVCache

# Tensors per layer in the `params` list, in csrc/ops.cpp's `Param` order.
PARAMS_PER_LAYER = 22


def install(model: Transformer) -> str | None:
    """Give `model` a fused decode step; return why it cannot have one (None when it has)."""
    reason = _unsupported(model)
    if reason is None:
        model.fused_decode = FusedDecode(model)
    return reason


def _unsupported(model: Transformer) -> str | None:
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the model is on {device.type}, and the step runs on the CPU"
    if not kernels.available():
        return f"Promethean's CPU kernels cannot run here: {kernels.unavailable_reason()}"
    for layer, block in enumerate(model.blocks):
        if block.attn is None:
            return f"layer {layer} is an SSM mixer"
        if not isinstance(block.attn, KernelAttention) or not isinstance(block.mlp, KernelMLP):
            return f"layer {layer} is not on the kernels' layers (prepare the model first)"
        norms = [block.attn_norm, block.mlp_norm, block.attn_post_norm, block.mlp_post_norm]
        if any(norm is not None and not isinstance(norm, KernelNorm) for norm in norms):
            return f"layer {layer} has a norm the fused step does not know"
        if block.attn.scale != model.blocks[0].attn.scale:
            return "the layers' attention scales differ"
        if block.attn_norm.rms != model.blocks[0].attn_norm.rms:
            return "the layers' norms differ"
        if block.mlp.exact_gelu:
            return f"layer {layer} has an exact-GELU MLP, which the fused step does not compute"
        if block.mlp.up_proj.activation != model.blocks[0].mlp.up_proj.activation:
            return "the layers' MLPs differ"
    return None


def _projection(linear: KernelLinear) -> list:
    return [linear.packed, linear.scales, linear.bias]


def _norm(norm: KernelNorm | None) -> list:
    return [None, None] if norm is None else [norm.weight, norm.bias]


class FusedDecode:
    """The tensors and shape of a model's blocks, gathered once, for `kernels.decode_blocks`."""

    def __init__(self, model: Transformer) -> None:
        config = model.config
        params: list[torch.Tensor | None] = []
        # The projections that may carry LoRA adapters, in the step's order (csrc/ops.cpp's
        # kLoraProjections per layer, then the head).
        self.lora_layers: list[KernelLinear] = []
        self.layer_thetas = []
        self.windows = []
        for block in model.blocks:
            attention, mlp = block.attn, block.mlp
            params += _norm(block.attn_norm)
            params += _projection(attention.qkv_proj)
            q_norm, k_norm = attention.q_norm, attention.k_norm
            params += [None, None] if q_norm is None else [q_norm.weight, k_norm.weight]
            params += _projection(attention.o_proj)
            params += _norm(block.attn_post_norm)
            params += _norm(block.mlp_norm)
            params += _projection(mlp.up_proj)
            params += _projection(mlp.down_proj)
            params += _norm(block.mlp_post_norm)
            self.lora_layers += [attention.qkv_proj, attention.o_proj, mlp.up_proj, mlp.down_proj]
            self.layer_thetas.append(attention.rope_theta)
            self.windows.append(attention.window or 0)
        assert len(params) == PARAMS_PER_LAYER * config.n_layer
        first = model.blocks[0]
        self.shape = [config.n_layer, config.n_head, config.kv_heads, config.head_size,
                      config.n_embd, first.mlp.up_proj.out_features,
                      kernels.ACTIVATIONS[first.mlp.up_proj.activation], int(first.attn_norm.rms)]
        self.reals = [first.attn_norm.eps, float(first.attn.scale)]
        modules = [module for block in model.blocks for module in block.modules()]
        # The final norm and the head too, where they are the kernels' (a prepared model's are):
        # the step then returns the logits. After 100+ MB of weights streamed through the caches,
        # each PyTorch operation left runs cold (~50-100 us on a Zen 4 VM, not ~5), and this
        # saves two, a tenth of an int8 GPT-2-small step's time outside its products.
        final_norm, head = model.final_norm, model.lm_head
        self.returns_logits = (isinstance(final_norm, KernelNorm) and isinstance(head, KernelLinear)
                               and head.activation == "none")
        if self.returns_logits:
            params += _norm(final_norm) + _projection(head)
            self.shape += [head.out_features, int(final_norm.rms)]
            self.reals += [final_norm.eps]
            modules += [final_norm, head]
            self.lora_layers.append(head)
        self.params = params
        # The distinct rotary bases the forward pass must provide tables for.
        self.rope_thetas = sorted({theta for theta in self.layer_thetas if theta is not None})
        # Every module the step stands in for: a forward hook on any of them (a probe) needs the
        # layers, which run it.
        self.modules = modules
        self.hooks = _hook_registries(modules)

    def __deepcopy__(self, memo):
        # A copied model's step must read the copy's tensors: those its layers already copied
        # are in `memo`.
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.params = [None if tensor is None else copy.deepcopy(tensor, memo)
                        for tensor in self.params]
        clone.lora_layers = copy.deepcopy(self.lora_layers, memo)
        clone.modules = copy.deepcopy(self.modules, memo)  # the copy's, already in memo
        clone.hooks = _hook_registries(clone.modules)
        return clone

    def rebuilt(self, model: Transformer) -> "FusedDecode":
        """The step over `model`'s tensors as they are now (after a conversion)."""
        return FusedDecode(model)

    def can_step(self, cache: KVCache) -> bool:
        """Whether the step may run: no gradients are wanted (it has no backward), no module it
        stands in for has a forward hook, and every layer's cache holds the sequences' slots so
        far with room for one more token (when one is full, the layers grow or compact it)."""
        if not cache.has_room_for_one_more():
            return False
        if torch.is_grad_enabled() or _global_forward_hooks or _global_forward_pre_hooks:
            return False
        return not any(self.hooks)

    def step(
        self,
        x: torch.Tensor,
        cache: KVCache,
        rotaries: dict[float, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Run every block on x (batch, 1, width), writing the new keys and values to `cache`;
        return the last block's output, or with `returns_logits` the logits (batch, 1, vocab)
        of the final norm and the head after it. `rotaries` maps each base in `rope_thetas` to
        its (cos, sin) tables for the new positions."""
        rotary = []
        if rotaries:
            for theta in self.layer_thetas:
                rotary += rotaries[theta] if theta is not None else (None, None)
        keys, values, first_slots, filled = cache.buffers()
        # The rows' LoRA adapters, where any row has one (promethean.inference.adapter_slots).
        lora, lora_slots = None, None
        rows = self.lora_layers[0].adapter_rows
        if rows is not None and rows.slots is not None:
            lora = [tensor for layer in self.lora_layers
                    for tensor in (layer.lora_down, layer.lora_up)]
            lora_slots = rows.slots
        x = kernels.decode_blocks(
            x, self.params, keys, values, first_slots, filled,
            self.windows, rotary, cache.left_padding, cache.length, self.shape, self.reals,
            lora, lora_slots)
        cache.mark_written(1)
        return x


def _hook_registries(modules: list) -> list:
    """The forward (pre-)hook dicts of `modules`, which registering a hook fills in place: a step
    checks them all in one C-level `any`, not two attribute lookups per module."""
    return [hooks for module in modules
            for hooks in (module._forward_pre_hooks, module._forward_hooks)]
