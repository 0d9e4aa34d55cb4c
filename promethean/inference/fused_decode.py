"""A prepared model's decode steps in a single call of Promethean's kernels.

At batch 1 a decode step's matrix products stream the weights at close to the memory bandwidth;
what else a step costs is the time between them. Run from Python, each of a block's ~30 small
operations (norms, the q/k/v split and views, the cache write, attention, residual adds) pays
~10 us of interpreter and module overhead: 2-3 ms per GPT-2-small step, as much as all of an int8
model's weight reads at batch 1. `kernels.decode_blocks` runs every block of a step in C++
instead, with the same ATen operations in the same order as `promethean.model`'s modules (the
same kernels, oneDNN's packed bf16 for several rows, and the attention mask of left-padded
rows), so its result is bit-identical to the module path (tests/test_fused_decode.py).

`install(model)` is called by `prepare_for_inference` when the kernels run here; the model then
uses it for every decode step (one new token per sequence, with a KV cache that has room for
it: `generate`, the serving engine's batches) and the module path for everything else (prompts,
training). Models it cannot express (SSM mixers, sliding-window layers, layers that are not the
kernels' own) keep the module path throughout.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# PyTorch's registries of hooks that every module runs (nn.modules.module.register_module_*).
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from promethean.inference import kernels
from promethean.model import Transformer
from promethean.model.attention import KVCache, LayerKVCache
from promethean.model.layers import LayerNorm, RMSNorm

# Tensors per layer in the `params` list, in kernels.cpp's `Param` order.
PARAMS_PER_LAYER = 50
MLP_KINDS = {"gelu": 0, "swiglu": 1, "geglu_tanh": 2}  # kernels.cpp's MlpKind


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
    if model.config.mlp not in MLP_KINDS:
        return f"its '{model.config.mlp}' MLP is not one the fused step knows"
    for layer, block in enumerate(model.blocks):
        attention = block.attn
        if attention is None:
            return f"layer {layer} is an SSM mixer"
        if attention.window is not None:
            return f"layer {layer} is a sliding-window layer"
        projections = (*_qkv_projections(attention), attention.o_proj,
                       *_mlp_projections(block.mlp))
        if any(_operands(projection) is None for projection in projections):
            return f"layer {layer} has projections the fused step cannot multiply"
        norms = [block.attn_norm, block.mlp_norm, block.attn_post_norm, block.mlp_post_norm]
        if any(norm is not None and not isinstance(norm, (LayerNorm, RMSNorm)) for norm in norms):
            return f"layer {layer} has a norm the fused step does not know"
        if attention.scale != model.blocks[0].attn.scale:
            return "the layers' attention scales differ"
    return None


def _qkv_projections(attention) -> tuple:
    if attention.qkv_proj is not None:
        return (attention.qkv_proj,)
    return attention.q_proj, attention.k_proj, attention.v_proj


def _mlp_projections(mlp) -> tuple:
    return (mlp.gate_proj, mlp.up_proj, mlp.down_proj) if mlp.gated else (mlp.up_proj,
                                                                           mlp.down_proj)


def _operands(projection) -> tuple | None:
    """The five tensors of a projection in kernels.cpp's `Param` order: (weight, scales, bias)
    as the kernels multiply them, then PyTorch's copy and its bias (see `kernel_operands`); an
    nn.Linear (an fp32 model) has only the latter. None for a layer the step cannot multiply."""
    if type(projection) is nn.Linear:  # not a subclass, whose forward may differ
        return None, None, None, projection.weight, projection.bias
    operands = getattr(projection, "kernel_operands", None)
    return None if operands is None else operands()


def _norm_tensors(norm) -> list:
    if norm is None:
        return [None, None]
    return [norm.weight, getattr(norm, "bias", None)]


class FusedDecode:
    """The tensors and shape of a model's blocks, gathered once, for `kernels.decode_blocks`."""

    def __init__(self, model: Transformer) -> None:
        config = model.config
        params: list[torch.Tensor | None] = []
        self.layer_thetas = []
        for block in model.blocks:
            attention, mlp = block.attn, block.mlp
            params += _norm_tensors(block.attn_norm)
            if attention.qkv_proj is not None:
                params += [*_operands(attention.qkv_proj), *[None] * 15]
            else:
                params += [None] * 5
                for projection in _qkv_projections(attention):
                    params += _operands(projection)
            q_norm, k_norm = attention.q_norm, attention.k_norm
            params += [None, None] if q_norm is None else [q_norm.weight, k_norm.weight]
            params += _operands(attention.o_proj)
            params += _norm_tensors(block.attn_post_norm)
            params += _norm_tensors(block.mlp_norm)
            params += _operands(mlp.gate_proj) if mlp.gated else [None] * 5
            params += _operands(mlp.up_proj)
            params += _operands(mlp.down_proj)
            params += _norm_tensors(block.mlp_post_norm)
            self.layer_thetas.append(attention.rope_theta)
        assert len(params) == PARAMS_PER_LAYER * config.n_layer
        self.params = params
        # The distinct rotary bases the forward pass must provide tables for.
        self.rope_thetas = sorted({theta for theta in self.layer_thetas if theta is not None})
        self.shape = [config.n_layer, config.n_head, config.kv_heads, config.head_size,
                      int(config.norm == "rmsnorm"), int(config.norm_unit_offset),
                      MLP_KINDS[config.mlp]]
        self.reals = [float(config.norm_eps), float(model.blocks[0].attn.scale)]
        # Every module the step stands in for: a forward hook on any of them (a LoRA adapter
        # that is not merged, a probe) needs the module path, which runs it.
        self.modules = [module for block in model.blocks for module in block.modules()]

    def __deepcopy__(self, memo):
        # A copied model's step must read the copy's tensors: those its layers already copied
        # are in `memo`. oneDNN-packed weights have no storage for deepcopy, so they are cloned.
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.params = [None if tensor is None else _copied(tensor, memo)
                        for tensor in self.params]
        clone.modules = copy.deepcopy(self.modules, memo)  # the copy's, already in memo
        return clone

    def can_step(self, cache: KVCache) -> bool:
        """Whether the step may run: no gradients are wanted (it has no backward), no module it
        stands in for has a forward hook (other than a LoRA adapter's that adds nothing now, as
        a merged one's), and every layer's cache holds exactly the sequences' slots so far with
        room for one more token (when full, the module path grows it)."""
        first = cache.layers[0]
        if not (isinstance(first, LayerKVCache) and first.keys is not None
                and first.filled == cache.length and first.filled < first.keys.shape[2]):
            return False
        if torch.is_grad_enabled() or _global_forward_hooks or _global_forward_pre_hooks:
            return False
        for module in self.modules:
            if module._forward_pre_hooks:
                return False
            if module._forward_hooks and not _hooks_add_nothing(module):
                return False
        return True

    def step(
        self,
        x: torch.Tensor,
        cache: KVCache,
        rotaries: dict[float, tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run every block on x (batch, 1, width), writing the new keys and values to `cache`.
        `rotaries` maps each base in `rope_thetas` to its (cos, sin) tables for the new
        positions; `mask` is the attention mask of left-padded rows (None without padding)."""
        layers = cache.layers
        filled = layers[0].filled
        rotary = []
        if rotaries:
            for theta in self.layer_thetas:
                rotary += rotaries[theta]
        x = kernels.decode_blocks(x, self.params, [layer.keys for layer in layers],
                                  [layer.values for layer in layers], rotary, mask, filled,
                                  self.shape, self.reals)
        for layer in layers:
            layer.filled = filled + 1
        return x


def _copied(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
    if id(tensor) in memo:
        return memo[id(tensor)]
    if tensor.layout == torch._mkldnn:
        memo[id(tensor)] = tensor.clone()
        return memo[id(tensor)]
    return copy.deepcopy(tensor, memo)


def _hooks_add_nothing(module: nn.Module) -> bool:
    """Whether every forward hook of `module` belongs to a LoRA adapter set
    (promethean.continual) whose hooks add nothing right now, a merged adapter's for one: the
    step's output is then the module path's."""
    for hook in module._forward_hooks.values():
        owner = adapter_set_of(hook)
        if owner is None or not owner.adds_nothing():
            return False
    return True


def adapter_set_of(hook):
    """The LoRA adapter set (promethean.continual's `Adapters`: anything with `adds_nothing`,
    `active` and `merged`) a forward hook belongs to, or None for any other hook."""
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(getattr(value, "adds_nothing", None)):
            return value
    return None
