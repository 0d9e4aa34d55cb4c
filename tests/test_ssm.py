"""The selective state-space mixer: the parallel scan against the sequential loop, decoding against
the full forward (left padding and finished rows included), spike thresholding, and the SSSM
presets through training, resume and export."""

import json

import pytest
import torch
import torch.nn.functional as F

from promethean.config import load_preset, parse_model_config
from promethean.errors import ConfigError
from promethean.model import Transformer
from promethean.model.ssm import (
    SAFE_LOG_DECAY,
    SCAN_CHUNK,
    SelectiveSSM,
    selective_scan,
    sequential_scan,
    spike,
)
from tests.conftest import build

SSM_PRESETS = ["tiny-sssm", "tiny-ssm"]


# Tiny models: one thread is as fast and does not thrash a busy machine (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def scan_inputs(batch=2, length=70, channels=12, state=8, step_scale=1.0, seed=0):
    """Step sizes delta (a softplus), A = -exp(.), updates with some exact zeros (as spike
    thresholding leaves them), and a random initial state."""
    generator = torch.Generator().manual_seed(seed)
    delta = F.softplus(torch.randn(batch, length, channels, generator=generator) - 2) * step_scale
    A = -torch.exp(torch.randn(channels, state, generator=generator))
    update = torch.randn(batch, length, channels, state, generator=generator)
    update[update.abs() < 0.3] = 0
    initial = torch.randn(batch, channels, state, generator=generator)
    return delta, A, update, initial


# ------------------------------------------------------------------------------------ the scan
@pytest.mark.parametrize("length", [1, 5, SCAN_CHUNK, 70])
def test_parallel_scan_equals_the_sequential_loop_in_fp32(length):
    # fp32, ordinary step sizes (the cumsum path): every state within 1e-5 (abs and rel).
    delta, A, update, initial = scan_inputs(length=length)
    for start in (None, initial):
        expected = sequential_scan(delta, A, update, start)
        torch.testing.assert_close(
            selective_scan(delta, A, update, start), expected, atol=1e-5, rtol=1e-5
        )


def test_parallel_scan_is_safe_where_a_chunk_decays_past_float32s_range():
    # Step sizes 30x larger: a chunk's states decay by up to e^-1000, so exp(-cumulative) would
    # overflow; those chunks take the log-space path. Tolerance 1e-4 abs/rel: the log-space sums
    # of a chunk are large numbers that cancel, costing ~|log decay| * 6e-8 relative.
    delta, A, update, initial = scan_inputs(length=70, step_scale=30.0)
    chunk_decay = delta[:, :SCAN_CHUNK].sum(1)[..., None] * A
    assert chunk_decay.min() < -10 * SAFE_LOG_DECAY  # the log-space fallback runs
    assert chunk_decay.max() > -SAFE_LOG_DECAY  # and so does the cheap form, in one call
    states = selective_scan(delta, A, update, initial)
    assert torch.isfinite(states).all()
    torch.testing.assert_close(
        states, sequential_scan(delta, A, update, initial), atol=1e-4, rtol=1e-4
    )


def test_parallel_scan_in_bf16_tracks_the_loop():
    # bf16 inputs: the parallel scan computes in fp32 and so equals the fp32 loop on the same
    # (rounded) inputs to 1e-5. A loop that keeps its state in bf16 (8 bits of mantissa) drifts:
    # its rounding adds up over slowly decaying states, so it is held to 2e-2 of the states' norm
    # overall, and 0.25 absolute for any one state (states here are of order 1-5).
    inputs = [t.bfloat16() for t in scan_inputs(length=70)]
    parallel = selective_scan(*inputs)
    assert parallel.dtype == torch.float32
    fp32_loop = sequential_scan(*[t.float() for t in inputs])
    torch.testing.assert_close(parallel, fp32_loop, atol=1e-5, rtol=1e-5)
    bf16_loop = sequential_scan(*inputs)
    drift = (parallel - bf16_loop.float()).norm() / parallel.norm()
    assert drift < 2e-2, drift
    assert (parallel - bf16_loop.float()).abs().max() < 0.25


@pytest.mark.parametrize("step_scale", [1.0, 30.0])
def test_scan_gradients_match_the_loops(step_scale):
    # The backward is itself a reverse scan; autograd through the loop is the reference. fp32,
    # tolerance 1e-4 abs/rel (gradients sum over many states).
    tensors = scan_inputs(batch=2, length=37, channels=5, state=4, step_scale=step_scale)
    weights = torch.randn(2, 37, 5, 4)
    grads = []
    for scan in (selective_scan, sequential_scan):
        inputs = [t.clone().requires_grad_() for t in tensors]
        (scan(*inputs) * weights).sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------- the mixer
def reference_mixer(ssm: SelectiveSSM, x: torch.Tensor) -> torch.Tensor:
    """The mixer written as plainly as possible: Mamba's equations, one step at a time."""
    inner, gate = ssm.in_proj(x).chunk(2, dim=-1)
    inner = F.conv1d(inner.transpose(1, 2), ssm.conv.weight, ssm.conv.bias,
                     padding=ssm.kernel - 1, groups=ssm.inner)[..., : x.shape[1]]
    inner = F.silu(inner).transpose(1, 2)
    step, B, C = ssm.x_proj(inner).split([ssm.dt_rank, ssm.state_size, ssm.state_size], -1)
    delta = F.softplus(ssm.dt_proj(step))
    A = -torch.exp(ssm.A_log)
    state = x.new_zeros(x.shape[0], ssm.inner, ssm.state_size)
    outputs = []
    for t in range(x.shape[1]):
        A_bar = torch.exp(delta[:, t, :, None] * A)
        B_bar_x = delta[:, t, :, None] * B[:, t, None, :] * inner[:, t, :, None]
        token_rms = B_bar_x.square().mean(dim=(-2, -1), keepdim=True).sqrt()
        B_bar_x = B_bar_x * (B_bar_x.abs() >= ssm.spike_threshold * token_rms)
        state = A_bar * state + B_bar_x
        outputs.append((state * C[:, t, None, :]).sum(-1) + ssm.D * inner[:, t])
    y = torch.stack(outputs, dim=1) * F.silu(gate)
    return ssm.out_proj(y)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5])
def test_mixer_matches_a_step_by_step_reference_and_its_gradients(threshold):
    config = load_preset("tiny-ssm").model.with_overrides(spike_threshold=threshold)
    torch.manual_seed(0)
    ssm = SelectiveSSM(config).train()
    with torch.no_grad():  # larger step sizes than at init, so the state matters
        ssm.dt_proj.bias.add_(3.0)
    x = torch.randn(2, 40, config.n_embd)
    ours = ssm(x)
    reference = reference_mixer(ssm, x)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    if threshold == 0:  # the spike mask has no gradient: compare where both are the plain scan
        grads = [torch.autograd.grad(out.square().sum(), list(ssm.parameters()))
                 for out in (ours, reference)]
        for name, a, b in zip([n for n, _ in ssm.named_parameters()], *grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_spike_rate_is_one_at_threshold_zero_and_lower_above_it():
    idx = torch.randint(0, 257, (2, 40))
    plain = build("tiny-sssm", spike_threshold=0.0).train()
    plain(idx, targets=idx)
    assert plain.spike_rates() == {0: 1.0, 2: 1.0}
    spiking = build("tiny-sssm", spike_threshold=0.5).train()
    spiking(idx, targets=idx)
    rates = spiking.spike_rates()
    assert set(rates) == {0, 2} and all(0 < rate < 1 for rate in rates.values()), rates
    # The default threshold (0.1 of each token's RMS update) drops the small updates but keeps
    # many, also in a freshly initialised model whose updates are ~1e-4 in absolute terms.
    # (delta * B * x is a heavy-tailed product: about half fall below 0.1 RMS at init.)
    default = build("tiny-sssm").train()
    default(idx, targets=idx)
    assert all(0.3 < rate < 0.9 for rate in default.spike_rates().values()), default.spike_rates()
    # Evaluation does not overwrite the training figure.
    spiking.eval()
    spiking(idx[:, :3])
    assert spiking.spike_rates() == rates


def test_straight_through_estimator_passes_the_gradient_of_suppressed_updates():
    # One token's updates, shaped (B, T, D, N); their RMS is 0.2693, so 0.5 x RMS = 0.1347.
    update = torch.tensor([0.05, -0.2, 0.5, -0.01]).reshape(1, 1, 2, 2).requires_grad_()
    fired_update, rate = spike(update, 0.5)
    assert torch.equal(fired_update.detach().flatten(), torch.tensor([0.0, -0.2, 0.5, 0.0]))
    assert rate.item() == 0.5
    # The same decisions at any scale: the threshold is relative to the token's own updates.
    assert torch.equal(spike(update.detach() * 1e-4, 0.5)[0].flatten() != 0,
                       fired_update.detach().flatten() != 0)
    fired_update.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2))
    assert torch.equal(update.grad.flatten(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # In a model: with every update suppressed the state stays 0, yet B's projection (which acts
    # only through the updates) still gets a gradient.
    model = build("tiny-ssm", spike_threshold=1e9).train()
    idx = torch.randint(0, 257, (2, 24))
    model(idx, targets=idx).loss.backward()
    assert model.spike_rates()[0] == 0.0
    ssm = model.blocks[0].ssm
    b_rows = ssm.x_proj.weight.grad[ssm.dt_rank : ssm.dt_rank + ssm.state_size]
    assert b_rows.abs().sum() > 0


# ------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("preset", SSM_PRESETS)
def test_step_by_step_decoding_reproduces_the_full_forward(preset):
    model = build(preset, spike_threshold=0.0)  # threshold 0: every state update matters
    idx = torch.randint(0, 257, (2, 75))
    full = model(idx).logits
    cache = model.new_cache(2)
    pieces = [model(idx[:, :1], cache=cache).logits, model(idx[:, 1:37], cache=cache).logits]
    pieces += [model(idx[:, t : t + 1], cache=cache).logits for t in range(37, 75)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", SSM_PRESETS)
def test_left_padded_batch_and_removed_rows_decode_like_each_row_alone(preset):
    model = build(preset, spike_threshold=0.0)
    prompts = [torch.randint(0, 257, (n,)) for n in (9, 23, 4)]
    continuations = torch.randint(0, 257, (3, 6))
    longest = max(len(p) for p in prompts)
    padding = torch.tensor([longest - len(p) for p in prompts])
    ids = torch.stack([torch.cat((torch.full((int(pad),), 7), p)) for pad, p in zip(padding, prompts)])
    cache = model.new_cache(3, left_padding=padding)
    prefill = model(ids, cache=cache).logits
    steps = [model(continuations[:, :1], cache=cache).logits]
    # Row 1 finishes: the batch continues without it.
    cache.select_rows(torch.tensor([0, 2]))
    for t in range(1, 6):
        steps.append(model(continuations[[0, 2], t : t + 1], cache=cache).logits)
    for row, (pad, prompt) in enumerate(zip(padding.tolist(), prompts)):
        kept = 1 if row == 1 else 6
        alone = model(torch.cat((prompt, continuations[row, :kept]))[None]).logits[0]
        torch.testing.assert_close(prefill[row, pad:], alone[: len(prompt)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(steps[0][row, 0], alone[len(prompt)], atol=1e-5, rtol=1e-5)
        if row != 1:
            position = [0, None, 1][row]
            later = torch.stack([step[position, 0] for step in steps[1:]])
            torch.testing.assert_close(later, alone[len(prompt) + 1 :], atol=1e-5, rtol=1e-5)


def test_a_pure_ssm_cache_does_not_grow_with_the_context():
    model = build("tiny-ssm")
    cache = model.new_cache(1)
    model(torch.randint(0, 257, (1, 8)), cache=cache)
    early = cache.nbytes()
    for _ in range(3):
        model(torch.randint(0, 257, (1, 60)), cache=cache)
    assert cache.nbytes() == early > 0
    hybrid = build("tiny-sssm")
    cache = hybrid.new_cache(1, capacity=8)
    hybrid(torch.randint(0, 257, (1, 8)), cache=cache)
    early = cache.nbytes()
    hybrid(torch.randint(0, 257, (1, 100)), cache=cache)
    assert cache.nbytes() > early  # its attention layers still keep every key and value


# ------------------------------------------------------------------------- config and presets
def test_presets_describe_the_sssm_hybrid_and_a_pure_ssm():
    gpt2 = load_preset("gpt2-sssm")
    assert gpt2.tokenizer == "gpt2" and gpt2.model.vocab_size == 50257 and gpt2.model.n_layer == 12
    assert gpt2.model.ssm_layers == [0, 2, 4, 6, 8, 10]
    assert (gpt2.model.ssm_state_size, gpt2.model.spike_threshold) == (16, 0.1)
    assert load_preset("tiny-sssm").model.ssm_layers == [0, 2]
    assert load_preset("tiny-ssm").model.ssm_layers == [0, 1, 2, 3]
    assert load_preset("tiny-gpt2").model.ssm_layers == []


@pytest.mark.parametrize("changes, sentence", [
    ({"mixer_pattern": ["ssm", "ssm", "attention"]},
     "mixer_pattern has 3 entries, which does not divide n_layer (4)"),
    ({"mixer_pattern": []}, "mixer_pattern must name at least one mixer"),
    ({"mixer_pattern": ["mamba"]}, "'mixer_pattern.0' input should be 'attention' or 'ssm'"),
    ({"spike_threshold": -0.1}, "'spike_threshold' input should be greater than or equal to 0"),
    ({"ssm_state_size": 0}, "'ssm_state_size' input should be greater than 0"),
    ({"sliding_window": 16, "global_layers": [0]}, "global_layers [0] are SSM layers"),
])
def test_bad_mixer_settings_are_one_sentence(changes, sentence):
    data = {**load_preset("tiny-sssm").model.model_dump(), **changes}
    with pytest.raises(ConfigError) as error:
        parse_model_config(data, source="[model] in x.toml")
    assert sentence in str(error.value)
    assert str(error.value).startswith("[model] in x.toml is invalid: ")


def test_hf_export_of_an_ssm_model_is_refused_with_one_sentence(tmp_path):
    from promethean.interop.hf import export_hf

    with pytest.raises(ConfigError) as error:
        export_hf(build("tiny-sssm"), tmp_path / "export")
    assert str(error.value) == (
        "this model cannot be exported to HF transformers: its selective state-space (SSM) "
        "layers [0, 2] have no counterpart in the GPT-2, LLaMA or Gemma-3 layouts; keep it as a "
        "Promethean checkpoint."
    )
    assert not (tmp_path / "export").exists()


def test_memory_planner_counts_what_autograd_saves_in_an_ssm_layer():
    from promethean.train.memory import estimate_peak_memory, layer_activation_elements

    config = load_preset("tiny-ssm").model
    saved = []
    for layers in (1, 2):
        model = build("tiny-ssm", n_layer=layers).train()
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor, storages=storages):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        idx = torch.randint(0, 512, (4, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(idx, idx)
        saved.append(sum(size for key, size in storages.items() if key not in parameters))
    per_token = (saved[1] - saved[0]) / (4 * 64)
    expected = 4 * layer_activation_elements(config, layer=0)
    assert abs(per_token - expected) / expected < 0.05, (per_token, expected)
    # A hybrid sits between its attention-only and SSM-only relatives.
    estimates = [estimate_peak_memory(load_preset(name).model, 2, 256).activations
                 for name in ("tiny-gpt2", "tiny-sssm", "tiny-ssm")]
    assert estimates[0] < estimates[1] < estimates[2]


# ----------------------------------------------------------------------------------- training
def train_config(data_dir, out, **overrides):
    from promethean.train.config import TrainConfig

    settings = {
        "model": "tiny-sssm", "data": str(data_dir), "out": str(out), "batch_size": 2,
        "grad_accum": 2, "block_size": 32, "max_steps": 8, "lr": 3e-3, "min_lr": 3e-4,
        "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2, "log_interval": 1,
        "progress": False, "device": "cpu", "seed": 1,
    }
    return TrainConfig(**{**settings, **overrides})


def test_tiny_sssm_trains_logs_spike_rates_and_resumes_exactly(data_dir, tmp_path):
    from promethean.checkpoint import load_checkpoint
    from promethean.train.trainer import train

    straight = train(train_config(data_dir, tmp_path / "a"))
    first_leg = train(train_config(data_dir, tmp_path / "b"), until_step=4)
    resumed = train(train_config(data_dir, tmp_path / "b"), resume=first_leg.final_checkpoint)
    joined = first_leg.losses + resumed.losses
    assert [step for step, _ in joined] == list(range(1, 9))
    for (step_a, loss_a), (step_b, loss_b) in zip(straight.losses, joined, strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) < 1e-6, (step_a, loss_a, loss_b)
    assert straight.losses[-1][1] < straight.losses[0][1]
    final_a = load_checkpoint(straight.final_checkpoint).model.state_dict()
    final_b = load_checkpoint(resumed.final_checkpoint).model.state_dict()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert {"spike_rate/layer0", "spike_rate/layer2"} <= set(line)
        assert "spike_rate/layer1" not in line
        assert 0.0 <= line["spike_rate/layer0"] <= 1.0


def test_checkpoint_of_an_ssm_model_generates_the_same_text(tmp_path):
    from promethean.checkpoint import load_checkpoint, save_checkpoint
    from promethean.inference.generate import SamplingParams, generate
    from promethean.tokenizer import ByteTokenizer

    model = build("tiny-ssm", spike_threshold=0.0)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())).model
    assert loaded.config == model.config
    params = SamplingParams(max_new_tokens=12, seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert [c.token_ids for c in generate(loaded, prompts, params)] == [
        c.token_ids for c in generate(model, prompts, params)
    ]
    with_cache = generate(model, prompts)
    without = generate(model, prompts, use_cache=False)
    assert [c.token_ids for c in with_cache] == [c.token_ids for c in without]


def test_transformer_is_built_once_per_mixer_kind():
    model = Transformer(load_preset("tiny-sssm").model)
    assert [block.ssm is not None for block in model.blocks] == [True, False, True, False]
    assert [block.attn is not None for block in model.blocks] == [False, True, False, True]
    ssm = model.blocks[0].ssm
    # The SSM keeps its own initialisation through the Transformer's: A = -(1..N), D = 1.
    torch.testing.assert_close(-torch.exp(ssm.A_log[0]), -torch.arange(1.0, 17.0))
    assert torch.equal(ssm.D, torch.ones_like(ssm.D))
    assert ssm.out_proj.is_residual_projection


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_ssm_layers():
    idx = torch.randint(0, 257, (2, 40))
    results = []
    for checkpointing in (False, True):
        model = build("tiny-sssm", spike_threshold=0.0).train()
        model.gradient_checkpointing = checkpointing
        loss = model(idx, targets=idx).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_memory_estimate_of_an_sssm_training_step_is_within_25_percent_of_measured():
    import subprocess
    import sys

    from promethean.train.memory import MB, estimate_peak_memory
    from tests.test_memory import MEASURE

    overrides = {"n_layer": 2}
    spec = {"preset": "gpt2-sssm", "overrides": overrides, "micro_batch": 2, "block_size": 256,
            "dtype": "fp32", "gradient_checkpointing": False}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout) * MB
    config = load_preset("gpt2-sssm").model.with_overrides(**overrides)
    estimate = estimate_peak_memory(config, 2, 256).training_bytes
    assert abs(estimate - measured) / measured <= 0.25, (estimate / MB, measured / MB)
