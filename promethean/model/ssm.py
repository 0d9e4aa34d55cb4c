"""The selective state-space mixer (Mamba-1 style) with spike thresholding.

For each channel d of the expanded input and each of N state dimensions n, a state h evolves as

    h_t = exp(delta_t * A) * h_{t-1} + spike(delta_t * B_t * x_t)        y_t = C_t . h_t + D * x_t

where the step size delta (softplus of a low-rank projection), B and C depend on the input (the
*selective* part), A = -exp(A_log) is learned and negative so every state decays, and D skips the
state. The input first goes through a causal depthwise convolution, and the output is gated by
silu(z) from a second branch of the input projection.

Training runs the recurrence as a **chunked parallel scan** (`selective_scan`): within a chunk of
16 steps every state comes at once from cumulative sums of the log decay (log space, never an
exponent that can overflow), and chunks are joined by carrying the state across; its backward is
the same scan run in reverse. Decoding runs the same recurrence one token at a time, keeping O(1) state per layer
(`SSMLayerCache` in promethean.model.cache: the convolution's last inputs and h), whatever the context length.

Spike thresholding: updates delta * B * x whose magnitude is below `spike_threshold` times the
root-mean-square of their token's updates are dropped from the state in the forward pass; the backward pass treats the threshold as the identity (a
straight-through estimator), so suppressed updates still receive gradients and can grow. The
fraction that fired in the last training forward is kept in `spike_rate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from promethean.config import ModelConfig
from promethean.model.cache import SSMLayerCache  # the decode state, kept with the other caches
from promethean.model.layers import Linear

# Time steps per chunk of the parallel scan: long enough that the carry between chunks is a short
# loop, short enough that a chunk rarely decays past SAFE_LOG_DECAY (see `_chunk_states`).
SCAN_CHUNK = 16
# exp(60) ~ 1e26 is far from float32's limit (3e38) even times an update; the rounding of a log
# decay of 60 costs about 60 * 6e-8 = 4e-6 relative, within the scan's 1e-5 tolerance.
SAFE_LOG_DECAY = 60.0


# ------------------------------------------------------------------------------------- the scan
# Every scan below runs h_t = exp(delta_t * A) * h_{t-1} + update_t per channel d and state n:
# delta (B, T, D) >= 0, A (D, N) <= 0, update (B, T, D, N), an initial state (B, D, N) or zeros.
# Keeping the log decay factored as delta x A means its cumulative sums are taken over (B, T, D),
# N times less than the states, and the backward keeps delta rather than a (B, T, D, N) tensor.


def sequential_scan(
    delta: torch.Tensor,
    A: torch.Tensor,
    update: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: one step at a time (T small kernels). Returns every state (B, T, D, N).
    Kept to check the parallel scan against, and as the benchmark's peer."""
    state = initial_state if initial_state is not None else update.new_zeros(update[:, 0].shape)
    states = []
    for t in range(update.shape[1]):
        state = torch.exp(delta[:, t, :, None] * A) * state + update[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


def _chunk_states(
    step_sums: torch.Tensor, A: torch.Tensor, update: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """States of every chunk started from zero, and the decay exp(S) from each chunk's start.

    step_sums (B, chunks, L, D) is the running sum of delta inside each chunk; update is
    (B, chunks, L, D, N). With S_t = step_sums_t * A (0 or negative, falling along the chunk),
    h_t = sum_{s<=t} exp(S_t - S_s) u_s = exp(S_t) * cumsum(exp(-S_s) u_s). That form is cheap
    (two exps and a cumsum) and exact while exp(-S_s) stays finite, which holds for every chunk
    whose whole decay is above -SAFE_LOG_DECAY. Chunks that decay further (large step sizes)
    take the log-space form instead, where logcumsumexp subtracts its running maximum and no
    exponent ever exceeds the log of a state."""
    cumulative = step_sums[..., None] * A
    unsafe = cumulative[:, :, -1:] < -SAFE_LOG_DECAY  # S falls along a chunk: its end is lowest
    any_unsafe = bool(unsafe.any())
    growth = (cumulative.clamp(min=-SAFE_LOG_DECAY) if any_unsafe else cumulative).neg().exp_()
    states = torch.cumsum(growth.mul_(update), dim=2)
    decay = torch.exp(cumulative)
    states *= decay
    if any_unsafe:
        states = torch.where(unsafe, _log_space_states(cumulative, update), states)
    return states, decay


def _log_space_states(cumulative: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The same sums in log space, over the positive and the negative updates separately."""
    positive = torch.log(update.clamp(min=0)) - cumulative  # log(0) = -inf: no contribution
    negative = torch.log((-update).clamp(min=0)) - cumulative
    states = torch.exp(cumulative + torch.logcumsumexp(positive, dim=2))
    return states - torch.exp(cumulative + torch.logcumsumexp(negative, dim=2))


def _parallel_scan(
    delta: torch.Tensor,
    A: torch.Tensor,
    update: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk: int,
) -> torch.Tensor:
    """The chunked scan without autograd: chunks in parallel, then one carry per chunk."""
    batch, length, channels, state_size = update.shape
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:  # padded steps decay by exp(0) = 1 and add 0: they come after every real step
        delta = F.pad(delta, (0, 0, 0, pad))
        update = F.pad(update, (0, 0, 0, 0, 0, pad))
    step_sums = torch.cumsum(delta.reshape(batch, chunks, chunk, channels), dim=2)
    shape = (batch, chunks, chunk, channels, state_size)
    states, decay = _chunk_states(step_sums, A, update.reshape(shape))
    # Carry across chunks: the state entering chunk c decays through it by `decay`.
    carried = initial_state if initial_state is not None else update.new_zeros(batch, channels, state_size)
    entering = []
    for index in range(chunks):
        entering.append(carried)
        carried = decay[:, index, -1] * carried + states[:, index, -1]
    states += decay.mul_(torch.stack(entering, dim=1)[:, :, None])
    return states.reshape(batch, chunks * chunk, channels, state_size)[:, :length]


class _SelectiveScan(torch.autograd.Function):
    """The parallel scan with an exact backward that is itself a scan, run in reverse.

    With g_t = dL/dh_t (through every later state), g_t = grad_t + exp(delta_{t+1} A) g_{t+1}:
    the same recurrence backwards in time. Then dL/dupdate_t = g_t; with
    r_t = g_t * exp(delta_t A) * h_{t-1} (the gradient of the log decay), dL/ddelta = sum_n r A
    and dL/dA = sum_{b,t} r delta; dL/dinitial = exp(delta_0 A) * g_0. Only delta, A and the
    states are kept for the backward, never the scan's intermediates."""

    @staticmethod
    def forward(ctx, delta, A, update, initial_state, chunk):
        states = _parallel_scan(delta, A, update, initial_state, chunk)
        ctx.chunk = chunk
        ctx.has_initial = initial_state is not None
        ctx.save_for_backward(delta, A, states, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        delta, A, states, initial_state = ctx.saved_tensors
        next_delta = F.pad(delta[:, 1:], (0, 0, 0, 1))  # g_T has no later state
        grads = _parallel_scan(next_delta.flip(1), A, grad_states.flip(1), None, ctx.chunk).flip(1)
        first = initial_state if ctx.has_initial else torch.zeros_like(states[:, 0])
        previous = torch.cat((first[:, None], states[:, :-1]), dim=1)
        decay = torch.exp(delta[..., None] * A)
        grad_log_decay = previous.mul_(decay).mul_(grads)
        grad_delta = torch.einsum("btdn,dn->btd", grad_log_decay, A)
        grad_A = torch.einsum("btdn,btd->dn", grad_log_decay, delta)
        grad_initial = decay[:, 0] * grads[:, 0] if ctx.has_initial else None
        return grad_delta, grad_A, grads, grad_initial, None


def selective_scan(
    delta: torch.Tensor,
    A: torch.Tensor,
    update: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk: int = SCAN_CHUNK,
) -> torch.Tensor:
    """Every state of h_t = exp(delta_t * A) * h_{t-1} + update_t, computed in parallel.

    delta (B, T, D) >= 0, A (D, N) <= 0, update (B, T, D, N), initial_state (B, D, N) or None
    (zeros). Runs in float32 whatever the inputs' dtype and returns float32 (B, T, D, N)."""
    delta, A, update = delta.float(), A.float(), update.float()
    if initial_state is not None:
        initial_state = initial_state.float()
    if update.shape[1] == 1:  # one decode step: the recurrence itself is the cheapest form
        previous = initial_state if initial_state is not None else torch.zeros_like(update[:, 0])
        return (torch.exp(delta[:, 0, :, None] * A) * previous + update[:, 0])[:, None]
    return _SelectiveScan.apply(delta, A, update, initial_state, chunk)


# ------------------------------------------------------------------------------- spike threshold
class _SpikeThreshold(torch.autograd.Function):
    """Forward: zero every update whose magnitude is below the threshold. Backward: identity (the
    straight-through estimator), so a suppressed update still learns whether it should fire."""

    @staticmethod
    def forward(ctx, update, fired):
        return update * fired

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def spike(update: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholded update, fraction that fired). A threshold of 0 lets every update through.

    `update` is (B, T, D, N). An update fires when its magnitude is at least `threshold` times
    the root-mean-square of its token's updates (over D and N). Measured against an absolute
    threshold, the card's 0.1 would suppress everything: freshly initialised updates are ~1e-4,
    and the SSM would never switch on. Relative to the token's own scale, 0.1 drops each token's
    small updates whatever the scale (about half at initialisation: delta * B * x is a
    heavy-tailed product), and decoding one token at a time makes exactly the decisions of the
    parallel forward."""
    if threshold == 0:
        return update, torch.ones((), device=update.device)
    magnitude = update.detach().abs()
    scale = magnitude.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    fired = magnitude >= threshold * scale
    return _SpikeThreshold.apply(update, fired), fired.float().mean()


# ------------------------------------------------------------------------------------ the mixer
def inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    return value + torch.log(-torch.expm1(-value))


class SelectiveSSM(nn.Module):
    # Exempt from weight decay (as Mamba exempts them): decaying A_log pulls every state's decay
    # rate towards exp(0) = 1, and D is a per-channel skip gain (promethean.train.optim).
    no_weight_decay_parameters = ("A_log", "D")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inner = config.ssm_inner_size
        self.state_size = config.ssm_state_size
        self.dt_rank = config.ssm_dt_rank_size
        self.kernel = config.ssm_conv_kernel
        self.spike_threshold = config.spike_threshold
        self.in_proj = Linear(config.n_embd, 2 * self.inner, bias=config.bias)
        self.conv = nn.Conv1d(self.inner, self.inner, self.kernel, groups=self.inner, bias=True)
        self.x_proj = Linear(self.inner, self.dt_rank + 2 * self.state_size, bias=False)
        self.dt_proj = Linear(self.dt_rank, self.inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.inner, self.state_size))
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = Linear(self.inner, config.n_embd, bias=config.bias)
        self.out_proj.is_residual_projection = True
        # The fraction of state updates that fired in the last training forward (a 0-d tensor).
        self.spike_rate: torch.Tensor | None = None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of what a plain Linear init would get wrong: A = -(1..N) for
        every channel (slow to fast decays), D = 1, and a step size log-uniform in
        [0.001, 0.1] through the dt_proj bias. The Transformer calls this after its own init."""
        device = self.A_log.device
        self.conv.reset_parameters()
        rates = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=device)
        self.A_log.copy_(torch.log(rates).expand(self.inner, -1))
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        low, high = math.log(1e-3), math.log(1e-1)
        steps = torch.exp(torch.rand(self.inner, device=device) * (high - low) + low).clamp(min=1e-4)
        self.dt_proj.bias.copy_(inverse_softplus(steps))

    def forward(
        self,
        x: torch.Tensor,
        real_tokens: torch.Tensor | None = None,
        layer_cache: SSMLayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `real_tokens` (B, T) is False at left padding: there the
        convolution sees zeros (as before a sequence's start) and the state does not move."""
        batch, length, _ = x.shape
        inner, gate = self.in_proj(x).chunk(2, dim=-1)
        if real_tokens is not None:
            inner = inner * real_tokens[..., None].to(inner.dtype)
        inner = inner.transpose(1, 2)  # (B, D, T) for the convolution
        history = layer_cache.conv_state if layer_cache is not None else None
        if history is None:
            history = inner.new_zeros(batch, self.inner, self.kernel - 1)
        inner = torch.cat((history.to(inner.dtype), inner), dim=2)
        if layer_cache is not None:
            layer_cache.conv_state = inner[:, :, inner.shape[2] - (self.kernel - 1) :]
        weight, bias = self.conv.weight.to(inner.dtype), self.conv.bias.to(inner.dtype)
        inner = F.silu(F.conv1d(inner, weight, bias, groups=self.inner)).transpose(1, 2)

        step, B, C = self.x_proj(inner).split([self.dt_rank, self.state_size, self.state_size], -1)
        delta = F.softplus(self.dt_proj(step).float())  # (B, T, D)
        if real_tokens is not None:
            delta = delta * real_tokens[..., None]  # decay exp(0) = 1 and no update at padding
        # The scan and its inputs stay in float32 even under autocast (a bf16 state would drift).
        with torch.autocast(x.device.type, enabled=False):
            inner32 = inner.float()
            A = -torch.exp(self.A_log.float())  # (D, N), negative: every state decays
            update = (delta * inner32)[..., None] * B.float()[:, :, None, :]
            update, fire_rate = spike(update, self.spike_threshold)
            if self.training:
                self.spike_rate = fire_rate.detach()
            initial = layer_cache.ssm_state if layer_cache is not None else None
            states = selective_scan(delta, A, update, initial)
            if layer_cache is not None:
                layer_cache.ssm_state = states[:, -1]
            y = torch.einsum("btdn,btn->btd", states, C.float()) + self.D.float() * inner32
        y = y.to(x.dtype) * F.silu(gate)
        return self.out_proj(y)
