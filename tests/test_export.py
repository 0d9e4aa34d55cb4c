"""`promethean export`: HF + PEFT adapters, ONNX and GGUF, checked by the runtimes that read them."""

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.continual.adapters import Adapters, adapter_directory, load_adapter_onto
from promethean.errors import PrometheanError
from promethean.interop.export import export_checkpoint, export_gguf
from promethean.tokenizer import ByteTokenizer, GPT2Tokenizer, load_tokenizer, train_bpe, train_char
from tests.conftest import GPT2_BYTE_SYMBOLS, TINY_PRESETS, build, generated_documents

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    result = subprocess.run(
        [sys.executable, "-m", "promethean", *args], check=False, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def fails_with(result, sentence):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"error: {sentence}"


def make_checkpoint(directory, preset, tokenizer=None, **overrides):
    return save_checkpoint(directory, build(preset, **overrides), tokenizer or ByteTokenizer())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {preset: make_checkpoint(root / preset, preset) for preset in TINY_PRESETS}


# ------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_onnx_runtime_gives_torch_logits_for_any_batch_and_length(preset, checkpoints, tmp_path):
    import onnxruntime

    path = export_checkpoint(checkpoints[preset], "onnx", tmp_path / "model.onnx")
    model = load_checkpoint(checkpoints[preset]).model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    generator = torch.Generator().manual_seed(0)
    # Shorter and longer than tiny-gemma3's 32-token window, one token, and the whole context.
    for batch, length in [(2, 40), (1, 7), (3, 1), (1, model.config.context_length)]:
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = model(ids).logits
        assert logits.shape == (batch, length, model.config.vocab_size)
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_onnx_refuses_weights_beyond_one_protobuf(monkeypatch, tmp_path):
    from promethean.interop import export

    monkeypatch.setattr(export, "ONNX_MAX_BYTES", 1024**2)  # as if the model were past 2 GiB
    with pytest.raises(PrometheanError) as caught:
        export.export_onnx(build("tiny-gpt2"), tmp_path / "m.onnx")
    assert str(caught.value) == (
        "this model's 3 MiB of float32 weights do not fit in one ONNX file, which is limited "
        "to 2 GiB."
    )
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ HF + PEFT
ADAPTER_TARGETS = {
    # Only two of GPT-2's fused q/k/v, and the tied head: the awkward cases of the mapping.
    "tiny-gpt2": ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"),
    "tiny-llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "tiny-gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def add_trained_looking_adapter(checkpoint, name, targets, seed):
    model = load_checkpoint(checkpoint).model
    adapters = Adapters(model)
    adapters.add(name, rank=4, alpha=8, target_modules=targets)
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero, which would hide a wrong mapping
        for parameter in adapters.lora_B[name].values():
            parameter.normal_(0, 0.05)
    adapters.save(name, adapter_directory(checkpoint, name))


@pytest.mark.parametrize("preset", sorted(ADAPTER_TARGETS))
def test_hf_export_carries_adapters_that_peft_loads_with_the_same_logits(preset, tmp_path):
    import transformers
    from peft import PeftModel

    checkpoint = make_checkpoint(tmp_path / "ckpt", preset)
    add_trained_looking_adapter(checkpoint, "first", ADAPTER_TARGETS[preset], seed=1)
    add_trained_looking_adapter(checkpoint, "second", ("down_proj",), seed=2)
    out = export_checkpoint(checkpoint, "hf")
    assert out == tmp_path / "ckpt-hf"
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["first", "second"]

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, out / "adapters" / "first").eval()
    ours = load_checkpoint(checkpoint).model
    load_adapter_onto(ours, checkpoint, "first", merge=False)
    with torch.no_grad():
        expected, got = ours(ids).logits, peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert (plain - expected).abs().max() > 0.1  # the adapter matters ...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # ... and is the same one

    record = json.loads((out / "adapters" / "first" / "adapter_config.json").read_text())
    assert record["peft_type"] == "LORA" and record["task_type"] == "CAUSAL_LM"
    assert record["r"] == 4 and record["lora_alpha"] == 8
    assert record["fan_in_fan_out"] == (preset == "tiny-gpt2")


def test_gpt2_adapter_uses_hf_module_names_and_a_block_diagonal_fused_update(tmp_path):
    from safetensors.torch import load_file

    checkpoint = make_checkpoint(tmp_path / "ckpt", "tiny-gpt2")
    add_trained_looking_adapter(checkpoint, "qv", ("q_proj", "v_proj", "lm_head"), seed=3)
    out = export_checkpoint(checkpoint, "hf", tmp_path / "hf")
    record = json.loads((out / "adapters" / "qv" / "adapter_config.json").read_text())
    layers = range(4)
    assert record["target_modules"] == sorted(
        ["lm_head"] + [f"transformer.h.{i}.attn.c_attn" for i in layers]
    )
    assert record["rank_pattern"] == {rf"transformer\.h\.{i}\.attn\.c_attn": 8 for i in layers}
    assert record["alpha_pattern"] == {rf"transformer\.h\.{i}\.attn\.c_attn": 16 for i in layers}
    tensors = load_file(out / "adapters" / "qv" / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    assert tensors[f"{prefix}.lora_A.weight"].shape == (8, 128)
    b = tensors[f"{prefix}.lora_B.weight"]
    assert b.shape == (384, 8)
    assert not b[128:256].any()  # the key slice has no update
    assert not b[:128, 4:].any() and not b[256:, :4].any()  # q and v each read their own A rows
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (512, 4)


@pytest.mark.parametrize("kind", ["bytes", "gpt2", "bpe"])
def test_hf_export_tokenizer_encodes_and_decodes_as_ours(kind, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = {
        "bytes": ByteTokenizer, "gpt2": GPT2Tokenizer,
        "bpe": lambda: train_bpe(generated_documents(), vocab_size=300),
    }[kind]()
    vocab_size = max(512, tokenizer.vocab_size)
    checkpoint = make_checkpoint(tmp_path / "ckpt", "tiny-gpt2", tokenizer, vocab_size=vocab_size)
    out = export_checkpoint(checkpoint, "hf", tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Hello, world! The quick  fox, naïve café.<|endoftext|>\n\n  42 ok"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


def test_hf_export_of_a_char_tokenizer_checkpoint_has_no_hf_tokenizer_but_ours(tmp_path):
    char = train_char(["abc"])
    checkpoint = make_checkpoint(tmp_path / "ckpt", "tiny-llama", char)
    out = export_checkpoint(checkpoint, "hf", tmp_path / "hf")
    # A byte-level BPE cannot express it, so transformers gets no tokenizer file; our record
    # beside the model brings it back on import.
    assert sorted(p.name for p in out.iterdir()) == [
        "char.json", "config.json", "model.safetensors", "promethean-tokenizer.json"]
    assert load_tokenizer(out).fingerprint == char.fingerprint


# ------------------------------------------------------------------------------ GGUF
def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    tensors = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in reader.tensors}
    return fields, tensors


def expected_gguf_names(config, architecture):
    names = ["token_embd.weight", "output_norm.weight"]
    per_layer = ["attn_norm.weight", "ffn_norm.weight", "attn_output.weight", "ffn_up.weight",
                 "ffn_down.weight"]
    if architecture == "gpt2":
        names += ["position_embd.weight", "output_norm.bias"]
        per_layer += ["attn_qkv.weight", "attn_norm.bias", "ffn_norm.bias", "attn_qkv.bias",
                      "attn_output.bias", "ffn_up.bias", "ffn_down.bias"]
    else:
        names += ["output.weight"]  # tiny-llama's head is untied
        per_layer += ["attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight"]
    names += [f"blk.{i}.{name}" for i in range(config.n_layer) for name in per_layer]
    return sorted(names)


def test_gguf_gpt2_metadata_names_shapes_and_weights(tmp_path):
    model = build("tiny-gpt2")
    fields, tensors = read_gguf(export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf"))
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == 256
    assert fields["gpt2.embedding_length"] == 128
    assert fields["gpt2.block_count"] == 4
    assert fields["gpt2.feed_forward_length"] == 512
    assert fields["gpt2.attention.head_count"] == 4
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert sorted(tensors) == expected_gguf_names(model.config, "gpt2")
    state = model.state_dict()
    torch.testing.assert_close(tensors["token_embd.weight"], state["token_embedding.weight"])
    torch.testing.assert_close(tensors["position_embd.weight"], state["position_embedding.weight"])
    for i in range(4):
        qkv = torch.cat([state[f"blocks.{i}.attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(tensors[f"blk.{i}.attn_qkv.weight"], qkv)
        assert torch.equal(tensors[f"blk.{i}.ffn_up.bias"], state[f"blocks.{i}.mlp.up_proj.bias"])
        assert torch.equal(tensors[f"blk.{i}.ffn_norm.weight"], state[f"blocks.{i}.mlp_norm.weight"])
        assert torch.equal(
            tensors[f"blk.{i}.attn_output.weight"], state[f"blocks.{i}.attn.o_proj.weight"]
        )
    assert torch.equal(tensors["output_norm.bias"], state["final_norm.bias"])
    # The bytes tokenizer: 256 byte symbols, <|endoftext|>, then unused padding to the vocab.
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size == 512
    assert fields["tokenizer.ggml.tokens"][:3] == ["Ā", "ā", "Ă"]  # GPT-2's symbols of bytes 0-2
    assert fields["tokenizer.ggml.tokens"][ord("A")] == "A"
    assert fields["tokenizer.ggml.tokens"][256] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"][256] == 3  # control
    assert fields["tokenizer.ggml.token_type"][300] == 5  # unused padding
    assert fields["tokenizer.ggml.merges"] == []  # present (llama.cpp requires it) but empty
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 256


def interleaved_rotary(x, theta):
    """llama.cpp's (NORM) rotary: adjacent pairs (2i, 2i + 1) turn by position * theta^(-2i/d)."""
    length, _heads, dim = x.shape
    angles = torch.arange(length)[:, None] * theta ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def test_gguf_llama_metadata_and_rotary_permutation_keep_attention_scores(tmp_path):
    from promethean.model.layers import apply_rotary, rotary_cos_sin, rotary_inverse_frequencies

    model = build("tiny-llama")
    config = model.config
    fields, tensors = read_gguf(export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf"))
    assert fields["general.architecture"] == "llama"
    for key, value in {
        "context_length": 256, "embedding_length": 128, "block_count": 4,
        "feed_forward_length": 352, "attention.head_count": 4, "attention.head_count_kv": 1,
        "rope.dimension_count": 32, "vocab_size": 512,
    }.items():
        assert fields[f"llama.{key}"] == value, key
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert sorted(tensors) == expected_gguf_names(config, "llama")
    state = model.state_dict()
    for i in range(4):
        for ours, theirs in [("attn.v_proj", "attn_v"), ("attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down")]:
            assert torch.equal(tensors[f"blk.{i}.{theirs}.weight"], state[f"blocks.{i}.{ours}.weight"])
        assert tensors[f"blk.{i}.attn_k.weight"].shape == (32, 128)
    assert torch.equal(tensors["output.weight"], state["lm_head.weight"])
    assert len(fields["tokenizer.ggml.tokens"]) == 512

    # The permuted projections under llama.cpp's rotary give our attention scores exactly.
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_cos_sin(torch.arange(10), rotary_inverse_frequencies(32, 10000.0))
    q = (x @ state["blocks.0.attn.q_proj.weight"].t()).view(10, 4, 32).transpose(0, 1)
    k = (x @ state["blocks.0.attn.k_proj.weight"].t()).view(10, 1, 32).transpose(0, 1)
    ours = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)
    q_gguf = interleaved_rotary((x @ tensors["blk.0.attn_q.weight"].t()).view(10, 4, 32), 10000.0)
    k_gguf = interleaved_rotary((x @ tensors["blk.0.attn_k.weight"].t()).view(10, 1, 32), 10000.0)
    theirs = q_gguf.transpose(0, 1) @ k_gguf.transpose(0, 1).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # ... and without the permutation they would not.
    plain_q = interleaved_rotary((x @ state["blocks.0.attn.q_proj.weight"].t()).view(10, 4, 32), 1e4)
    assert not torch.allclose(plain_q.transpose(0, 1) @ k_gguf.transpose(0, 1).transpose(-1, -2), ours)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_transformers_gguf_loader_reads_back_our_model_and_tokenizer(preset, tmp_path):
    """transformers reads GGUF the way llama.cpp lays it out (undoing the Q/K permutation): an
    independent reader that must give back our logits and our token ids."""
    import transformers

    model = build(preset)
    export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    # transformers maps gpt2.context_length to an unused attribute, not n_positions.
    extra = {"n_positions": 256} if preset == "tiny-gpt2" else {}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32, **extra
    ).eval()
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Hello, naïve world!"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)


def byte_pair_encode(word, merge_ranks, token_ids):
    """GPT-2's BPE of one pre-tokenized word, from a GGUF's tokens and merges."""
    symbols = "".join(GPT2_BYTE_SYMBOLS[byte] for byte in word.encode("utf-8"))
    parts = list(symbols)
    while len(parts) > 1:
        rank, index = min((merge_ranks.get((a, b), math.inf), i)
                          for i, (a, b) in enumerate(itertools.pairwise(parts)))
        if rank == math.inf:
            break
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return [token_ids[part] for part in parts]




def test_gguf_gpt2_tokenizer_merges_tokenize_as_tiktoken_does(tmp_path):
    tokenizer = GPT2Tokenizer()
    model = build("tiny-gpt2", vocab_size=50257)
    fields, _ = read_gguf(export_gguf(model, tokenizer, tmp_path / "m.gguf"))
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>"
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    merge_ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}
    token_ids = {token: token_id for token_id, token in enumerate(tokens)}
    for word in ["Hello", " world", " tokenization", " Promethean", "!!!", " naïve", "\n\n"]:
        assert byte_pair_encode(word, merge_ranks, token_ids) == tokenizer.encode_ordinary(word)


def test_gguf_trained_bpe_tokenizer_keeps_its_ids_and_merges(tmp_path):
    tokenizer = train_bpe(generated_documents(), vocab_size=300)
    model = build("tiny-llama")
    fields, _ = read_gguf(export_gguf(model, tokenizer, tmp_path / "m.gguf"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 512
    definition = json.loads(tokenizer.hf_tokenizer.to_str())
    for text, token_id in definition["model"]["vocab"].items():
        assert tokens[token_id] == text
    assert tokens[tokenizer.eot_id] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"][tokenizer.eot_id] == 3
    assert fields["tokenizer.ggml.token_type"][tokenizer.vocab_size:] == [5] * (512 - tokenizer.vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in definition["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges and merges
    merge_ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    assert byte_pair_encode(" quick", merge_ranks, ids) == tokenizer.encode(" quick")


def test_gguf_refuses_a_char_tokenizer(tmp_path):
    with pytest.raises(PrometheanError) as caught:
        export_gguf(build("tiny-gpt2"), train_char(["abc"]), tmp_path / "m.gguf")
    assert str(caught.value) == (
        "cannot export to GGUF: the char tokenizer maps characters to ids in a way llama.cpp's "
        "tokenizers cannot reproduce; only bytes, gpt2, bpe and byte-level BPE hf tokenizers can."
    )
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the command
def test_export_gguf_through_the_cli_writes_beside_the_checkpoint(checkpoints):
    checkpoint = checkpoints["tiny-llama"]
    result = run("export", str(checkpoint), "--format", "gguf")
    assert result.returncode == 0, result.stderr
    written = checkpoint.with_name("tiny-llama.gguf")
    assert written.is_file() and str(written) in result.stdout.replace("\n", "")
    assert read_gguf(written)[0]["general.architecture"] == "llama"


def test_an_existing_output_is_replaced_only_when_asked_and_atomically(checkpoints, tmp_path):
    out = export_checkpoint(checkpoints["tiny-llama"], "gguf", tmp_path / "model.gguf")
    with pytest.raises(PrometheanError) as caught:
        export_checkpoint(checkpoints["tiny-gpt2"], "gguf", out)
    assert str(caught.value) == f"{out} already exists; pass --overwrite to replace it."
    assert read_gguf(out)[0]["general.architecture"] == "llama"
    export_checkpoint(checkpoints["tiny-gpt2"], "gguf", out, overwrite=True)
    assert read_gguf(out)[0]["general.architecture"] == "gpt2"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left


def test_gguf_refuses_gemma3_and_the_ssm_hybrid(checkpoints):
    fails_with(
        run("export", str(checkpoints["tiny-gemma3"]), "--format", "gguf"),
        "cannot export to GGUF: only GPT-2 and LLaMA-style models are written as GGUF, and this "
        "is a Gemma-3-style model (sandwich norms, QK-norm, embedding scaling).",
    )
    fails_with(
        run("export", str(checkpoints["tiny-sssm"]), "--format", "gguf"),
        "cannot export to GGUF: the selective state-space (SSM) layers [0, 2] have no "
        "counterpart in llama.cpp's GPT-2 or LLaMA architectures.",
    )


def test_hf_refuses_the_ssm_hybrid(checkpoints, tmp_path):
    fails_with(
        run("export", str(checkpoints["tiny-sssm"]), "--format", "hf", "--out", str(tmp_path / "x")),
        "this model cannot be exported to HF transformers: its selective state-space (SSM) layers "
        "[0, 2] have no counterpart in the GPT-2, LLaMA or Gemma-3 layouts; keep it as a "
        "Promethean checkpoint.",
    )
    assert not (tmp_path / "x").exists()


def test_unknown_format(checkpoints):
    fails_with(
        run("export", str(checkpoints["tiny-gpt2"]), "--format", "tflite"),
        "unknown export format 'tflite'; choose one of hf, onnx, gguf.",
    )


def test_missing_checkpoint(tmp_path):
    fails_with(
        run("export", str(tmp_path / "nowhere"), "--format", "onnx"),
        f"checkpoint directory {tmp_path / 'nowhere'} does not exist.",
    )
    fails_with(
        run("export", str(tmp_path), "--format", "onnx"),
        f"{tmp_path} is not a checkpoint: config.json is missing.",
    )


@pytest.mark.parametrize(
    ("export_format", "blocked", "sentence"),
    [
        ("gguf", ["gguf"], "exporting to GGUF needs the gguf package: pip install 'promethean[export]'"),
        ("onnx", ["onnx", "onnxscript"],
         "exporting to ONNX needs the onnx and onnxscript packages: pip install 'promethean[export]'"),
    ],
)
def test_a_missing_optional_package_names_the_install_command(
    checkpoints, tmp_path, export_format, blocked, sentence
):
    # The CLI's own entry point, in a process where importing the packages fails.
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from promethean.cli import main\n"
        f"sys.argv = ['promethean', 'export', {str(checkpoints['tiny-gpt2'])!r}, '--format', "
        f"{export_format!r}, '--out', {str(tmp_path / 'out')!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    fails_with(result, sentence)
