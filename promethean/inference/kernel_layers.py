"""The layers of a model prepared for Promethean's CPU kernels (`promethean.inference.kernels`).

`convert(model, dtype)` (called by `prepare_for_inference` where the kernels run) replaces, block
by block, every projection, norm, MLP, attention and SSM mixer of a `Transformer` with one of the
modules below, which compute with the kernels alone: weights packed in panels (fp32, bf16, or
int8 with one fp32 scale per output row), norms, attention over the KV cache, and the selective
scan, each computing every row of a batch by the same instructions in the same order. So a
prepared model gives a sequence the same logits, bit for bit, whether it is decoded alone or in
any batch, left-padded or not, at any step, and on AVX2 as on AVX-512 (tests/
test_batch_invariance.py). The rest of a forward pass (embeddings, residual adds, the SSM's
convolution) is elementwise PyTorch, which rounds each element alike wherever it sits.

The modules keep the interfaces of those they replace, so `Transformer.forward` runs them
unchanged; the attention layers build their own masks from the query slots and the rows' left
padding (`SlotMask`; the model's `attention_reads_slots`). Once converted, every layer's panels
are moved into one mapping on 2 MB pages where the OS grants them (`move_panels_to_huge_pages`):
a decode step streams them all from memory, and reads them faster there.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from promethean.errors import PrometheanError
from promethean.inference import kernels
from promethean.model import Transformer
from promethean.model.attention import Attention, SlotMask
from promethean.model.cache import LayerKVCache, SSMLayerCache
from promethean.model.layers import MLP, LayerNorm, RMSNorm
from promethean.model.ssm import SelectiveSSM

# Weight formats of the kernels, by inference dtype; activations are bf16 for bf16 and int8.
ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}
# Rows quantized at a time: the fp32 temporaries of a 50k-row head stay a few MB.
QUANTIZE_ROWS_AT_ONCE = 4096


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 matrix, fp32 scales) with weight ~ int8 * scale[:, None]."""
    weight = weight.detach()
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS_AT_ONCE):
        rows = weight[start : start + QUANTIZE_ROWS_AT_ONCE].float()
        row_scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        quantized[start : start + QUANTIZE_ROWS_AT_ONCE] = (
            torch.round(rows / row_scales[:, None]).clamp_(-127, 127)
        )
        scales[start : start + QUANTIZE_ROWS_AT_ONCE] = row_scales
    return quantized, scales


class KernelModule(nn.Module):
    """A layer whose tensors are laid out and typed for the kernels: a conversion that would
    change one (`.to(torch.float16)`, `.float()` on a bf16 model, another device) is refused
    rather than left to fail later; one that changes nothing (`.to("cpu")`) is allowed."""

    def _apply(self, fn, recurse=True):
        for tensor in [*self._parameters.values(), *self._buffers.values()]:
            if tensor is None:
                continue
            moved = fn(tensor)
            if moved.dtype != tensor.dtype or moved.device != tensor.device:
                raise PrometheanError(
                    "a model prepared for inference cannot be converted with .to() or .float(); "
                    "load the checkpoint again."
                )
        return super()._apply(fn, recurse)


def runs_on_kernels(model: nn.Module) -> bool:
    """Whether `model` was prepared onto these layers (`prepare_for_inference` on a CPU with the
    kernels): then a row's results do not depend on the other rows or tokens computed with it."""
    return any(isinstance(module, KernelModule) for module in model.modules())


class AdapterRows:
    """Which adapter slot each sequence of the batch being computed uses (-1: the base model),
    shared by a model's `KernelLinear`s; `slots` None: no sequence uses one (the plain path).
    Set by the serving engine before each forward."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self._per_row: dict[int, torch.Tensor] = {}

    def set(self, slots: list[int] | None) -> None:
        self._per_row = {}
        self.slots = (torch.tensor(slots, dtype=torch.long)
                      if slots is not None and any(slot >= 0 for slot in slots) else None)

    def of_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The slot of each row of x (batch, ..., features) flattened to rows."""
        tokens = x[0].numel() // x.shape[-1] if x.shape[0] else 1
        if tokens not in self._per_row:
            self._per_row[tokens] = self.slots.repeat_interleave(tokens).contiguous()
        return self._per_row[tokens]


class KernelLinear(KernelModule):
    """A projection multiplied by the kernels: the weight packed in panels in `weight_format`
    (fp32, bf16, or int8 with fp32 `scales` per output row), an fp32 bias, and an activation
    applied to each output before its one rounding. With `gated`, `weight` stacks a gate
    projection's rows over an up projection's and the layer returns act(gate) * up."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_format: str,
                 activation: str = "none", gated: bool = False) -> None:
        super().__init__()
        if gated != activation.endswith("_mul"):
            raise ValueError(f"activation '{activation}' and gated={gated} do not go together")
        weight = weight.detach()
        rows, self.in_features = weight.shape
        self.out_features = rows // 2 if gated else rows
        self.weight_format = weight_format
        self.activation = activation
        scales = None
        if weight_format == "int8":
            weight, scales = quantize_rows(weight)
        elif weight_format == "bf16":
            weight = weight.to(torch.bfloat16)
        else:
            weight = weight.float()
        # A parameter (that never trains) so that the model still has parameters to find its
        # device by; its layout is the kernels' (csrc/api.h), not (out, in).
        self.packed = nn.Parameter(kernels.pack_linear(weight, gated), requires_grad=False)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # LoRA adapters held side by side (promethean.inference.adapter_slots): down (slots, in,
        # R), up (slots, R, weight rows), and the rows' slots of the batch being computed.
        # Plain attributes: a prepared model's state is its weights.
        self.lora_down: torch.Tensor | None = None
        self.lora_up: torch.Tensor | None = None
        self.adapter_rows: AdapterRows | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.adapter_rows
        if self.lora_down is not None and rows is not None and rows.slots is not None:
            lora = (self.lora_down, self.lora_up, rows.of_rows(x))
            return kernels.linear(x, self.packed, self.out_features, self.scales, self.bias,
                                  self.activation, lora)
        return kernels.linear(x, self.packed, self.out_features, self.scales, self.bias,
                              self.activation)

    @property
    def weight_rows(self) -> int:
        """Rows of the packed weight (a gated layer's gate rows, then its up rows)."""
        return 2 * self.out_features if self.activation.endswith("_mul") else self.out_features

    def weight_bytes(self) -> int:
        """Bytes of weight a product reads (the panels, padding included, and the scales)."""
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.packed.numel() * self.packed.element_size() + scales

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.weight_format} panels, activation={self.activation}")


class KernelNorm(KernelModule):
    """LayerNorm or RMSNorm of each row by the kernels, in fp32 inside, in x's dtype out. A
    unit-offset RMSNorm's gain (1 + weight) is stored already added."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.rms = isinstance(norm, RMSNorm)
        if not self.rms and not isinstance(norm, LayerNorm):
            raise TypeError(f"the kernels have no norm like {type(norm).__name__}")
        self.eps = float(norm.eps)
        weight = norm.weight.detach().float()
        if self.rms and norm.unit_offset:
            weight = weight + 1.0  # the same fp32 addition RMSNorm makes in its forward
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        bias = getattr(norm, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.norm(x, self.weight, self.bias, self.eps, self.rms)


class KernelMLP(KernelModule):
    """The MLP as two products: up (GELU in its epilogue), or gate and up in one (act(gate) * up
    in its epilogue), then down."""

    def __init__(self, mlp: MLP, weight_format: str) -> None:
        super().__init__()
        # The kernels' epilogues compute GELU's tanh form only: the exact one runs in PyTorch
        # between the two products (and a model with it keeps its layers for decoding).
        self.exact_gelu = mlp.kind == "gelu_exact"
        if mlp.kind in ("gelu", "gelu_exact"):
            activation = "none" if self.exact_gelu else "gelu_tanh"
            self.up_proj = KernelLinear(mlp.up_proj.weight, mlp.up_proj.bias, weight_format,
                                        activation=activation)
        else:
            weight = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
            bias = None
            if mlp.up_proj.bias is not None:
                bias = torch.cat([mlp.gate_proj.bias.detach(), mlp.up_proj.bias.detach()])
            activation = "silu_mul" if mlp.kind == "swiglu" else "gelu_tanh_mul"
            self.up_proj = KernelLinear(weight, bias, weight_format, activation, gated=True)
        self.down_proj = KernelLinear(mlp.down_proj.weight, mlp.down_proj.bias, weight_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_gelu:
            return self.down_proj(F.gelu(self.up_proj(x)))
        return self.down_proj(self.up_proj(x))


class KernelAttention(KernelModule):
    """Attention with q, k and v in one product, the kernels' attention over the layer's cache
    (the keys its row may see, summed in slot order), and the output product."""

    def __init__(self, attention: Attention, weight_format: str) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = attention.n_head, attention.n_kv_head
        self.head_size = attention.head_size
        self.window = attention.window
        self.rope_theta = attention.rope_theta
        self.scale = attention.scale
        parts = (attention.q_proj, attention.k_proj, attention.v_proj)
        weight = torch.cat([part.weight.detach() for part in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        self.qkv_proj = KernelLinear(weight, bias, weight_format)
        self.o_proj = KernelLinear(attention.o_proj.weight, attention.o_proj.bias, weight_format)
        self.q_norm = KernelNorm(attention.q_norm) if attention.q_norm is not None else None
        self.k_norm = KernelNorm(attention.k_norm) if attention.k_norm is not None else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: SlotMask,
        is_causal: bool,
        layer_cache: LayerKVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        inner, kv_inner = self.n_head * self.head_size, self.n_kv_head * self.head_size
        q, k, v = self.qkv_proj(x).split((inner, kv_inner, kv_inner), dim=-1)
        q = q.view(batch, length, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = kernels.rotary(q, cos, sin), kernels.rotary(k, cos, sin)
        if layer_cache is not None:
            layer_cache.write(k, v)
            keys, values = layer_cache.keys, layer_cache.values
            key_slot, held = layer_cache.first_slot, layer_cache.filled
        else:
            keys, values, key_slot, held = k.contiguous(), v.contiguous(), mask.first_slot, length
        y = kernels.attention(q, keys, values, mask.first_slot, key_slot, held, mask.left_padding,
                              self.window, self.scale)
        return self.o_proj(y)


class KernelSSM(KernelModule):
    """The selective SSM mixer for inference: its products on the kernels, the causal depthwise
    convolution as fp32 elementwise sums (each output the same operations in the same order),
    and the recurrence (step size, spike threshold, state, C readout, D skip and gate) in one
    kernel that runs token after token, so a prompt and the decode steps after it compute alike."""

    def __init__(self, ssm: SelectiveSSM, weight_format: str) -> None:
        super().__init__()
        self.inner, self.state_size = ssm.inner, ssm.state_size
        self.dt_rank, self.kernel = ssm.dt_rank, ssm.kernel
        self.spike_threshold = float(ssm.spike_threshold)
        self.in_proj = KernelLinear(ssm.in_proj.weight, ssm.in_proj.bias, weight_format)
        # The step size's projections stay in floating point (bf16 for int8 models): they feed
        # exp(delta A), where an error compounds.
        small_format = "bf16" if weight_format == "int8" else weight_format
        self.x_proj = KernelLinear(ssm.x_proj.weight, None, small_format)
        self.dt_proj = KernelLinear(ssm.dt_proj.weight, ssm.dt_proj.bias, small_format,
                                    activation="softplus")
        self.out_proj = KernelLinear(ssm.out_proj.weight, ssm.out_proj.bias, weight_format)
        conv = ssm.conv.weight.detach().float()[:, 0, :]  # (D, kernel)
        self.register_buffer("conv_weight", conv.t().contiguous())  # (kernel, D)
        self.register_buffer("conv_bias", ssm.conv.bias.detach().float().clone())
        self.register_buffer("A", -torch.exp(ssm.A_log.detach().float()))
        self.register_buffer("D", ssm.D.detach().float().clone())
        self.spike_rate = None  # inference keeps no spike statistics

    def forward(self, x: torch.Tensor, real_tokens: torch.Tensor | None = None,
                layer_cache: SSMLayerCache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        inner, gate = self.in_proj(x).chunk(2, dim=-1)
        if real_tokens is not None:
            inner = inner * real_tokens[..., None].to(inner.dtype)
        history = layer_cache.conv_state if layer_cache is not None else None
        if history is None:
            history = inner.new_zeros(batch, self.inner, self.kernel - 1)
        # (B, kernel - 1 + T, D): the convolution's last inputs, then the new ones.
        window = torch.cat((history.to(inner.dtype).transpose(1, 2), inner), dim=1)
        if layer_cache is not None:
            layer_cache.conv_state = window[:, window.shape[1] - (self.kernel - 1):].transpose(1, 2)
        padded = window.float()
        mixed = self.conv_bias.expand(batch, length, self.inner)
        for tap in range(self.kernel):
            mixed = mixed + self.conv_weight[tap] * padded[:, tap : tap + length]
        inner = kernels.silu(mixed.to(x.dtype))
        projected = self.x_proj(inner)
        step = projected[..., : self.dt_rank]
        bc = projected[..., self.dt_rank :].float()
        delta = self.dt_proj(step.float())  # softplus in its epilogue, in fp32
        if real_tokens is not None:
            delta = delta * real_tokens[..., None]  # decay exp(0) = 1 and no update at padding
        state = layer_cache.ssm_state if layer_cache is not None else None
        state = (torch.zeros(batch, self.inner, self.state_size) if state is None
                 else state.float().contiguous())
        y = kernels.ssm_scan(inner, gate, delta, bc, self.A, self.D, state, self.spike_threshold)
        if layer_cache is not None:
            layer_cache.ssm_state = state
        return self.out_proj(y)


class PackedEmbedding(KernelModule):
    """A token embedding tied to a `KernelLinear` head: a lookup reads its rows from the head's
    panels (int8 rows times their scales), so the matrix is held once."""

    def __init__(self, head: KernelLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a list: the head is the model's module, not a child of this one
        self.embedding_dim = head.in_features
        self.num_embeddings = head.out_features
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        # int8: dequantized in the same call (one operation, not five: after a decode step's
        # weights have streamed through the caches each one left runs cold).
        return kernels.packed_rows(head.packed, idx, self.embedding_dim, head.scales, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the head's panels"


class Embedding(KernelModule):
    """A plain lookup table in the activations' dtype (learned positions, an untied token
    embedding), kept from conversions like every layer of a prepared model."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.weight = nn.Parameter(embedding.weight.detach().to(dtype).clone(), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int8Embedding(KernelModule):
    """Token embedding held as int8 rows with one scale per row; a lookup dequantizes only the
    rows it reads."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).to(self.scales.dtype)
        return (rows * self.scales[idx].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


# Linux backs a mapping with 2 MB pages (transparent huge pages) where it is asked to; 4 KB
# pages elsewhere, or where the kernel says never.
HUGE_PAGE = 2 << 20
# Weights below this much in all are left where they are: the gain is in streaming, and the
# mapping rounds up to whole 2 MB pages.
HUGE_PAGE_MINIMUM = 8 << 20
PANEL_ALIGNMENT = 64  # bytes: each moved tensor starts on a cache line, as torch's allocations


def huge_page_bytes(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of zeroed uint8 memory on 2 MB pages where the OS grants them (Linux with
    transparent huge pages in `madvise` or `always` mode), or None where it cannot be asked.

    A decode step streams every weight once from memory, and on 4 KB pages that means a TLB miss
    (a page walk, two-level under a hypervisor) and a restart of the hardware prefetcher, which
    does not cross a page, every 4 KB: measured on a Zen 4 VM, 2 MB pages read 10-20% faster."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    try:
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(advice)
    except (OSError, ValueError):
        return None
    # The tensor holds the mapping (the buffer protocol keeps it open while any view lives).
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE  # the first 2 MB boundary: whole pages from there
    return whole[start : start + nbytes]


@torch.no_grad()
def move_panels_to_huge_pages(model: nn.Module) -> bool:
    """Move every `KernelLinear`'s packed panels into one mapping on 2 MB pages (see
    `huge_page_bytes`), one layer at a time, so that the peak memory grows by one layer's panels
    at most. Values, shapes and dtypes are unchanged (views of the mapping); a copy of the model
    (`copy.deepcopy`) gets ordinary memory. Returns whether they moved."""
    layers = [module for module in model.modules() if isinstance(module, KernelLinear)]
    sizes = [layer.packed.numel() * layer.packed.element_size() for layer in layers]
    padded = [-(-size // PANEL_ALIGNMENT) * PANEL_ALIGNMENT for size in sizes]
    if sum(sizes) < HUGE_PAGE_MINIMUM:
        return False
    arena = huge_page_bytes(sum(padded))
    if arena is None:
        return False
    offset = 0
    for layer, size, room in zip(layers, sizes, padded):
        packed = layer.packed
        moved = arena[offset : offset + size].view(packed.dtype).view(packed.shape)
        moved.copy_(packed)
        layer.packed = nn.Parameter(moved, requires_grad=False)
        del packed
        release_freed_memory()  # each layer's, before the next one's copy grows the peak
        offset += room
    return True


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim): the panels just moved
    were freed into the heap, where the process would otherwise keep them (RSS +50% in fp32)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


@torch.no_grad()
def convert(model: Transformer, dtype: str) -> None:
    """Replace `model`'s layers with the kernels' (see the module docstring), in place, layer
    by layer from the fp32 weights: the peak memory is the fp32 model plus one layer."""
    activations = ACTIVATION_DTYPES[dtype]
    tied = model.lm_head.weight is model.token_embedding.weight
    for block in model.blocks:
        if block.attn is not None:
            block.attn_norm = KernelNorm(block.attn_norm)
            block.attn = KernelAttention(block.attn, dtype)
            if block.attn_post_norm is not None:
                block.attn_post_norm = KernelNorm(block.attn_post_norm)
        else:
            block.ssm_norm = KernelNorm(block.ssm_norm)
            block.ssm = KernelSSM(block.ssm, dtype)
            if block.ssm_post_norm is not None:
                block.ssm_post_norm = KernelNorm(block.ssm_post_norm)
        block.mlp_norm = KernelNorm(block.mlp_norm)
        block.mlp = KernelMLP(block.mlp, dtype)
        if block.mlp_post_norm is not None:
            block.mlp_post_norm = KernelNorm(block.mlp_post_norm)
    model.final_norm = KernelNorm(model.final_norm)
    head = KernelLinear(model.lm_head.weight, None, dtype)
    if tied:
        model.token_embedding = PackedEmbedding(head, activations)
    elif dtype == "int8":
        weight, scales = quantize_rows(model.token_embedding.weight)
        model.token_embedding = Int8Embedding(weight, scales, activations)
    else:
        model.token_embedding = Embedding(model.token_embedding, activations)
    model.lm_head = head
    if model.position_embedding is not None:
        model.position_embedding = Embedding(model.position_embedding, activations)
    model.attention_reads_slots = True
    move_panels_to_huge_pages(model)


def has_kernel_layers(model: Transformer) -> bool:
    return isinstance(model.lm_head, KernelLinear)
