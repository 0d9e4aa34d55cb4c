import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import promethean.checkpoint as checkpoint_module
from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.errors import CheckpointError, PrometheanError
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build


@pytest.fixture
def saved(tmp_path):
    model = build("tiny-llama")
    directory = save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer(), {"note": "test"})
    return model, directory


def test_round_trip_gives_equal_logits(tiny_model, tmp_path):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_model, ByteTokenizer())
    assert sorted(p.name for p in directory.iterdir()) == ["checksums.json", "config.json", "model.safetensors", "promethean-tokenizer.json"]
    loaded = load_checkpoint(directory)
    idx = torch.randint(0, 257, (2, 16))
    assert torch.equal(loaded.model(idx).logits, tiny_model(idx).logits)
    assert loaded.config == tiny_model.config
    assert loaded.tokenizer.kind == "bytes"


def test_tied_weights_are_stored_once_and_tied_again_on_load(tmp_path):
    model = build("tiny-gpt2")
    directory = save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    assert "lm_head.weight" not in load_file(directory / "model.safetensors")
    loaded = load_checkpoint(directory).model
    assert loaded.lm_head.weight is loaded.token_embedding.weight


def test_metadata_round_trips(saved):
    _, directory = saved
    assert load_checkpoint(directory).metadata == {"note": "test"}


def test_load_in_bf16(saved):
    _, directory = saved
    model = load_checkpoint(directory, dtype=torch.bfloat16).model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    model, directory = saved
    before = (directory / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(directory, build("tiny-llama", seed=1), ByteTokenizer())
    assert (directory / "model.safetensors").read_bytes() == before
    assert [p.name for p in directory.parent.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_saving_over_an_existing_checkpoint_replaces_it(saved):
    _, directory = saved
    newer = build("tiny-llama", seed=5)
    save_checkpoint(directory, newer, ByteTokenizer())
    idx = torch.randint(0, 257, (1, 8))
    assert torch.equal(load_checkpoint(directory).model(idx).logits, newer(idx).logits)
    assert [p.name for p in directory.parent.iterdir()] == ["ckpt"]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nowhere does not exist\."):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "sentence"),
    [
        ("config.json", r"is not a checkpoint: config.json is missing\."),
        ("model.safetensors", r"is missing model.safetensors\."),
        ("promethean-tokenizer.json", r"is missing promethean-tokenizer.json\."),
    ],
)
def test_missing_file_is_named(saved, name, sentence):
    _, directory = saved
    (directory / name).unlink()
    with pytest.raises(CheckpointError, match=sentence):
        load_checkpoint(directory)


def test_tensor_with_the_wrong_shape_is_named(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["blocks.1.mlp.up_proj.weight"] = torch.zeros(7, 7)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory, verify=False)
    assert "tensor 'blocks.1.mlp.up_proj.weight'" in str(error.value)
    assert "has shape (7, 7) but the config needs (352, 128)." in str(error.value)


def test_missing_and_unexpected_tensors_are_named(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    tensors = load_file(path)
    del tensors["final_norm.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"is missing tensor 'final_norm.weight' that the config requires\."):
        load_checkpoint(directory, verify=False)
    tensors["final_norm.weight"] = torch.ones(128)
    tensors["blocks.9.extra"] = torch.ones(1)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"has tensor 'blocks.9.extra' that the config does not describe\."):
        load_checkpoint(directory, verify=False)


def test_config_that_does_not_match_the_tensors(saved):
    _, directory = saved
    record = json.loads((directory / "config.json").read_text())
    record["model"]["n_layer"] = 6
    (directory / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"is missing tensor 'blocks.4.attn_norm.weight'"):
        load_checkpoint(directory, verify=False)


def test_corrupt_files_are_reported(saved):
    _, directory = saved
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_checkpoint(directory, verify=False)


def test_truncated_safetensors_is_reported(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        load_checkpoint(directory, verify=False)


def test_invalid_model_config_in_checkpoint(saved):
    _, directory = saved
    record = json.loads((directory / "config.json").read_text())
    record["model"]["n_kv_head"] = 3
    (directory / "config.json").write_text(json.dumps(record))
    with pytest.raises(PrometheanError, match=r"n_kv_head \(3\) must divide n_head \(4\)"):
        load_checkpoint(directory, verify=False)


def test_non_finite_weights_are_refused(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["final_norm.weight"][0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"tensor 'final_norm.weight' .* holds NaN or infinite values\."):
        load_checkpoint(directory, verify=False)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model = build("tiny-gpt2", vocab_size=100)
    with pytest.raises(CheckpointError, match="the bytes tokenizer has 257 ids but the model's vocabulary is only 100."):
        save_checkpoint(tmp_path / "c", model, ByteTokenizer())
    assert not (tmp_path / "c").exists()
