import pytest
import torch

from promethean.config import ModelConfig, list_presets, load_preset, parse_model_config
from promethean.errors import ConfigError
from promethean.model import Transformer


def count(config: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_parameters(), model.num_non_embedding_parameters()


@pytest.mark.parametrize(
    ("preset", "expected_total"),
    [("gpt2-small", 124e6), ("llama-127m", 127e6)],
)
def test_full_size_presets_match_their_published_sizes(preset, expected_total):
    total, _ = count(load_preset(preset).model)
    assert abs(total - expected_total) / expected_total <= 0.02


def test_gpt2_small_has_the_exact_gpt2_parameter_count():
    total, non_embedding = count(load_preset("gpt2-small").model)
    assert total == 124_439_808  # GPT-2 small with tied embeddings
    assert non_embedding == 124_439_808 - 50257 * 768 - 1024 * 768


def test_gemma3_blocks_match_gemma3_270m_and_its_vocab_gives_270m():
    config = load_preset("gemma3-270m").model
    total, non_embedding = count(config)
    assert abs(non_embedding - 100e6) / 100e6 <= 0.02  # Google: ~100M in transformer blocks
    assert total == non_embedding + 50257 * 640
    with_gemma_vocab, _ = count(config.with_overrides(vocab_size=262_144))
    assert abs(with_gemma_vocab - 270e6) / 270e6 <= 0.02


def test_gemma3_layer_pattern_is_five_sliding_then_one_global():
    config = load_preset("gemma3-270m").model
    global_layers = [i for i in range(config.n_layer) if not config.is_sliding_layer(i)]
    assert global_layers == [5, 11, 17]
    assert config.layer_rope_theta(0) == 10_000.0
    assert config.layer_rope_theta(5) == 1_000_000.0
    assert config.layer_window(0) == 512 and config.layer_window(5) is None


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_tiny_presets_stay_under_two_million_parameters(preset):
    total, _ = count(load_preset(preset).model)
    assert total <= 2_000_000


def test_every_preset_loads():
    assert {"gpt2-small", "llama-127m", "gemma3-270m", "tiny-gpt2"} <= set(list_presets())
    for name in list_presets():
        assert load_preset(name).model.name == name


BASE = dict(vocab_size=100, context_length=64, n_layer=2, n_embd=32, n_head=4, d_ff=64)


@pytest.mark.parametrize(
    ("overrides", "sentence"),
    [
        ({"n_embd": 30}, "n_head (4) must divide n_embd (30) evenly, or head_dim must be set explicitly"),
        ({"n_kv_head": 3}, "n_kv_head (3) must divide n_head (4)"),
        ({"sliding_window": 65}, "sliding_window (65) cannot be larger than context_length (64)"),
        ({"global_layers": [0]}, "global_layers only makes sense together with sliding_window"),
        ({"sliding_window": 8, "global_layers": [2]}, "global_layers [2] are outside the model's layers 0..1"),
        ({"rope_local_theta": 10.0, "sliding_window": 8}, "rope_local_theta needs position = 'rope'"),
        ({"position": "rope", "rope_local_theta": 10.0}, "rope_local_theta applies to sliding-window layers, so it needs sliding_window"),
        ({"n_layerz": 3}, "'n_layerz' is not a known setting; did you mean 'n_layer'?"),
        ({"widht": 3}, "'widht' is not a known setting (known settings: name, vocab_size,"),
        ({"n_layer": "2"}, "'n_layer' input should be a valid integer"),
        ({"n_layer": 0}, "'n_layer' input should be greater than 0"),
        ({"mlp": "relu"}, "'mlp' input should be 'gelu', 'swiglu', 'geglu_tanh' or 'gelu_exact'"),
    ],
)
def test_impossible_configs_are_rejected_with_a_sentence(overrides, sentence):
    with pytest.raises(ConfigError) as error:
        parse_model_config({**BASE, **overrides})
    assert sentence in str(error.value)
    assert str(error.value).startswith("model config is invalid: ")
    assert str(error.value).endswith((".", "?"))


def test_missing_required_setting_is_named():
    data = dict(BASE)
    del data["d_ff"]
    with pytest.raises(ConfigError, match="'d_ff' is required but missing"):
        parse_model_config(data)


def test_explicit_head_dim_allows_heads_wider_than_the_model():
    config = parse_model_config({**BASE, "n_embd": 30, "head_dim": 16})
    assert config.head_size == 16


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; available presets: .*tiny-gpt2"):
        load_preset("gpt5")


def test_malformed_toml_is_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nvocab_size = 3\n")
    with pytest.raises(ConfigError, match=r"broken.toml is not valid TOML"):
        load_preset(str(path))


def test_preset_file_with_unknown_model_key_names_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[model]\n" + "\n".join(f"{k} = {v}" for k, v in BASE.items()) + "\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"\[model\] in mine.toml is invalid: 'width' is not a known setting"):
        load_preset(str(path))


def test_with_overrides_validates():
    config = load_preset("tiny-gpt2").model
    assert config.with_overrides(n_layer=2).n_layer == 2
    with pytest.raises(ConfigError):
        config.with_overrides(n_head=5)


def test_config_is_frozen():
    config = load_preset("tiny-gpt2").model
    with pytest.raises(Exception):
        config.n_layer = 3
