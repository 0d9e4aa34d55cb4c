"""Memory stats and the memory planner."""

import gc
import json
import subprocess
import sys
import time

import pytest
import torch

from promethean.config import load_preset
from promethean.errors import PrometheanError
from promethean.train.memory import (
    GB,
    MB,
    estimate_peak_memory,
    get_memory_stats,
    layer_activation_elements,
    parse_memory_size,
    plan_batch,
    release_free_memory,
)
from tests.conftest import build


def test_memory_stats_report_rss_and_see_a_large_allocation():
    # Earlier tests' freed blocks may still be resident and would be reused by the allocation
    # below without RSS growing, and garbage freed mid-test would hide the growth: settle both.
    gc.collect()
    release_free_memory()
    before = get_memory_stats()
    assert set(before) >= {"rss_mb", "peak_rss_mb"}
    assert 0 < before["rss_mb"] <= before["peak_rss_mb"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    after = get_memory_stats("cpu")
    assert after["rss_mb"] - before["rss_mb"] > 50
    assert after["peak_rss_mb"] >= after["rss_mb"]
    assert not any(key.startswith(("cuda", "mps")) for key in after)
    del block


def test_memory_stats_are_cheap():
    started = time.perf_counter()
    for _ in range(100):
        get_memory_stats()
    assert (time.perf_counter() - started) / 100 < 0.005


# ------------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gemma3"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(preset):
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (2, 48))
    targets = torch.randint(0, 512, (2, 48))
    results = []
    for checkpointing in (False, True):
        model = build(preset).train()
        model.gradient_checkpointing = checkpointing
        loss = model(idx, targets).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert torch.equal(loss_plain, loss_checkpointed)
    assert grads_plain.keys() == grads_checkpointed.keys()
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_gradient_checkpointing_is_off_in_eval_and_with_a_cache():
    model = build("tiny-gpt2")
    model.gradient_checkpointing = True
    idx = torch.randint(0, 512, (1, 8))
    expected = model(idx).logits
    cache = model.new_cache(1)
    assert torch.equal(model(idx, cache=cache).logits, expected)


# ------------------------------------------------------------------ the planner against reality

# Two real optimizer steps in a fresh process (so that nothing earlier pollutes its peak): the
# second step's forward and backward run with AdamW's state allocated, as every later step does.
# Measured = peak RSS minus the RSS after importing torch and building the batch.
MEASURE = """
import json, sys
import torch
from promethean.config import load_preset
from promethean.model import Transformer
from promethean.train.memory import get_memory_stats
spec = json.loads(sys.argv[1])
config = load_preset(spec["preset"]).model.with_overrides(**spec["overrides"])
torch.manual_seed(0)
shape = (spec["micro_batch"], spec["block_size"])
idx = torch.randint(0, config.vocab_size, shape)
targets = torch.randint(0, config.vocab_size, shape)
baseline = get_memory_stats()["rss_mb"]
model = Transformer(config).train()
model.gradient_checkpointing = spec["gradient_checkpointing"]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(2):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] != "fp32"):
        loss = model(idx, targets, return_logits=False).loss  # the trainer's path
    loss.backward()
    optimizer.step()
print(json.dumps(get_memory_stats()["peak_rss_mb"] - baseline))
"""

# Model sizes the planner is for. (A tiny model at a large batch measures about 1.45x its saved
# tensors, since the allocator keeps many mid-sized freed temporaries resident; the planner is not
# calibrated for that regime, where memory is never the constraint.)
MEASURED_CASES = [
    ("gpt2-small", {"n_layer": 4}, 2, 256, "fp32", False),
    ("gpt2-small", {"n_layer": 4}, 2, 256, "fp32", True),
]


@pytest.mark.parametrize("preset, overrides, micro_batch, block_size, dtype, checkpointing", MEASURED_CASES)
def test_estimate_is_within_25_percent_of_a_measured_training_step(
    preset, overrides, micro_batch, block_size, dtype, checkpointing
):
    spec = {"preset": preset, "overrides": overrides, "micro_batch": micro_batch, "block_size": block_size,
                "dtype": dtype, "gradient_checkpointing": checkpointing}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout) * MB
    config = load_preset(preset).model.with_overrides(**overrides)
    estimate = estimate_peak_memory(config, micro_batch, block_size, dtype, checkpointing)
    error = abs(estimate.training_bytes - measured) / measured
    print(f"{preset} {overrides} {micro_batch}x{block_size} {dtype} checkpointing={checkpointing}: "
          f"estimated {estimate.training_bytes / MB:.0f} MB, measured {measured / MB:.0f} MB ({error:.0%})")
    assert error <= 0.25


def test_layer_activations_match_what_autograd_saves():
    """The per-layer count in the docstring, against the tensors autograd really keeps."""
    for preset in ("tiny-gpt2", "tiny-llama", "tiny-gemma3"):
        # One- and two-layer models; Gemma's global layer list must go for them to be valid.
        original = load_preset(preset).model
        no_global = {"global_layers": None} if original.global_layers else {}
        config = original.with_overrides(**no_global)
        saved = []
        for layers in (1, 2):
            model = build(preset, n_layer=layers, **no_global).train()
            storages = {}
            parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

            def pack(tensor, storages=storages):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            idx = torch.randint(0, 512, (2, 16))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model(idx, idx)
            saved.append(sum(size for key, size in storages.items() if key not in parameters))
        per_token = (saved[1] - saved[0]) / 32
        expected = 4 * layer_activation_elements(config)
        assert abs(per_token - expected) / expected < 0.05, (preset, per_token, expected)


def test_checkpointing_and_autocast_move_the_estimate_the_right_way():
    config = load_preset("gpt2-small").model
    plain = estimate_peak_memory(config, 8, 1024, "fp32", False)
    checkpointed = estimate_peak_memory(config, 8, 1024, "fp32", True)
    assert checkpointed.total < 0.7 * plain.total
    assert plain.weights == 4 * 124_439_808 and plain.optimizer == 8 * 124_439_808
    assert estimate_peak_memory(config, 8, 1024, "bf16", False).autocast_weights > 0
    low = estimate_peak_memory(config, 8, 1024, "fp32", False, optimizer="adamw-bf16")
    assert low.optimizer == 4 * 124_439_808 and low.total < plain.total
    with pytest.raises(PrometheanError, match="the memory planner knows adamw, adamw-bf16, sgd, not 'lion'"):
        estimate_peak_memory(config, 8, 1024, "fp32", False, optimizer="lion")


def test_gpt2_small_plan_fits_8gb():
    config = load_preset("gpt2-small").model
    micro, accum = plan_batch(config, 1024, parse_memory_size("8GB"), 8, "bf16", True)
    assert micro >= 2 and micro * accum >= 8
    assert estimate_peak_memory(config, micro, 1024, "bf16", True).total <= 8 * GB
    assert plan_batch(config, 1024, 64 * GB, 8, "fp32", False) == (8, 1)
    micro, accum = plan_batch(config, 1024, 8 * GB, 16 * 1024, "bf16", True, target_unit="tokens")
    assert micro * accum >= 16


def test_plan_says_what_would_fit_when_nothing_does():
    config = load_preset("gpt2-small").model
    with pytest.raises(PrometheanError) as error:
        plan_batch(config, 1024, 2 * GB, 8, "fp32", False)
    message = str(error.value)
    assert message.startswith("gpt2-small needs about ") and "at micro-batch 1, block 1024" in message
    assert "the budget is 2.0 GB; try --set gradient_checkpointing=true or a shorter block." in message


@pytest.mark.parametrize("text, size", [("8GB", 8 * GB), ("512MB", 512 * MB), ("1.5GiB", int(1.5 * GB)),
                                        ("2 gb", 2 * GB), ("1000", 1000)])
def test_memory_sizes_parse(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "8 parsecs", "-1GB", "0MB", "8GB8"])
def test_bad_memory_sizes_are_one_sentence(text):
    with pytest.raises(PrometheanError, match=r"memory size"):
        parse_memory_size(text)
