"""The model's linear layers (`promethean.model.layers.Linear`): fp32 CPU products on oneDNN (on
AMD CPUs MKL runs a slow path), with gradients checked against float64 products, and F.linear
wherever oneDNN is not the better choice."""

import pytest
import torch
import torch.nn.functional as F

from promethean.model import layers
from promethean.model.layers import Linear, linear

needs_onednn = pytest.mark.skipif(not layers._onednn_linear_works(),
                                  reason="this PyTorch has no working oneDNN dense linear")


def float64_products(x, weight, bias, grad):
    """(y, grad x, grad weight, grad bias) of y = x W^T + b, computed in float64."""
    x64, w64, g64 = x.double(), weight.double(), grad.double()
    rows, grads = x64.reshape(-1, x.shape[-1]), g64.reshape(-1, weight.shape[0])
    y = x64 @ w64.t() + (bias.double() if bias is not None else 0)
    grad_bias = grads.sum(0) if bias is not None else None
    return y, (grads @ w64).view(x.shape), grads.t() @ rows, grad_bias


@needs_onednn
@pytest.mark.parametrize("shape", [(64, 48), (3, 17, 48), (0, 48)])
@pytest.mark.parametrize("features", [(48, 100), (48, 20)])  # widening and narrowing
def test_forward_and_gradients_equal_float64_products(shape, features):
    generator = torch.Generator().manual_seed(0)
    layer = Linear(*features)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(features[1], generator=generator))
    x = torch.randn(shape, generator=generator, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=generator)
    y.backward(grad)
    want_y, want_x, want_w, want_b = float64_products(x, layer.weight, layer.bias, grad)
    assert y.shape == (*shape[:-1], features[1])
    for got, want in ((y, want_y), (x.grad, want_x), (layer.weight.grad, want_w),
                      (layer.bias.grad, want_b)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_non_contiguous_input_and_no_bias_give_the_same_gradients():
    generator = torch.Generator().manual_seed(1)
    layer = Linear(32, 40, bias=False)
    base = torch.randn(32, 20, generator=generator, requires_grad=True)
    x = base.t()  # (20, 32), not contiguous
    y = layer(x)
    grad = torch.randn(y.shape, generator=generator)
    y.backward(grad)
    want_y, want_x, want_w, _ = float64_products(x.detach(), layer.weight, None, grad)
    assert torch.allclose(y.double(), want_y, atol=1e-5)
    assert torch.allclose(base.grad.t().double(), want_x, atol=1e-5)
    assert torch.allclose(layer.weight.grad.double(), want_w, atol=1e-5)


def test_where_onednn_is_not_the_better_choice_the_result_is_f_linears(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(30, 16, generator=generator), torch.randn(30, generator=generator)
    few_rows = torch.randn(layers.ONEDNN_MIN_ROWS - 1, 16, generator=generator)
    assert torch.equal(linear(few_rows, weight, bias), F.linear(few_rows, weight, bias))
    rows = torch.randn(64, 16, generator=generator)
    half = rows.bfloat16(), weight.bfloat16(), bias.bfloat16()
    assert torch.equal(linear(*half), F.linear(*half))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(rows, weight, bias), F.linear(rows, weight, bias))
    monkeypatch.setattr(layers, "_onednn_linear_works", lambda: False)
    assert torch.equal(linear(rows, weight, bias), F.linear(rows, weight, bias))


@needs_onednn
def test_a_forward_hook_and_checkpointing_work_as_on_nn_linear():
    from torch.utils.checkpoint import checkpoint

    generator = torch.Generator().manual_seed(3)
    layer = Linear(24, 24)
    x = torch.randn(16, 24, generator=generator, requires_grad=True)
    handle = layer.register_forward_hook(lambda _module, _args, output: output * 2)
    assert torch.allclose(layer(x), 2 * F.linear(x, layer.weight, layer.bias), atol=1e-5)
    handle.remove()
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    recomputed = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = layer.bias.grad = None
    layer(x).sum().backward()
    assert torch.equal(x.grad, recomputed[0]) and torch.equal(layer.weight.grad, recomputed[1])
