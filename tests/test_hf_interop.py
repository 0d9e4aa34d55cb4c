"""Hugging Face interop: checkpoints written by transformers import exactly, and exports load in it.

Exactness is judged on logits: ours and transformers' must agree to 1e-4 in float32 on random
token ids. Every parameter is randomised (norm weights and biases too, away from their 1 / 0
initial values) so that a mis-mapped tensor, a missed transpose or a missed Gemma (1 + weight)
shift shows up as a large difference rather than hiding behind an identity initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
)

import promethean.interop.hf as hf_module  # noqa: E402
from promethean.config import ModelConfig, load_preset  # noqa: E402
from promethean.errors import ConfigError, PrometheanError  # noqa: E402
from promethean.interop.hf import export_hf, hf_config_to_model_config, import_hf  # noqa: E402
from promethean.model import Transformer  # noqa: E402

TOLERANCE = 1e-4
# Longer than tiny-gemma3's sliding window (32), so that the window changes the result.
SEQUENCE_LENGTH = 80
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


# ----------------------------------------------------------------------------- helpers
def hf_gpt2_config(config: ModelConfig) -> GPT2Config:
    # activation_function keeps GPT-2's own default, gelu_new (the released models use it).
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        **NO_SPECIAL_TOKENS,
    )


def hf_llama_config(config: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        **NO_SPECIAL_TOKENS,
    )


def hf_gemma3_config(config: ModelConfig) -> Gemma3TextConfig:
    layer_types = [
        "sliding_attention" if config.is_sliding_layer(i) else "full_attention"
        for i in range(config.n_layer)
    ]
    return Gemma3TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        query_pre_attn_scalar=int(config.query_pre_attn_scalar),
        sliding_window=config.sliding_window,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta},
        },
        tie_word_embeddings=config.tie_embeddings,
        **NO_SPECIAL_TOKENS,
    )


HF_CONFIG_BUILDERS = {
    "tiny-gpt2": hf_gpt2_config,
    "tiny-llama": hf_llama_config,
    "tiny-gemma3": hf_gemma3_config,
}


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere: matrices and embeddings fresh, vectors (norm weights, biases)
    perturbed away from their initial ones and zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1:
                parameter.add_(0.2 * noise)
            else:
                parameter.copy_(0.1 * noise)


def random_hf_model(preset: str, seed: int = 0):
    hf_config = HF_CONFIG_BUILDERS[preset](load_preset(preset).model)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    randomise_(model, seed)
    return model.eval()


def random_ours(config: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(config)
    randomise_(model, seed)
    return model.eval()


def random_ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, SEQUENCE_LENGTH), generator=generator)


@torch.no_grad()
def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def load_ours(path: Path) -> Transformer:
    config, state = import_hf(path)
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_same_logits(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == reference.dtype == torch.float32
    # Logits this spread make a 1e-4 agreement meaningful (tiny logits would agree by accident).
    assert reference.std() > 0.5
    difference = (ours - reference).abs().max().item()
    assert difference <= TOLERANCE, f"logits differ by up to {difference:.2e}"


def rewrite_config(path: Path, **changes) -> None:
    """Edit a saved config.json: a value of None removes the key."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------- HF -> ours
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_import_reproduces_transformers_logits(preset, tmp_path):
    hf_model = random_hf_model(preset)
    hf_model.save_pretrained(tmp_path)

    config, _ = import_hf(tmp_path)
    expected = load_preset(preset).model
    assert config == expected.with_overrides(name=config.name)
    ids = random_ids(config.vocab_size)
    assert_same_logits(our_logits(load_ours(tmp_path), ids), hf_logits(hf_model, ids))


def test_gemma3_sliding_window_means_the_same_as_in_transformers(tmp_path):
    hf_model = random_hf_model("tiny-gemma3")
    assert set(hf_model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert hf_model.config.layer_types.count("sliding_attention") >= 2
    hf_model.save_pretrained(tmp_path)
    ours = load_ours(tmp_path)
    window = ours.config.sliding_window
    assert SEQUENCE_LENGTH > window
    ids = random_ids(ours.config.vocab_size)
    # Agreement beyond the window (logits match, see above) only tells something if the window
    # matters: without it, the late positions must come out clearly different.
    # A window as long as the context keeps every key: the same model, minus the windowing.
    unwindowed = Transformer(ours.config.with_overrides(sliding_window=ours.config.context_length))
    unwindowed.load_state_dict(ours.state_dict())
    unwindowed.eval()
    late = slice(window, None)
    assert (
        our_logits(unwindowed, ids)[:, late] - our_logits(ours, ids)[:, late]
    ).abs().max() > 1e-2
    assert_same_logits(our_logits(ours, ids), hf_logits(hf_model, ids))


def test_gemma3_legacy_rope_and_layer_pattern_keys(tmp_path):
    """Pre-transformers-5 configs: rope_theta / rope_local_base_freq and sliding_window_pattern."""
    config = load_preset("tiny-gemma3").model.with_overrides(global_layers=(2, 5))
    hf_model = AutoModelForCausalLM.from_config(
        hf_gemma3_config(config), attn_implementation="eager"
    )
    randomise_(hf_model, seed=3)
    hf_model.eval().save_pretrained(tmp_path)
    rewrite_config(
        tmp_path,
        rope_parameters=None,
        layer_types=None,
        _sliding_window_pattern=None,
        rope_theta=config.rope_theta,
        rope_local_base_freq=config.rope_local_theta,
        sliding_window_pattern=3,
    )

    imported, _ = import_hf(tmp_path)
    assert imported.global_layers == (2, 5)
    assert (imported.rope_theta, imported.rope_local_theta) == (1_000_000.0, 10_000.0)
    ids = random_ids(config.vocab_size)
    ours = our_logits(load_ours(tmp_path), ids)
    assert_same_logits(ours, hf_logits(hf_model, ids))
    # transformers reads the rewritten config the same way.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert_same_logits(ours, hf_logits(reloaded.eval(), ids))


def test_llama_legacy_rope_theta_key(tmp_path):
    config = load_preset("tiny-llama").model.with_overrides(rope_theta=500_000.0)
    hf_model = AutoModelForCausalLM.from_config(
        hf_llama_config(config), attn_implementation="eager"
    )
    randomise_(hf_model, seed=4)
    hf_model.eval().save_pretrained(tmp_path)
    rewrite_config(tmp_path, rope_parameters=None, rope_theta=500_000.0)

    assert import_hf(tmp_path)[0].rope_theta == 500_000.0
    ids = random_ids(config.vocab_size)
    assert_same_logits(our_logits(load_ours(tmp_path), ids), hf_logits(hf_model, ids))


def test_sharded_checkpoint(tmp_path):
    hf_model = random_hf_model("tiny-llama")
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids(hf_model.config.vocab_size)
    assert_same_logits(our_logits(load_ours(tmp_path), ids), hf_logits(hf_model, ids))


def test_gpt2_file_in_the_original_release_layout(tmp_path):
    """The released GPT-2 files name tensors without 'transformer.', keep the causal-mask
    buffers, and some also store the tied lm_head.weight."""
    hf_model = random_hf_model("tiny-gpt2")
    tensors = {
        name.removeprefix("transformer."): tensor.clone()
        for name, tensor in hf_model.state_dict().items()
    }
    length = hf_model.config.n_positions
    for layer in range(hf_model.config.n_layer):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, length, length))
        tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_model.config.to_json_file(tmp_path / "config.json")

    ids = random_ids(hf_model.config.vocab_size)
    assert_same_logits(our_logits(load_ours(tmp_path), ids), hf_logits(hf_model, ids))


def test_multimodal_gemma3_imports_its_text_model(tmp_path):
    text_dir, multimodal_dir = tmp_path / "text", tmp_path / "multimodal"
    random_hf_model("tiny-gemma3").save_pretrained(text_dir)
    text_config = json.loads((text_dir / "config.json").read_text())
    multimodal_dir.mkdir()
    (multimodal_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": {k: v for k, v in text_config.items() if k != "architectures"},
                "vision_config": {"model_type": "siglip_vision_model"},
            }
        )
    )
    tensors = {
        name.replace("model.", "model.language_model.", 1): tensor
        for name, tensor in load_file(text_dir / "model.safetensors").items()
    }
    tensors["model.vision_tower.patch_embedding.weight"] = torch.zeros(4, 3)
    save_file(tensors, multimodal_dir / "model.safetensors", metadata={"format": "pt"})

    text_model_config, text_state = import_hf(text_dir)
    config, state = import_hf(multimodal_dir)
    assert config == text_model_config.with_overrides(name=config.name)
    assert state.keys() == text_state.keys()
    assert all(torch.equal(state[name], text_state[name]) for name in state)


# The published config.json files of GPT-2 small and Gemma-3 270M (the latter in transformers 4's
# format, with rope_theta / rope_local_base_freq), less keys that do not concern the architecture.
PUBLISHED_GPT2_SMALL = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "vocab_size": 50257,
}
PUBLISHED_GEMMA3_270M = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "layer_types": ["sliding_attention"] * 5
    + ["full_attention"]
    + ["sliding_attention"] * 5
    + ["full_attention"]
    + ["sliding_attention"] * 5
    + ["full_attention"],
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "use_bidirectional_attention": False,
    "vocab_size": 262144,
}


@pytest.mark.parametrize(
    ("published", "preset", "differences"),
    [
        (PUBLISHED_GPT2_SMALL, "gpt2-small", {}),
        # Our preset swaps Gemma's 262K vocabulary for GPT-2's (see the preset's comment).
        (PUBLISHED_GEMMA3_270M, "gemma3-270m", {"vocab_size": 262144}),
    ],
)
def test_published_configs_map_to_our_presets(published, preset, differences):
    config = hf_config_to_model_config(published, name=preset)
    assert config == load_preset(preset).model.with_overrides(**differences)


# ----------------------------------------------------------------------------- ours -> HF
@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny-gpt2", {}),
        ("tiny-gpt2", {"tie_embeddings": False}),
        # nanoGPT's exact GELU is transformers' activation_function "gelu".
        ("tiny-gpt2", {"mlp": "gelu_exact"}),
        ("tiny-llama", {}),
        ("tiny-llama", {"tie_embeddings": True, "bias": True, "mlp": "geglu_tanh"}),
        ("tiny-gemma3", {}),
        ("tiny-gemma3", {"global_layers": None}),  # every layer slides
        (
            "tiny-gemma3",
            {
                "sliding_window": None,
                "global_layers": None,
                "rope_local_theta": None,  # meaningless without a window, so not exported
                "mlp": "swiglu",
                "tie_embeddings": False,
            },
        ),
    ],
)
def test_export_loads_in_transformers_with_the_same_logits(preset, overrides, tmp_path):
    config = load_preset(preset).model.with_overrides(**overrides)
    ours = random_ours(config)
    out_dir = export_hf(ours, tmp_path / "export")

    written = json.loads((out_dir / "config.json").read_text())
    assert written["dtype"] == "float32"
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == written["architectures"][0]
    ids = random_ids(config.vocab_size)
    assert_same_logits(our_logits(ours, ids), hf_logits(hf_model, ids))

    # And back: the same config and the same tensors.
    reimported, state = import_hf(out_dir)
    assert reimported == config.with_overrides(name=reimported.name)
    assert all(torch.equal(state[name], tensor) for name, tensor in ours.state_dict().items())


def test_gemma_norms_stored_as_plain_gains_are_shifted_on_export(tmp_path):
    # A Gemma-shaped config whose norms hold the gain itself (not gain - 1) exports exactly too.
    config = load_preset("tiny-gemma3").model.with_overrides(norm_unit_offset=False)
    ours = random_ours(config)
    hf_model = AutoModelForCausalLM.from_pretrained(
        export_hf(ours, tmp_path / "export"), attn_implementation="eager"
    ).eval()
    ids = random_ids(config.vocab_size)
    assert_same_logits(our_logits(ours, ids), hf_logits(hf_model, ids))


def test_gemma_imported_in_bf16_keeps_its_small_norm_gains_exact(tmp_path):
    hf_model = random_hf_model("tiny-gemma3")
    hf_model.save_pretrained(tmp_path)
    ours = load_ours(tmp_path)
    hf_norm = hf_model.model.layers[0].input_layernorm.weight
    ours_norm = ours.blocks[0].attn_norm.weight
    # Stored as HF stores it (gain - 1), so a cast to bf16 rounds the same small number HF rounds.
    assert torch.equal(ours_norm.to(torch.bfloat16), hf_norm.detach().to(torch.bfloat16))


def test_export_of_a_config_and_state_dict_in_bfloat16(tmp_path):
    config = load_preset("tiny-gemma3").model
    ours = random_ours(config)
    out_dir = export_hf((config, ours.state_dict()), tmp_path / "export", dtype=torch.bfloat16)
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out_dir / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    # Tied: the head is stored once, as the embeddings.
    assert "lm_head.weight" not in tensors


def test_export_writes_special_token_ids(tmp_path):
    ours = random_ours(load_preset("tiny-gpt2").model)
    out_dir = export_hf(ours, tmp_path / "export", special_token_ids={"eos_token_id": 1})
    written = json.loads((out_dir / "config.json").read_text())
    assert (written["eos_token_id"], written["bos_token_id"]) == (1, None)


def test_export_refuses_configs_hf_cannot_express(tmp_path):
    gelu_with_rope = load_preset("tiny-gpt2").model.with_overrides(position="rope")
    with pytest.raises(ConfigError, match="cannot be exported as an HF llama model.*GELU"):
        export_hf(Transformer(gelu_with_rope), tmp_path / "a")
    llama_with_window = load_preset("tiny-llama").model.with_overrides(sliding_window=16)
    with pytest.raises(ConfigError, match="sliding window"):
        export_hf(Transformer(llama_with_window), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_existing_directory_unless_told_to_overwrite(tmp_path):
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    ours = random_ours(load_preset("tiny-llama").model)
    with pytest.raises(PrometheanError, match="already exists"):
        export_hf(ours, out_dir)
    assert (out_dir / "keep.txt").read_text() == "precious"

    export_hf(ours, out_dir, overwrite=True)
    assert sorted(path.name for path in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert [path.name for path in tmp_path.iterdir()] == ["export"]


def test_export_failure_leaves_no_directory_behind(tmp_path, monkeypatch):
    def fail_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "save_file", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_ours(load_preset("tiny-llama").model), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_tied_head_that_differs_from_the_embeddings(tmp_path):
    config = load_preset("tiny-gpt2").model
    state = dict(random_ours(config).state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(PrometheanError, match="ties the output head"):
        export_hf((config, state), tmp_path / "export")


# ----------------------------------------------------------------------------- bad inputs
def write_json(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))


def test_unsupported_model_type(tmp_path):
    write_json(tmp_path, {"model_type": "bert"})
    with pytest.raises(ConfigError, match="model_type 'bert' is not supported"):
        import_hf(tmp_path)


def test_pickled_weights_are_refused_without_being_read(tmp_path):
    random_hf_model("tiny-gpt2").config.to_json_file(tmp_path / "config.json")
    # Not a valid pickle: reading it at all would fail with a different error.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(PrometheanError, match=r"only safetensors weights .* are supported"):
        import_hf(tmp_path)


def test_missing_config_json(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(PrometheanError, match="has no config.json"):
        import_hf(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(PrometheanError, match="is not a directory"):
        import_hf(tmp_path / "nowhere")


def test_missing_weights(tmp_path):
    random_hf_model("tiny-gpt2").config.to_json_file(tmp_path / "config.json")
    with pytest.raises(PrometheanError, match="has neither model.safetensors"):
        import_hf(tmp_path)


def test_missing_tensor(tmp_path):
    random_hf_model("tiny-llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrometheanError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        import_hf(tmp_path)


def test_wrong_architecture(tmp_path):
    write_json(
        tmp_path, {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}
    )
    with pytest.raises(ConfigError, match="only LlamaForCausalLM"):
        import_hf(tmp_path)


@pytest.mark.parametrize(
    ("config", "sentence"),
    [
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope type 'llama3'",
        ),
        (
            {"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope type 'yarn'",
        ),
        (
            {
                "model_type": "gemma3_text",
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0},
                    "sliding_attention": {"rope_type": "default"},
                },
            },
            "rope type 'linear'",
        ),
        ({"model_type": "gemma3_text", "final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"model_type": "gpt2", "activation_function": "relu"}, "activation_function 'relu'"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "activation 'gelu'"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias different from mlp_bias"),
        ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scaled by 1/sqrt"),
    ],
)
def test_unrepresentable_configs_are_refused(tmp_path, config, sentence):
    write_json(tmp_path, config)
    with pytest.raises(ConfigError, match=sentence):
        import_hf(tmp_path)


def test_gemma3_window_longer_than_the_context_imports_as_the_context(tmp_path):
    hf_model = random_hf_model("tiny-gemma3")
    hf_model.save_pretrained(tmp_path)
    rewrite_config(tmp_path, sliding_window=100_000)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = load_ours(tmp_path)
    assert ours.config.sliding_window == ours.config.context_length
    ids = random_ids(ours.config.vocab_size)
    assert_same_logits(our_logits(ours, ids), hf_logits(hf_model, ids))
