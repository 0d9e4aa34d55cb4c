import contextlib
import sysconfig
from pathlib import Path

import pytest
import torch

from promethean.config import load_preset
from promethean.model import Transformer
from promethean.tokenizer import ByteTokenizer

TINY_PRESETS = ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-sssm", "tiny-ssm"]


def trained_like(model: Transformer, seed: int = 0) -> Transformer:
    """Non-zero biases and norm gains away from 1, as training leaves them: freshly initialised
    ones (0 and 1) hide any mistake in how a kernel applies them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def build(preset: str, seed: int = 0, **overrides) -> Transformer:
    config = load_preset(preset).model
    if overrides:
        config = config.with_overrides(**overrides)
    torch.manual_seed(seed)
    return Transformer(config).eval()


FAILING_SEED = 666


@contextlib.contextmanager
def sampling_fails_for_failing_seed():
    """While inside, the engine's sampling raises (as a NaN in a request's logits makes it) for
    requests whose seed is FAILING_SEED, and only for them: a failure of one request's own."""
    from promethean.inference import engine as engine_module

    original = engine_module.pick_tokens

    def failing(logits, sampling, generator):
        if sampling.seed == FAILING_SEED:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(logits, sampling, generator)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "pick_tokens", failing)
        yield


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


def python_sources() -> list[str]:
    """Real text that is always here: a few modules of the running interpreter's stdlib."""
    library = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "fnmatch.py", "shlex.py", "difflib.py", "calendar.py"]
    return [(library / name).read_text(encoding="utf-8") for name in names]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """tiny-gpt2 trained for a few seconds on Python source (bytes tokenizer): a model whose
    weights have structure, unlike a random initialisation, and a validation split to score."""
    from promethean.data.batches import TokenDataset
    from promethean.data.prepare import prepare
    from promethean.train.config import TrainConfig
    from promethean.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    prepare(python_sources(), ByteTokenizer(), data, source_name="stdlib", source_sha256="0" * 64,
            workers=1, val_fraction=0.1, progress=False)
    config = TrainConfig(model="tiny-gpt2", data=str(data), out=str(root / "run"), batch_size=8,
                         grad_accum=1, block_size=64, max_steps=120, lr=3e-3, min_lr=3e-4,
                         warmup_steps=10, eval_interval=120, eval_batches=1, log_interval=50,
                         progress=False, device="cpu", seed=1)
    result = train(config)
    torch.set_num_threads(threads)
    return result.final_checkpoint, TokenDataset(data)


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-symbol table as its encoder.py publishes it (bytes_to_unicode): an
    independent reference for the byte-level BPE code."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte], extra = chr(256 + extra), extra + 1
    return symbols


GPT2_BYTE_SYMBOLS = _gpt2_byte_symbols()
