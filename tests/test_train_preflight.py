"""Pre-flight: a run that cannot work is refused with one sentence before any training starts."""

import os
import subprocess
import sys

import pytest

from promethean.config import load_preset
from promethean.data.prepare import prepare, tokenizer_record
from promethean.errors import CheckpointError, PrometheanError
from promethean.tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer
from promethean.train.config import TrainConfig
from promethean.train.memory import GB, fit_to_budget, plan_batch
from promethean.train.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DOCS = [f"the quick brown fox {i} jumps over the lazy dog." for i in range(60)]


# Tiny models: one thread is as fast and does not thrash a busy machine (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "bytes"
    prepare(DOCS, ByteTokenizer(), out, source_name="generated", source_sha256="0" * 64,
            workers=1, val_fraction=0.1, progress=False)
    return out


def config(data_dir, out, **overrides):
    settings = dict(model="tiny-gpt2", data=str(data_dir), out=str(out), batch_size=2,
                    block_size=16, max_steps=2, warmup_steps=0, eval_interval=2, progress=False)
    return TrainConfig(**{**settings, **overrides})


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def small_vocab_preset(tmp_path):
    path = tmp_path / "small.toml"
    text = (load_preset("tiny-gpt2").model.model_dump(exclude={"name"}))
    lines = ['tokenizer = "bytes"', "[model]"] + [
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else list(v) if isinstance(v, tuple) else v}"
        for k, v in {**text, "vocab_size": 100}.items() if v is not None]
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def test_data_vocabulary_larger_than_the_model_is_refused(data_dir, tmp_path):
    preset = small_vocab_preset(tmp_path)
    sentence = (f"{data_dir} was prepared with a bytes tokenizer of 257 ids but the model's "
                "vocabulary is only 100; prepare the data with the model's tokenizer or give the "
                "model a larger vocab_size.")
    with pytest.raises(PrometheanError) as error:
        train(config(data_dir, tmp_path / "run", model=str(preset)))
    assert str(error.value) == sentence
    assert not (tmp_path / "run").exists()  # nothing started
    result = cli("pretrain", "--preset", str(preset), "--set", f"data={str(data_dir)!r}",
                 "--set", f"out={str(tmp_path / 'run')!r}")
    assert result.returncode == 1 and result.stderr.strip() == f"error: {sentence}"


def test_finetuning_on_data_of_another_tokenizer_is_refused(data_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    assert cli("model", "init", "tiny-gpt2", "--out", str(checkpoint)).returncode == 0
    char = train_tokenizer("char", DOCS)
    other = tmp_path / "chardata"
    prepare(DOCS, char, other, source_name="generated", source_sha256="0" * 64, workers=1,
            val_fraction=0.1, progress=False)
    own = tokenizer_record(load_tokenizer(checkpoint))["fingerprint"]
    sentence = (f"{other} was prepared with a char tokenizer (fingerprint "
                f"{char.fingerprint[:12]}) but the checkpoint {checkpoint} uses a bytes tokenizer "
                f"(fingerprint {own[:12]}); prepare the data with --tokenizer {checkpoint}.")
    with pytest.raises(PrometheanError) as error:
        train(config(other, tmp_path / "run", model=str(checkpoint)))
    assert str(error.value) == sentence
    toml = tmp_path / "ft.toml"
    toml.write_text(f'model = "x"\ndata = "{other}"\nout = "{tmp_path / "run"}"\n')
    result = cli("finetune", str(toml), "--checkpoint", str(checkpoint))
    assert result.returncode == 1 and result.stderr.strip() == f"error: {sentence}"


def test_a_budget_nothing_fits_in_is_refused_before_training(data_dir, tmp_path):
    model = load_preset("tiny-gpt2").model
    with pytest.raises(PrometheanError) as error:
        plan_batch(model, 16, 100 * 2**20, 4)
    assert str(error.value).startswith("tiny-gpt2 needs about ")
    assert str(error.value).endswith(
        "at micro-batch 1, block 16; the budget is 100 MB; try --set gradient_checkpointing=true or a "
        "shorter block.")
    result = cli("pretrain", "--preset", "tiny-gpt2", "--memory-budget", "100MB",
                 "--set", f"data={str(data_dir)!r}", "--set", f"out={str(tmp_path / 'run')!r}",
                 "--set", "block_size=16")
    assert result.returncode == 1 and result.stderr.strip() == f"error: {error.value}"
    assert not (tmp_path / "run").exists()
    bad = cli("pretrain", "--preset", "tiny-gpt2", "--memory-budget", "lots",
              "--set", f"data={str(data_dir)!r}", "--set", "out='x'")
    assert bad.stderr.strip() == ("error: 'lots' is not a memory size; write a number with a "
                                  "unit, like 8GB, 512MB or 1.5GiB.")


def test_a_budget_keeps_the_effective_batch(data_dir, tmp_path):
    asked = config(data_dir, tmp_path / "run", batch_size=6, grad_accum=2)
    planned, _ = fit_to_budget(asked, 8 * GB)
    assert (planned.batch_size, planned.grad_accum) == (12, 1)
    small = plan_batch(load_preset("tiny-gpt2").model, 16, 245 * 2**20, 12)[0]
    planned, _ = fit_to_budget(asked, 245 * 2**20)
    assert planned.batch_size * planned.grad_accum == 12 and planned.batch_size <= small
    result = cli("pretrain", "--preset", "tiny-gpt2", "--memory-budget", "8GB", "--set",
                 f"data={str(data_dir)!r}", "--set", f"out={str(tmp_path / 'cli')!r}", "--set",
                 "block_size=16", "--set", "batch_size=2", "--set", "grad_accum=3", "--set",
                 "max_steps=1", "--set", "progress=false", "--set", "eval_interval=1")
    assert result.returncode == 0, result.stderr
    assert "micro-batch 6 x 1 accumulation (6 sequences a step)" in result.stderr


@pytest.fixture(scope="module")
def resumable(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = train(config(data_dir, out, max_steps=4), until_step=2)
    return out, result.final_checkpoint


def test_resuming_with_another_batch_shape_is_refused(data_dir, resumable, tmp_path):
    out, step = resumable
    with pytest.raises(PrometheanError) as error:
        train(config(data_dir, out, max_steps=4, batch_size=3), resume=step)
    assert str(error.value) == (
        f"{step} was trained with batch_size 2 but this run asks for 3; an exact resume needs "
        "the same batch_size, grad_accum x processes and block_size.")


def test_resuming_with_another_accumulation_is_refused(data_dir, resumable):
    out, step = resumable
    with pytest.raises(PrometheanError) as error:
        train(config(data_dir, out, max_steps=4, grad_accum=2), resume=step)
    assert str(error.value) == (
        f"{step} was trained with grad_accum x processes 1 but this run asks for 2; an exact "
        "resume needs the same batch_size, grad_accum x processes and block_size.")


def test_resuming_with_another_model_is_refused(data_dir, resumable):
    out, step = resumable
    with pytest.raises(PrometheanError) as error:
        train(config(data_dir, out, max_steps=4, model="tiny-llama"), resume=step)
    assert str(error.value).startswith(f"{step} was trained with a different model than tiny-llama (")
    assert str(error.value).endswith("; resume with the config that started it.")


def test_corrupted_checkpoints_are_one_sentence(data_dir, resumable, tmp_path):
    import shutil

    out, step = resumable
    for name, expected in (("model.safetensors", "is not a readable safetensors file"),
                           ("train_state.json", "is not valid JSON")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(step, broken)
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])
        # The sha256 recorded at save time catches it first, naming the file...
        with pytest.raises(CheckpointError) as error:
            train(config(data_dir, tmp_path / "r", max_steps=4), resume=broken)
        assert str(error.value) == (
            f"{broken / name} is corrupt: its sha256 differs from the one recorded when it was "
            "written; restore it from a copy or use another checkpoint."
        )
        # ...and a checkpoint from before checksums gets the reader's own sentence.
        (broken / "checksums.json").unlink()
        with pytest.raises(CheckpointError, match=expected):
            train(config(data_dir, tmp_path / "r", max_steps=4), resume=broken)
