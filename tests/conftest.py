import pytest
import torch

from promethean.config import load_preset
from promethean.model import Transformer

TINY_PRESETS = ["tiny-gpt2", "tiny-llama", "tiny-gemma3"]


def build(preset: str, seed: int = 0, **overrides) -> Transformer:
    config = load_preset(preset).model
    if overrides:
        config = config.with_overrides(**overrides)
    torch.manual_seed(seed)
    return Transformer(config).eval()


@pytest.fixture(params=TINY_PRESETS)
def tiny_model(request) -> Transformer:
    return build(request.param)
