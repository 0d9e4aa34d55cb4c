import pytest
import torch

from promethean.model.attention import attention_mask
from tests.conftest import build


def test_forward_returns_logits_and_loss(tiny_model):
    idx = torch.randint(0, 257, (2, 20))
    logits, loss = tiny_model(idx, targets=idx)
    assert logits.shape == (2, 20, tiny_model.config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    torch.testing.assert_close(loss, expected)
    assert tiny_model(idx).loss is None


def test_loss_ignores_minus_100_targets(tiny_model):
    idx = torch.randint(0, 257, (1, 12))
    targets = idx.clone()
    targets[0, 6:] = -100
    logits, loss = tiny_model(idx, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :6], idx[0, :6])
    torch.testing.assert_close(loss, expected)


def test_incremental_decoding_reproduces_full_forward_logits(tiny_model):
    idx = torch.randint(0, 257, (2, 70))  # longer than tiny-gemma3's window of 32
    full = tiny_model(idx).logits
    cache = tiny_model.new_cache(2, capacity=8)  # small capacity: the buffer must grow
    pieces = [tiny_model(idx[:, :45], cache=cache).logits]
    pieces += [tiny_model(idx[:, t : t + 1], cache=cache).logits for t in range(45, 70)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_model_is_causal(tiny_model):
    idx = torch.randint(0, 257, (1, 30))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 257
    a, b = tiny_model(idx).logits, tiny_model(changed).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_sliding_window_limits_what_a_token_can_see():
    # Two sliding layers of window 8: position p sees back to p - 2 * 7 and no further.
    model = build("tiny-gemma3", n_layer=2, sliding_window=8, global_layers=[])
    idx = torch.randint(0, 257, (1, 40))
    changed = idx.clone()
    changed[0, :5] = (changed[0, :5] + 1) % 257
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, 19:], b[:, 19:])  # 19 - 14 = 5: never sees 0..4
    assert not torch.allclose(a[:, 18], b[:, 18])  # 18 - 14 = 4: does


def test_sliding_layers_keep_at_most_a_window_of_keys():
    model = build("tiny-gemma3")
    cache = model.new_cache(1)
    model(torch.randint(0, 257, (1, 50)), cache=cache)
    for _ in range(30):
        model(torch.randint(0, 257, (1, 1)), cache=cache)
    window = model.config.sliding_window
    for layer, layer_cache in enumerate(cache.layers):
        held = layer_cache.filled
        assert held == (window if model.config.is_sliding_layer(layer) else 80)


def test_attention_mask_combines_causality_window_and_padding():
    slots = torch.arange(5)
    mask = attention_mask(slots, slots, window=2, left_padding=torch.tensor([0, 2]))
    expected_row0 = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    ).bool()
    assert torch.equal(mask[0, 0], expected_row0)
    # Row 1 has two padding slots: real queries never see them; pad queries see only themselves.
    assert torch.equal(mask[1, 0, 2], torch.tensor([0, 0, 1, 0, 0]).bool())
    assert torch.equal(mask[1, 0, 1], torch.tensor([0, 1, 0, 0, 0]).bool())


def test_grouped_query_attention_shares_key_value_heads():
    model = build("tiny-llama")
    attention = model.blocks[0].attn
    assert attention.k_proj.weight.shape == (model.config.head_size * 1, 128)
    assert attention.q_proj.weight.shape == (model.config.head_size * 4, 128)


def test_sequence_longer_than_context_is_refused():
    model = build("tiny-gpt2")
    with pytest.raises(ValueError, match="a sequence of 257 tokens is longer than the model's context"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied, untied = build("tiny-gpt2"), build("tiny-llama")
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight is not untied.token_embedding.weight


def test_a_few_training_steps_lower_the_loss(tiny_model):
    tiny_model.train()
    idx = torch.randint(0, 257, (4, 33))
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = tiny_model(idx[:, :-1], targets=idx[:, 1:]).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0


def test_unit_offset_rmsnorm_keeps_a_small_gain_exact_in_bf16():
    from promethean.model.layers import RMSNorm

    plain, offset = RMSNorm(4, 1e-6), RMSNorm(4, 1e-6, unit_offset=True)
    with torch.no_grad():
        plain.weight.fill_(1.001)  # rounds to 1.0 in bf16
        offset.weight.fill_(0.001)  # the same gain, stored as gain - 1
    x = torch.ones(1, 4)
    assert offset(x)[0, 0].item() == pytest.approx(1.001, abs=1e-6)
    plain.to(torch.bfloat16)
    offset.to(torch.bfloat16)
    # The gain each applies (in float32) once its weight is held in bf16:
    assert plain.weight.float()[0].item() == 1.0
    assert offset.weight.float()[0].item() + 1.0 == pytest.approx(1.001, abs=1e-5)
