"""Preparing a trained fp32 model for inference in a smaller number format.

`prepare_for_inference(model, dtype)` converts a model in place and returns it, in eval mode:

* ``fp32``: every weight stays fp32.
* ``bf16`` / ``fp16``: every weight in that format.
* ``int8``: weight-only quantization. Every projection of the blocks and the head holds int8
  weights with one symmetric scale per output channel (``w ~ int8 * scale``, scale = max|row| /
  127), multiplied directly by the activations, so a decode step reads a quarter of the fp32
  bytes. Activations stay in floating point: bf16, as in a bf16 model (the norms compute in fp32
  inside). The token embedding is quantized the same way (per row) and, when tied, *is* the
  head's int8 matrix: a lookup dequantizes only the rows it needs.

Where Promethean's own CPU kernels run (`promethean.inference.kernels`: an x86-64 CPU with AVX2
and FMA, AVX-512 with its bf16 and VNNI dot products where it has them, and a C++ compiler),
fp32, bf16 and int8 models are converted to the kernels' layers (`kernel_layers`): weights
packed in panels that a decode step streams close to the memory bandwidth, and norms, attention
and the SSM's scan computed by the kernels, every row alike. That is what makes the guarantee
of the README: **a sequence's logits are bit-identical whether it is decoded alone or in any
batch, left-padded or not, at any step, on AVX2 as on AVX-512**. The model also gets a fused
decode step (`promethean.inference.fused_decode`): a step of one new token per sequence runs
every block in a single C++ call, bit-identical to the layers.

Elsewhere (another device, a CPU without AVX2, no compiler, or `PROMETHEAN_CPU_KERNELS=0`)
PyTorch's kernels run, with no such guarantee: fp32 stays as it is; bf16 matrices of the blocks
are *prepacked* for oneDNN once (`PackedLinear`, about 1.5x faster at batch 1 than a plain bf16
`F.linear`), a tied head multiplied with `torch.mv` for a single row; int8 goes through
`torch._weight_int8pack_mm` (bf16 scales). An int8 request on a device where that kernel is
missing (checked by running it once on a small matrix) falls back to bf16 with a warning, or to
fp32 where bf16 is unsupported too: the model then still runs, just with more bytes per token.

A prepared model is for inference only: its weights cannot be trained, it cannot be converted
with `.to()`, and it cannot be prepared a second time (the precision already lost cannot be
recovered, and a LoRA adapter merges into fp32 weights): load the checkpoint again instead. Merge
any adapter *before* preparing.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from promethean.device import resolve_dtype
from promethean.errors import PrometheanError
from promethean.inference import fused_decode, kernel_layers, kernels
from promethean.inference.kernel_layers import Int8Embedding, quantize_rows
from promethean.model import Transformer
from promethean.model.hooks import AdapterHook
from promethean.model.ssm import SelectiveSSM

INFERENCE_DTYPES = ("fp32", "bf16", "fp16", "int8")
# The attribute of a prepared model (`Transformer.inference_dtype`) that names the dtype actually
# applied; None on a model never prepared.
PREPARED_ATTRIBUTE = "inference_dtype"
# SSM projections left in floating point: they are small (a few % of an SSM layer) and feed the
# step size and B/C of the recurrence, where an error compounds through exp(delta * A).
SSM_FLOAT_PROJECTIONS = ("x_proj", "dt_proj")


# ------------------------------------------------------------------------------------ modules
class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight oneDNN has reordered once into its blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor: a plain attribute, not a parameter (it has no storage that
        # state_dict or autograd could use).
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(torch.bfloat16), 1
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.bfloat16).clone()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), self.packed_weight, self.bias, "none", [], ""
        )

    def __deepcopy__(self, memo):
        # The default deepcopy reads tensor storage, which an opaque oneDNN tensor has none of.
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        state = {key: value for key, value in self.__dict__.items() if key != "packed_weight"}
        clone.__dict__ = copy.deepcopy(state, memo)
        clone.packed_weight = self.packed_weight.clone()
        memo[id(self.packed_weight)] = clone.packed_weight  # what else holds it gets this copy
        return clone

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 2

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                "bf16 oneDNN-packed")


class TiedRowLinear(nn.Module):
    """The head of a bf16 model tied to the token embedding, on PyTorch's kernels: one shared
    plain matrix. A single row (batch-1 decoding) is multiplied with `torch.mv`. Several rows (a
    batched decode step, the last positions of a batch of prompts) are compute-bound: with `pack`
    they go to a oneDNN-packed copy, made on the first such call so that batch-1 generation never
    holds it (77 MB at GPT-2 size); otherwise `F.linear`."""

    def __init__(self, embedding: nn.Embedding, pack: bool) -> None:
        super().__init__()
        self.weight = embedding.weight  # the same Parameter: no second copy
        self.pack = pack
        self.several_rows: PackedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
        # Rows flattened first: on a non-contiguous (B, 1, C) slice (the prompt's last positions)
        # F.linear falls back to a batched matmul that copies the whole vocab x width matrix once
        # per row (0.9 s of a batch-8 prefill at GPT-2 size).
        rows = x.reshape(-1, x.shape[-1])
        if self.pack:
            if self.several_rows is None:
                self.several_rows = PackedLinear(self.weight, None)
            return self.several_rows(rows).reshape(*x.shape[:-1], -1)
        return F.linear(rows, self.weight).reshape(*x.shape[:-1], -1)


# The activations of an int8 model (what torch._weight_int8pack_mm multiplies).
COMPUTE_DTYPE_INT8 = torch.bfloat16
class Int8Linear(nn.Module):
    """Weight-only int8 linear layer on PyTorch's `torch._weight_int8pack_mm`: int8 weight (out,
    in), one bf16 scale per output channel, the bias added in bf16."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight, scales = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().to(COMPUTE_DTYPE_INT8).clone()
        return cls(weight, scales.to(COMPUTE_DTYPE_INT8), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


# ------------------------------------------------------------------------------------ probes
@functools.cache
def _int8_kernel_works(device_type: str) -> bool:
    """Whether `torch._weight_int8pack_mm` exists and is right on this kind of device."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 64, generator=generator)
        rows = torch.randn(3, 64, generator=generator)
        quantized, scales = quantize_rows(weight)
        device = torch.device(device_type)
        got = torch._weight_int8pack_mm(
            rows.to(device, torch.bfloat16), quantized.to(device), scales.to(device, torch.bfloat16)
        ).float().cpu()
        want = rows @ (quantized.float() * scales[:, None]).t()
        return bool(torch.allclose(got, want, rtol=0.05, atol=0.05))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def _onednn_packing_works() -> bool:
    """Whether this CPU build can prepack bf16 weights for oneDNN, and gets the right answer."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 32, generator=generator).bfloat16()
        rows = torch.randn(2, 32, generator=generator).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        got = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        want = F.linear(rows, weight).float()
        return bool(torch.allclose(got.float(), want, rtol=0.02, atol=0.02))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# ------------------------------------------------------------------------------------ entry
def prepare_for_inference(model: Transformer, dtype: str) -> Transformer:
    """Convert an fp32 `model` in place for inference in `dtype` (fp32, bf16, fp16 or int8) and
    return it, in eval mode. See the module's docstring for what each dtype does."""
    check_inference_dtype(dtype)
    already = model.inference_dtype
    if already is not None:
        raise PrometheanError(
            f"this model was already prepared for inference in {already}; load it again in fp32 "
            "to prepare it in another dtype."
        )
    device = next(model.parameters()).device
    use_kernels = device.type == "cpu" and dtype in ("fp32", "bf16", "int8") and kernels.available()
    _check_preparable(model, replaces_layers=use_kernels or dtype in ("bf16", "int8"))
    # Named after the fp32 weights before they change: a memory embedded by this checkpoint in
    # fp32 stays usable by the converted model.
    model.fp32_weights_fingerprint = model.weights_fingerprint()
    model.eval()
    applied = dtype
    if use_kernels:
        kernel_layers.convert(model, dtype)
    else:
        applied = _prepare_with_pytorch(model, dtype, device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if use_kernels:
        fused_decode.install(model)  # where it cannot, decoding keeps the layers
    model.inference_dtype = applied
    return model


def _prepare_with_pytorch(model: Transformer, dtype: str, device: torch.device) -> str:
    """PyTorch's kernels (no Promethean kernels here); returns the dtype actually applied."""
    applied = dtype
    if dtype == "int8" and not _int8_kernel_works(device.type):
        applied = "bf16" if _bf16_supported(device) else "fp32"
        warnings.warn(
            f"int8 inference is not supported on {device.type} here (torch._weight_int8pack_mm "
            f"failed its check), so the model runs in {applied} instead.",
            stacklevel=3,
        )
    tied = _head_is_tied(model)
    # Every conversion goes layer by layer, straight from fp32: the peak memory is the fp32
    # model plus one layer, never fp32 and converted copies of everything.
    if applied == "int8":
        _quantize_int8(model, tied)
    elif applied in ("bf16", "fp16"):
        packing = applied == "bf16" and device.type == "cpu" and _onednn_packing_works()
        if packing:
            _pack_bf16(model, tied)
        model.to(resolve_dtype(applied, device))
        if packing and tied:
            model.lm_head = TiedRowLinear(model.token_embedding, pack=True)
    return applied


def check_inference_dtype(dtype: str) -> None:
    """Refuse a dtype name prepare_for_inference does not know, in one sentence."""
    if dtype not in INFERENCE_DTYPES:
        raise PrometheanError(
            f"unknown inference dtype '{dtype}'; use one of {', '.join(INFERENCE_DTYPES)}."
        )


def _bf16_supported(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def _check_preparable(model: Transformer, replaces_layers: bool) -> None:
    for name, parameter in model.named_parameters():
        if parameter.dtype != torch.float32:
            raise PrometheanError(
                f"prepare_for_inference needs an fp32 model, but '{name}' is "
                f"{str(parameter.dtype).removeprefix('torch.')}; load the checkpoint in fp32."
            )
    for name, module in model.named_modules():
        if not replaces_layers or not isinstance(module, nn.Linear):
            continue
        # Converting a layer replaces it, hooks and all. An adapter's hook (promethean.continual's
        # LoRA) whose adapter is merged adds nothing and may go; any other hook would be lost
        # silently.
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]:
            if not isinstance(hook, AdapterHook):
                raise PrometheanError(
                    f"'{name}' carries a forward hook that converting it for inference would drop; "
                    "remove the hook first."
                )
            unmerged = hook.unmerged_adapter()
            if unmerged is not None:
                raise PrometheanError(
                    f"'{name}' carries the unmerged adapter '{unmerged}'; merge the adapter "
                    "into the weights before preparing the model for inference."
                )


def _block_linears(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every projection of the blocks worth converting:
    attention, MLP and the SSM's input/output projections. Names, not the layers themselves, so
    that each original is freed as soon as it is replaced (the peak memory of a conversion is
    then the fp32 model plus one layer, not two whole models)."""
    found = []
    for block in model.blocks:
        for parent in block.modules():
            for name, child in parent.named_children():
                if not isinstance(child, nn.Linear):
                    continue
                if isinstance(parent, SelectiveSSM) and name in SSM_FLOAT_PROJECTIONS:
                    continue
                found.append((parent, name))
    return found


def _head_is_tied(model: Transformer) -> bool:
    # A merged adapter gives a tied head its own weight: compare tensors, not the config.
    return model.lm_head.weight is model.token_embedding.weight


@torch.no_grad()
def _pack_bf16(model: Transformer, tied: bool) -> None:
    """oneDNN-packed bf16 copies of the blocks' projections and, unless it is the embedding's
    matrix, of the head (a tied head is wrapped after the embedding is in bf16)."""
    for parent, name in _block_linears(model):
        linear = getattr(parent, name)
        setattr(parent, name, PackedLinear(linear.weight, linear.bias))
    if not tied:
        model.lm_head = PackedLinear(model.lm_head.weight, None)


@torch.no_grad()
def _quantize_int8(model: Transformer, tied: bool) -> None:
    for parent, name in _block_linears(model):
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    head = Int8Linear.from_linear(model.lm_head)
    if tied:
        embedding = Int8Embedding(head.weight, head.scales, COMPUTE_DTYPE_INT8)
    else:
        weight, scales = quantize_rows(model.token_embedding.weight)
        embedding = Int8Embedding(weight, scales.to(head.scales.dtype), COMPUTE_DTYPE_INT8)
    model.lm_head, model.token_embedding = head, embedding
    # Everything left in floating point (norms, position table, the SSM's small projections)
    # takes the activations' dtype.
    _convert_floats(model, COMPUTE_DTYPE_INT8)


# Converted layers keep the dtypes they chose.
CONVERTED_LAYERS = (Int8Linear, Int8Embedding)


@torch.no_grad()
def _convert_floats(model: Transformer, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except for the layers the conversion has already replaced."""
    for module in model.modules():
        if isinstance(module, CONVERTED_LAYERS):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)  # a tied Parameter converts once
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
