import pytest
import torch

from promethean.config import load_preset
from promethean.model import Transformer

TINY_PRESETS = ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-sssm", "tiny-ssm"]


def build(preset: str, seed: int = 0, **overrides) -> Transformer:
    config = load_preset(preset).model
    if overrides:
        config = config.with_overrides(**overrides)
    torch.manual_seed(seed)
    return Transformer(config).eval()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the models are tiny, so one thread is as fast, and it does
    not thrash when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=TINY_PRESETS)
def tiny_model(request) -> Transformer:
    return build(request.param)


def generated_documents(count: int = 60) -> list[str]:
    """Small, varied, deterministic documents for training tests."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
    return [
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) + f" {i}."
        for i in range(count)
    ]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A prepared token directory (bytes tokenizer, 10% validation) shared by training tests."""
    from promethean.data.prepare import prepare
    from promethean.tokenizer import ByteTokenizer

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(generated_documents(), ByteTokenizer(), out, source_name="generated",
            source_sha256="0" * 64, workers=1, val_fraction=0.1, progress=False)
    return out
