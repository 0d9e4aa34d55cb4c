"""Many LoRA adapters in one batch: a row with an adapter gets the logits of the model with that
adapter (against PyTorch's own LoRA hooks), bit for bit the same whatever it is batched with (the
base, other adapters, alone), in the fused decode step as in the layers; slots are shared, reused
least recently used first, refused when all are held, and never leak; prefixes are reused within
an adapter only."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.continual.adapters import Adapters, LoraConfig
from promethean.errors import PrometheanError
from promethean.inference.adapter_slots import (
    AdapterSlots,
    AdapterSlotsFullError,
    slot_adapter,
)
from promethean.inference.engine import Engine
from promethean.inference.generate import SamplingParams
from promethean.inference import kernels
from promethean.inference.quantize import prepare_for_inference
from tests.conftest import (
    FAILING_SEED,
    build,
    sampling_fails_for_failing_seed,
    trained_like,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.available(),
                                 reason="the CPU kernels cannot run here")]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LAYER = (*ATTENTION, "gate_proj", "up_proj", "down_proj", "lm_head")
SSM = ("in_proj", "x_proj", "dt_proj", "out_proj")


def with_adapters(preset: str, specs: dict[str, tuple[int, tuple[str, ...]]], seed: int = 0):
    """A trained-like base model, a copy carrying `specs` ({name: (rank, targets)}) as PyTorch
    LoRA hooks with random non-zero B, and each adapter's matrices as `Adapters` saves them."""
    base = trained_like(build(preset, seed=seed), seed=seed)
    reference = copy.deepcopy(base)
    adapters = Adapters(reference)
    saved = {}
    generator = torch.Generator().manual_seed(seed + 1)
    for name, (rank, targets) in specs.items():
        info = adapters.add(name, LoraConfig(rank=rank, alpha=2.0 * rank,
                                             target_modules=targets), activate=False)
        with torch.no_grad():
            for tensor in adapters.lora_B[name].values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        parameters = adapters.trainable_parameters(name)
        saved[name] = ({module: (parameters[f"{module}.lora_A"], parameters[f"{module}.lora_B"])
                        for module in info.modules}, info.config.scaling)
    return base, reference.eval(), adapters, saved


def slotted(base, saved, slots: int, dtype: str):
    model = prepare_for_inference(copy.deepcopy(base), dtype).eval()
    pool = AdapterSlots(model, slots)
    laid_out = {name: slot_adapter(model, name, name, matrices, scaling)
                for name, (matrices, scaling) in saved.items()}
    return model, pool, laid_out


def run_rows(model, pool, prompts: list[list[int]], slots: list[int], steps: int):
    """Prefill `prompts` together (left-padded) with each row's adapter slot, then `steps`
    decode steps feeding tokens 1, 2, ...: each step's last logits, (rows, steps + 1, vocab)."""
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for pad, p in zip(padding, prompts)])
    pool.set_rows(slots)
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), capacity=longest + steps + 1,
                                left_padding=torch.tensor(padding) if any(padding) else None)
        logits = [model(ids, cache=cache, last_logits_only=True).logits[:, -1]]
        for step in range(steps):
            feed = torch.full((len(prompts), 1), step + 1)
            logits.append(model(feed, cache=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


def reference_rows(reference, adapters, prompts, names, steps):
    rows = []
    with torch.inference_mode():
        for prompt, name in zip(prompts, names):
            with adapters.using(name):
                sequence = prompt + list(range(1, steps + 1))
                logits = reference(torch.tensor([sequence])).logits[0]
                rows.append(logits[len(prompt) - 1 :])
    return torch.stack(rows)


CASES = [("tiny-gpt2", "fp32"), ("tiny-gpt2", "bf16"), ("tiny-llama", "fp32"),
         ("tiny-llama", "bf16"), ("tiny-llama", "int8"), ("tiny-gemma3", "fp32"),
         ("tiny-gemma3", "bf16"), ("tiny-sssm", "fp32"), ("tiny-sssm", "bf16")]
# The largest error against PyTorch's fp32 hooks, as a share of the largest logit: fp32 sums
# in another order; bf16 rounds activations and holds the adapters in bf16; int8 quantizes the
# base weights too.
TOLERANCE = {"fp32": 1e-5, "bf16": 0.06, "int8": 0.08}


@pytest.mark.parametrize("preset,dtype", CASES)
def test_each_row_gets_its_adapter_whatever_it_is_batched_with(preset, dtype):
    """Three rows of uneven length (left padding), one per adapter and one for the base,
    prefilled and decoded together: each row's logits are those of PyTorch's LoRA hooks within
    rounding (the adapters' effect is far larger), and bit for bit those of the row alone; the
    base row is bit for bit the model without adapters. Adapters of different ranks touching
    different layers (q/v only; every layer and the head; the SSM's projections)."""
    specs = {"wide": (4, EVERY_LAYER + (SSM if preset == "tiny-sssm" else ())),
             "narrow": (8, ("q_proj", "v_proj") if preset != "tiny-sssm" else ("in_proj", "out_proj"))}
    base, reference, adapters, saved = with_adapters(preset, specs)
    model, pool, laid_out = slotted(base, saved, 3, dtype)
    wide, narrow = pool.acquire(laid_out["wide"]), pool.acquire(laid_out["narrow"])
    pool.install_pending()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (9, 14, 5)]
    names, slots = ["wide", None, "narrow"], [wide, -1, narrow]
    steps = 4
    fused = model.fused_decode if getattr(model, "fused_decode", None) is not None else None
    calls = [0]
    if fused is not None:
        step = fused.step

        def counted(*args):
            calls[0] += 1
            return step(*args)

        fused.step = counted
    together = run_rows(model, pool, prompts, slots, steps)
    if fused is not None:
        assert calls[0] == steps  # the decode steps ran fused, adapters and all
    for row, slot in enumerate(slots):
        alone = run_rows(model, pool, [prompts[row]], [slot], steps)
        assert torch.equal(alone[0], together[row])
    plain = prepare_for_inference(copy.deepcopy(base), dtype).eval()
    with torch.inference_mode():
        cache = plain.new_cache(1, capacity=30)
        expected = [plain(torch.tensor([prompts[1]]), cache=cache).logits[:, -1]]
        for step in range(steps):
            expected.append(plain(torch.tensor([[step + 1]]), cache=cache).logits[:, -1])
    assert torch.equal(torch.cat(expected), together[1])

    wanted = reference_rows(reference, adapters, prompts, names, steps)
    unadapted = reference_rows(reference, adapters, prompts, [None] * 3, steps)
    scale = wanted.abs().max().item()
    error = (together.float() - wanted).abs().amax(dim=(1, 2))
    effect = (wanted - unadapted).abs().amax(dim=(1, 2))
    assert (error <= TOLERANCE[dtype] * scale).all(), (error, scale)
    for row in (0, 2):  # an adapter moves the logits by far more than the rounding
        assert effect[row] > 5 * error[row] and effect[row] > 0.01 * scale, (effect, error)


def test_slots_are_shared_reused_least_recently_used_and_refused_when_all_are_held():
    base, _, _, saved = with_adapters("tiny-llama", {name: (2 + i, EVERY_LAYER)
                                                     for i, name in enumerate("abc")})
    model, pool, laid_out = slotted(base, saved, 2, "fp32")
    first = pool.acquire(laid_out["a"])
    assert pool.acquire(laid_out["a"]) == first and pool.users[first] == 2  # shared
    second = pool.acquire(laid_out["b"])
    with pytest.raises(AdapterSlotsFullError, match="all 2 adapter slots are in use by "
                       "requests in flight; retry when one of them finishes."):
        pool.acquire(laid_out["c"])
    pool.release(second)
    assert pool.acquire(laid_out["c"]) == second  # b's slot, which nobody held, goes to c
    pool.release(first)
    pool.release(first)
    pool.release(second)
    assert pool.acquire(laid_out["a"]) == first  # still held there: no rewrite
    assert pool.acquire(laid_out["b"]) == second  # the least recently used free slot
    pool.install_pending()
    assert pool.nbytes == sum(layer.lora_down.numel() * 4 + layer.lora_up.numel() * 4
                              for layer in pool.layers.values() if layer.lora_down is not None)
    assert pool.dtype == torch.float32  # an fp32 model's adapters stay fp32 (bf16: bf16)
    # The slots hold b and a now, and compute them as slots holding only them do.
    fresh_model, fresh, fresh_laid_out = slotted(base, {"b": saved["b"]}, 1, "fp32")
    fresh.acquire(fresh_laid_out["b"])
    fresh.install_pending()
    prompt = [[5, 6, 7, 8]]
    assert torch.equal(run_rows(model, pool, prompt, [second], 2),
                       run_rows(fresh_model, fresh, prompt, [0], 2))


def test_an_adapter_the_model_cannot_take_is_refused_with_a_sentence():
    base, _, _, saved = with_adapters("tiny-llama", {"a": (4, ATTENTION)})
    model = prepare_for_inference(copy.deepcopy(base), "fp32")
    matrices, scaling = saved["a"]
    with pytest.raises(PrometheanError, match="the adapter 'a' changes 'blocks.9.attn.q_proj', "
                       "which this model cannot take an adapter on"):
        slot_adapter(model, "a", "a", {"blocks.9.attn.q_proj": matrices["blocks.0.attn.q_proj"]},
                     scaling)
    a, b = matrices["blocks.0.attn.q_proj"]
    with pytest.raises(PrometheanError, match=r"the adapter 'a' has matrices of shapes "
                       r"\(4, \d+\) and \(\d+, 4\) for 'blocks.0.attn.q_proj', which needs"):
        slot_adapter(model, "a", "a", {"blocks.0.attn.q_proj": (a, b[:-1])}, scaling)
    with pytest.raises(PrometheanError, match="serves no adapters"):
        engine = Engine(model, max_adapters=0)
        try:
            engine.submit([1, 2], SamplingParams(max_new_tokens=1), adapter=object())
        finally:
            engine.shutdown()


ENGINE_SPECS = {"a": (4, EVERY_LAYER), "b": (2, ("q_proj", "v_proj")), "c": (6, ("lm_head",))}
ENGINE_BASE, _, _, ENGINE_SAVED = with_adapters("tiny-gpt2", ENGINE_SPECS, seed=4)


def engine_with(slots: int, **settings):
    model = prepare_for_inference(copy.deepcopy(ENGINE_BASE), "fp32").eval()
    engine = Engine(model, max_batch_size=8, max_adapters=slots, **settings)
    laid_out = {name: slot_adapter(model, name, name, matrices, scaling)
                for name, (matrices, scaling) in ENGINE_SAVED.items()}
    return engine, laid_out


def params_for(kind: str, tokens: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(max_new_tokens=tokens, temperature=0, logprobs=0)
    return SamplingParams(max_new_tokens=tokens, temperature=0.9, top_k=40, seed=tokens,
                          logprobs=0)


ALONE_ENGINE, ALONE_ADAPTERS = engine_with(3)
ALONE_ANSWERS: dict = {}


def alone(prompt: tuple, adapter: str | None, kind: str, tokens: int):
    """What the request answers when it is the only one in flight."""
    key = (prompt, adapter, kind, tokens)
    if key not in ALONE_ANSWERS:
        weights = ALONE_ADAPTERS[adapter] if adapter is not None else None
        completion = ALONE_ENGINE.submit(list(prompt), params_for(kind, tokens),
                                         adapter=weights).result(timeout=60)
        ALONE_ANSWERS[key] = (completion.token_ids, completion.logprobs)
    return ALONE_ANSWERS[key]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([None, "a", "b", "c"]),
                          st.lists(st.integers(0, 255), min_size=1, max_size=12),
                          st.sampled_from(["greedy", "sampled"]), st.integers(1, 6),
                          st.sampled_from(["ok", "ok", "ok", "cancelled", "fails"])),
                min_size=1, max_size=10))
def test_mixed_adapter_requests_answer_as_each_does_alone(requests):
    """Requests for the base and three adapters (different ranks and layers) in flight together,
    some cancelled at once, some failing in their own sampling, in 3 slots: every other one
    answers the tokens and log-probabilities it answers alone, bit for bit; afterwards no slot
    is held and the engine serves on."""
    from promethean.inference.engine import RequestFailedError

    engine, laid_out = ENGINE
    with sampling_fails_for_failing_seed():
        handles = []
        for adapter, prompt, kind, tokens, fate in requests:
            params = (SamplingParams(max_new_tokens=tokens, temperature=0.9, seed=FAILING_SEED)
                      if fate == "fails" else params_for(kind, tokens))
            handle = engine.submit(prompt, params,
                                   adapter=laid_out[adapter] if adapter is not None else None)
            if fate == "cancelled":
                handle.cancel()
            handles.append(handle)
        for handle, (adapter, prompt, kind, tokens, fate) in zip(handles, requests):
            if fate == "fails":
                with pytest.raises(RequestFailedError):
                    handle.result(timeout=60)
                continue
            completion = handle.result(timeout=60)
            if completion.finish_reason != "cancelled":
                assert (completion.token_ids, completion.logprobs) == \
                    alone(tuple(prompt), adapter, kind, tokens)
    assert engine.adapters.users == [0, 0, 0]
    assert engine.alive


ENGINE = engine_with(3)


def test_a_new_adapter_waits_for_a_slot_and_an_old_one_is_rewritten_correctly():
    """Two slots, three adapters: the third is refused while the other two are in flight (the
    request fails alone: the others finish as they would), taken once one ends, and every
    adapter still answers as it does alone after its slot was rewritten by the others."""
    engine, laid_out = engine_with(2)
    try:
        long = SamplingParams(max_new_tokens=40, temperature=0, logprobs=0)
        first = engine.submit([1, 2, 3], long, adapter=laid_out["a"])
        second = engine.submit([4, 5], long, adapter=laid_out["b"])
        with pytest.raises(AdapterSlotsFullError):
            engine.submit([6], long, adapter=laid_out["c"])
        base = engine.submit([7, 8], long)  # the base needs no slot
        for handle, (prompt, adapter) in zip((first, second, base),
                                             (([1, 2, 3], "a"), ([4, 5], "b"), ([7, 8], None))):
            completion = handle.result(timeout=60)
            assert (completion.token_ids, completion.logprobs) == \
                alone(tuple(prompt), adapter, "greedy", 40)
        for round_ in range(2):
            for name in ("c", "a", "b", "c"):
                completion = engine.submit([9, 10, round_], params_for("sampled", 5),
                                           adapter=laid_out[name]).result(timeout=60)
                assert (completion.token_ids, completion.logprobs) == \
                    alone((9, 10, round_), name, "sampled", 5)
        assert engine.adapters.users == [0, 0]
        counters = engine.counters()
        assert counters["adapter_slots"] == 2 and counters["adapter_slots_in_use"] == 0
        assert counters["adapter_bytes"] == engine.adapters.nbytes > 0
    finally:
        engine.shutdown()


def test_a_prefix_is_reused_by_requests_for_the_same_adapter_only():
    engine, laid_out = engine_with(3, prefix_cache_bytes=8 << 20)
    try:
        stem = list(range(40, 80))
        params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=0)
        engine.submit(stem, params, adapter=laid_out["a"]).result(timeout=60)
        longer = stem + [1, 2, 3]
        for_b = engine.submit(longer, params, adapter=laid_out["b"]).result(timeout=60)
        assert engine.prefixes.stats.hits == 0  # a's keys and values are not b's
        assert (for_b.token_ids, for_b.logprobs) == alone(tuple(longer), "b", "greedy", 4)
        for_a = engine.submit(longer, params, adapter=laid_out["a"]).result(timeout=60)
        assert engine.prefixes.stats.hits == 1
        assert (for_a.token_ids, for_a.logprobs) == alone(tuple(longer), "a", "greedy", 4)
        base = engine.submit(longer, params).result(timeout=60)
        assert engine.prefixes.stats.hits == 1
        assert (base.token_ids, base.logprobs) == alone(tuple(longer), None, "greedy", 4)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "silu_mul", "softplus"])
@pytest.mark.parametrize("weight_format", ["fp32", "bf16", "int8"])
def test_the_products_update_add_each_rows_adapter_before_the_activation(weight_format,
                                                                          activation):
    """`kernels.linear` with slots against an fp64 computation of act(x W^T + b + x A^T B^T)
    (gate and up each getting their rows before act(gate) * up), an odd K, a rank that is not a
    multiple of 16, bf16 or fp32 slots; rows without an adapter are bit for bit the plain
    product, and each row alone is bit for bit the row in the batch."""
    from promethean.inference.kernel_layers import quantize_rows

    gated = activation.endswith("_mul")
    generator = torch.Generator().manual_seed(7)
    K, N, R, slots = 37, 70, 11, 3
    rows = 2 * N if gated else N
    weight = torch.randn(rows, K, generator=generator) * 0.2
    bias = torch.randn(rows, generator=generator) * 0.1
    scales = None
    if weight_format == "int8":
        quantized, scales = quantize_rows(weight)
        packed = kernels.pack_linear(quantized, gated)
        effective = quantized.double() * scales[:, None].double()
    else:
        typed = weight.to(torch.bfloat16) if weight_format == "bf16" else weight
        packed, effective = kernels.pack_linear(typed, gated), typed.double()
    x_dtype = torch.float32 if weight_format == "fp32" else torch.bfloat16
    slot_dtype = torch.float32 if weight_format == "fp32" else torch.bfloat16
    down = (torch.randn(slots, K, R, generator=generator) * 0.3).to(slot_dtype)
    up = (torch.randn(slots, R, rows, generator=generator) * 0.3).to(slot_dtype)
    x = torch.randn(3, 4, K, generator=generator).to(x_dtype)
    row_slots = torch.tensor([0, -1, 2, 1, 1, 1, -1, 0, 2, 2, 0, -1])
    got = kernels.linear(x, packed, N, scales, bias, activation, (down, up, row_slots))
    flat = x.reshape(-1, K).double()
    pre = flat @ effective.t() + bias.double()
    for m, slot in enumerate(row_slots.tolist()):
        if slot >= 0:
            pre[m] += (flat[m] @ down[slot].double()) @ up[slot].double()
    functions = {"none": lambda v: v, "softplus": torch.nn.functional.softplus,
                 "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}
    if gated:
        gate = torch.nn.functional.silu(pre[:, :N]) if activation == "silu_mul" else \
            torch.nn.functional.gelu(pre[:, :N], approximate="tanh")
        expected = gate * pre[:, N:]
    else:
        expected = functions[activation](pre)
    tolerance = 1e-5 if x_dtype == torch.float32 else 2e-2
    error = (got.reshape(-1, N).double() - expected).abs().max().item()
    assert error <= tolerance * max(1.0, expected.abs().max().item()), error
    plain = kernels.linear(x, packed, N, scales, bias, activation).reshape(-1, N)
    assert torch.equal(plain[row_slots < 0], got.reshape(-1, N)[row_slots < 0])
    alone = torch.cat([kernels.linear(flat[m : m + 1].to(x_dtype), packed, N, scales, bias,
                                      activation, (down, up, row_slots[m : m + 1]))
                       for m in range(len(row_slots))])
    assert torch.equal(alone, got.reshape(-1, N))


@pytest.mark.skipif(kernels.available() and kernels.instruction_set() != "avx512",
                    reason="this CPU lacks AVX-512 with bf16 and VNNI: only the AVX2 kernels "
                    "run here, so there is no second instruction set to compare with")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_with_adapters_give_the_same_logits_on_avx2_as_on_avx512(dtype):
    base, _, _, saved = with_adapters("tiny-llama", {"a": (4, EVERY_LAYER), "b": (8, ATTENTION)})
    model, pool, laid_out = slotted(base, saved, 2, dtype)
    slots = [pool.acquire(laid_out["a"]), -1, pool.acquire(laid_out["b"])]
    pool.install_pending()
    prompts = [[5, 17, 3, 99, 42, 7, 1], [8, 250], [1, 2, 3]]
    wide = run_rows(model, pool, prompts, slots, 4)
    kernels.use_instruction_set("avx2")
    try:
        narrow = run_rows(model, pool, prompts, slots, 4)
    finally:
        kernels.use_instruction_set("avx512")
    assert torch.equal(wide, narrow)


def test_a_saved_adapter_is_read_without_a_model_and_refused_for_another_base(tmp_path):
    """`read_adapter` gives back what `Adapters.save` wrote; another base's sha256, or a tensor
    removed from the file, is refused with a sentence."""
    from safetensors.torch import load_file, save_file

    from promethean.continual.adapters import AdapterError, model_sha256, read_adapter
    from promethean.files import write_checksums

    base, _, adapters, saved = with_adapters("tiny-llama", {"a": (4, ATTENTION)})
    adapters.save("a", tmp_path / "a")
    read = read_adapter(tmp_path / "a", adapters.base_sha256)
    assert read.name == "a" and read.config.scaling == saved["a"][1]
    assert read.matrices.keys() == saved["a"][0].keys()
    for module, (a, b) in saved["a"][0].items():
        assert torch.equal(read.matrices[module][0], a) and torch.equal(read.matrices[module][1], b)
    with pytest.raises(AdapterError, match="was made for a different base model"):
        read_adapter(tmp_path / "a", model_sha256(build("tiny-llama", seed=9)))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    del tensors["blocks.0.attn.q_proj.lora_B"]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    write_checksums(tmp_path / "a")
    with pytest.raises(AdapterError, match="is missing tensor 'blocks.0.attn.q_proj.lora_B'"):
        read_adapter(tmp_path / "a", adapters.base_sha256)
