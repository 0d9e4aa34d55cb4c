"""The chunked head + cross-entropy equals the plain path: loss and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from promethean.model.loss import linear_cross_entropy
from tests.conftest import TINY_PRESETS, build


def _inputs(rows=70, width=16, vocab=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=generator) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -100
    return hidden, weight, targets


def _plain(hidden, weight, targets, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
    hidden.grad = weight.grad = None
    (loss * 3).backward()  # an upstream gradient other than 1 must scale both gradients
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _fused(hidden, weight, targets, autocast=False, chunk_elements=7 * 300, recast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=chunk_elements,
                                    recast_weight_slices=recast)
    hidden.grad = weight.grad = None
    (loss * 3).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_elements", [300, 7 * 300, 1 << 24])  # 1 row, uneven, one chunk
def test_fp32_loss_and_gradients_equal_the_plain_path(chunk_elements):
    hidden, weight, targets = _inputs()
    expected = _plain(hidden, weight, targets)
    got = _fused(hidden, weight, targets, chunk_elements=chunk_elements)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recast", [False, True])
def test_bf16_autocast_matches_the_plain_autocast_path(recast, monkeypatch):
    # Both round the logits and the logit gradients to bf16 (with different roundings), so the
    # loss agrees to ~1e-3 relative and gradients to a few bf16 steps of their largest entry.
    monkeypatch.setattr("promethean.model.loss._VOCAB_SLICE", 96)  # several uneven slices
    hidden, weight, targets = _inputs(rows=200, width=32, vocab=500)
    expected = _plain(hidden, weight, targets, autocast=True)
    got = _fused(hidden, weight, targets, autocast=True, recast=recast)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    for ours, theirs in zip(got[1:], expected[1:], strict=True):
        assert ours.dtype == theirs.dtype == torch.float32
        assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()


def test_a_target_far_below_the_best_logit_keeps_an_exact_finite_loss():
    hidden, weight, targets = _inputs(rows=4, vocab=50)
    with torch.no_grad():
        weight[targets[1]] = -hidden[1] * 200 / hidden[1].square().sum()  # logit -200
        weight[(targets[1] + 1) % 50] = hidden[1] * 200 / hidden[1].square().sum()
    expected = _plain(hidden, weight, targets)
    got = _fused(hidden, weight, targets)
    assert expected[0] > 50 and math.isfinite(got[0].item())
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


def test_no_targets_give_nan_like_cross_entropy_and_no_grad_mode_works():
    hidden, weight, targets = _inputs(rows=6)
    assert math.isnan(linear_cross_entropy(hidden, weight, torch.full_like(targets, -100)).item())
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(hidden, weight, targets)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_transformer_training_path_equals_the_logits_path(preset):
    """`return_logits=False` (what the trainer uses) gives the same loss and the same gradients
    for every parameter, including a head tied to the embeddings."""
    model = build(preset).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -100
    plain = model(idx, targets)
    plain.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = model(idx, targets, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
