import pytest
import torch

from promethean.device import resolve_device, resolve_dtype
from promethean.errors import PrometheanError
from promethean.inference.generate import SamplingParams, generate


def test_auto_picks_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_sentence():
    with pytest.raises(PrometheanError, match="device 'cuda' was requested but no CUDA GPU is available."):
        resolve_device("cuda")


def test_nonsense_device_and_dtype():
    with pytest.raises(PrometheanError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    with pytest.raises(PrometheanError, match="unknown dtype 'fp8'; use one of fp32, bf16, fp16."):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_track_fp32(tiny_model, dtype):
    idx = torch.randint(0, 257, (2, 24))
    reference = tiny_model(idx).logits
    half = tiny_model.to(dtype)(idx).logits
    assert half.dtype == dtype
    assert (half.float() - reference).abs().max() < 0.1
    completion = generate(tiny_model, [[1, 2, 3]], SamplingParams(max_new_tokens=8, seed=0))[0]
    assert len(completion.token_ids) == 8
