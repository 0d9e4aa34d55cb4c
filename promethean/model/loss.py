"""Cross-entropy fused with the output head, computed a few hundred rows at a time.

A vocabulary-sized head makes the loss the largest part of a small model's training step: at
16 x 256 tokens and GPT-2's 50,257 tokens the logits are 206M numbers, which the plain path
writes in the matmul's dtype, copies to fp32, turns into log-probabilities, and walks again in the
backward pass. Here each chunk of rows goes head matmul -> fp32 log-softmax -> loss and gradient
while it is still warm in cache, and the full logits never exist. The gradients with respect to
the hidden states and the head weight are computed in the forward pass (the loss is a scalar, so
the backward only scales them), which is what lets every chunk's buffers be freed at once.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from promethean.model.layers import linear

# Rows per chunk are chosen so that one chunk's fp32 log-probabilities take about this many
# elements (64 MB in fp32): large enough for efficient matmuls, small enough to stay out of the way.
CHUNK_ELEMENTS = 1 << 24
# Vocabulary rows per slice of the head-gradient matmul.
_VOCAB_SLICE = 8192
# Below this a probability's log loses precision (fp32's smallest normal is 1.2e-38).
_SMALLEST_SAFE_PROBABILITY = 1e-30


def _chunk_rows(vocab_size: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, compute_dtype, chunk_elements,
                recast_weight_slices):
        rows = hidden.size(0)
        valid = targets != ignore_index
        count = valid.sum()
        safe_targets = torch.where(valid, targets, 0)
        hidden_c = hidden.to(compute_dtype)
        vocab = weight.size(0)
        # The head weight in the compute dtype: cast once (a vocab x width copy), or, to save
        # that copy's memory, recast slice by slice wherever it is used.
        weight_c = None if recast_weight_slices else weight.to(compute_dtype)

        def weight_slice(first: int, last: int) -> torch.Tensor:
            if weight_c is not None:
                return weight_c[first:last]
            return weight[first:last].to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # The head's gradient in fp32. With fp32 products the first chunk's is written and the
        # others added in place (no zeros, no vocab x width temporary); bf16 ones are added.
        in_place = compute_dtype == torch.float32
        grad_weight = (
            (torch.empty if in_place else torch.zeros)(weight.shape, dtype=torch.float32,
                                                       device=weight.device)
            if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_rows(weight.size(0), chunk_elements)
        # One logits and one probabilities buffer for every chunk: a fresh 64 MB tensor per chunk
        # costs its page faults again each time (a fifth of the head's time on a 2-core VM).
        logits_buffer = torch.empty(min(step, rows), vocab, dtype=compute_dtype, device=hidden.device)
        probs_buffer = torch.empty_like(logits_buffer)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            h = hidden_c[start:stop]
            if weight_c is not None:
                logits = torch.mm(h, weight_c.t(), out=logits_buffer[: stop - start])
            else:
                logits = torch.empty(stop - start, vocab, dtype=compute_dtype, device=h.device)
                for first in range(0, vocab, _VOCAB_SLICE):
                    last = min(first + _VOCAB_SLICE, vocab)
                    logits[:, first:last] = h @ weight_slice(first, last).t()
            target = safe_targets[start:stop, None]
            row_valid = valid[start:stop]
            # One pass: softmax computes in fp32 internally and rounds only its output, which the
            # gradient matmuls need in the compute dtype anyway.
            probs = torch._softmax(logits, -1, False, out=probs_buffer[: stop - start])
            picked = probs.gather(1, target).squeeze(1).float()
            token_loss = -torch.log(picked)
            underflow = picked < _SMALLEST_SAFE_PROBABILITY
            if bool(underflow.any()):
                # A target more than ~87 nats below the best: recompute those rows exactly.
                rows_at = underflow.nonzero().squeeze(1)
                exact = torch.logsumexp(logits[rows_at].float(), dim=-1)
                exact -= logits[rows_at].float().gather(1, target[rows_at]).squeeze(1)
                token_loss[rows_at] = exact
            total += torch.where(row_valid, token_loss, 0.0).sum()
            del logits
            if grad_hidden is None and grad_weight is None:
                continue
            # d(-log p_t)/d logits = softmax - one_hot(t), zero for ignored rows.
            probs.scatter_add_(1, target, torch.full_like(picked[:, None], -1.0, dtype=probs.dtype))
            if not bool(row_valid.all()):
                probs[~row_valid] = 0.0
            if grad_hidden is not None and weight_c is not None:
                grad_hidden[start:stop] = linear(probs, weight_c.t())
            elif grad_hidden is not None:
                grad_hidden[start:stop] = 0.0
            if weight_c is not None and in_place:
                if grad_weight is not None and start == 0:
                    torch.mm(probs.t(), h, out=grad_weight)
                elif grad_weight is not None:
                    grad_weight.addmm_(probs.t(), h)
                continue
            # In vocabulary slices, so each product's temporary (before it joins the fp32 sum)
            # is a few MB rather than another vocab x width matrix.
            for first in range(0, vocab, _VOCAB_SLICE):
                last = min(first + _VOCAB_SLICE, vocab)
                part = probs[:, first:last]
                if grad_hidden is not None and weight_c is None:
                    grad_hidden[start:stop] += part @ weight_slice(first, last)
                if grad_weight is None:
                    continue
                if not in_place:
                    grad_weight[first:last] += part.t() @ h
                elif start == 0:
                    torch.mm(part.t(), h, out=grad_weight[first:last])
                else:
                    grad_weight[first:last].addmm_(part.t(), h)
        # A mean over zero targets is nan, as in F.cross_entropy.
        scale = 1.0 / count.to(torch.float32)
        if grad_hidden is not None:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(weight.dtype)
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("the fused cross-entropy supports one backward pass per forward")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these buffers belong to this call alone, and a second vocab x width
        # copy would raise the peak at the start of the backward (154 MB at GPT-2 size).
        grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype)) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_elements: int = CHUNK_ELEMENTS,
    recast_weight_slices: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, without materialising the
    logits: equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets)`.

    `hidden` is (N, d), `weight` (V, d), `targets` (N,). Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32, like the plain path. `recast_weight_slices` trades
    a few percent of speed for memory: the weight's low-precision copy is never whole.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()  # no gradients to prepare
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, compute_dtype, chunk_elements,
            recast_weight_slices and compute_dtype != weight.dtype,
        )
