"""Importing other systems' PyTorch checkpoints: each reference model below is written the way its
own system writes it (nanoGPT's model.py, the Gemma-3 "LLMs from scratch" notebook, MiniMacLLM's
ContinualLLM), saved with torch.save as that system saves it, and imported with our code; the
imported Promethean model must compute the same logits. Files that would run code are refused
before anything is unpickled."""

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promethean.checkpoint import load_checkpoint
from promethean.errors import CheckpointError, ConfigError
from promethean.interop.torch_import import import_torch, read_meta_pkl
from promethean.model import Transformer

ATOL = 1e-5


def trained_like(model: nn.Module, seed: int, gain_names=("ln", "norm")) -> nn.Module:
    """Every parameter random and non-zero (biases too), norm gains away from 1: what training
    leaves, so that a mistake in any tensor's placement shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if any(part in name for part in gain_names) and name.endswith(("weight", "scale")):
                parameter.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            elif parameter.ndim == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))  # activations stay O(1)
            else:
                parameter.copy_(0.3 * noise)
    return model.eval()


def ours(result) -> Transformer:
    with torch.device("meta"):
        model = Transformer(result.config)
    model.load_state_dict(result.state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def tokens(vocab: int, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ nanoGPT (model.py)
@dataclasses.dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd, self.flash = config.n_head, config.n_embd, flash
        if not flash:  # nanoGPT before PyTorch 2.0 keeps the causal mask as a buffer
            mask = torch.tril(torch.ones(config.block_size, config.block_size))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        self.ln_1 = NanoLayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = NanoLayerNorm(config.n_embd, bias=config.bias)
        self.mlp = NanoMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config, flash=True):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([NanoBlock(config, flash) for _ in range(config.n_layer)]),
            ln_f=NanoLayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt(seed=0, flash=True, **fields) -> GPT:
    torch.manual_seed(seed)
    return trained_like(GPT(GPTConfig(**fields), flash), seed)


def save_nanogpt_ckpt(model: GPT, path, compiled=False):
    """What nanoGPT's train.py writes: raw_model.state_dict() (of the compiled model when
    compile=True), an AdamW state after a step, model_args, iter_num, best_val_loss, config."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = model.state_dict()
    if compiled:
        state = {f"_orig_mod.{name}": tensor for name, tensor in state.items()}
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                      block_size=c.block_size, bias=c.bias, vocab_size=c.vocab_size, dropout=0.1)
    torch.save({
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 2000,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3, "compile": compiled},
    }, path)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_nanogpt_ckpt_gives_its_logits(tmp_path, bias, compiled):
    model = nanogpt(bias=bias)
    save_nanogpt_ckpt(model, tmp_path / "ckpt.pt", compiled=compiled)
    result = import_torch(tmp_path / "ckpt.pt")
    assert result.format == "nanogpt"
    assert result.config.mlp == "gelu_exact" and result.config.bias is bias
    assert result.config.tie_embeddings
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)
    notes = " ".join(result.notes)
    assert "optimizer state" in notes and "iter_num (2000)" in notes
    assert ("_orig_mod." in notes) is compiled
    assert "dropout 0.1" in notes


def test_old_nanogpt_causal_mask_buffers_are_ignored(tmp_path):
    model = nanogpt(flash=False)
    assert "transformer.h.0.attn.bias" in model.state_dict()
    torch.save({"model": model.state_dict(), "model_args": dict(
        n_layer=2, n_head=4, n_embd=32, block_size=16, bias=True, vocab_size=96, dropout=0.0)},
        tmp_path / "ckpt.pt")
    result = import_torch(tmp_path / "ckpt.pt")
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)
    assert any("ignored 2 tensors without learned state" in note for note in result.notes)


def test_exact_gelu_is_not_the_tanh_form():
    """The option the nanoGPT import relies on computes erf GELU, which differs from tanh GELU."""
    from promethean.config import load_preset

    config = load_preset("tiny-gpt2").model
    torch.manual_seed(0)
    tanh_model = Transformer(config).eval()
    exact_model = Transformer(config.with_overrides(mlp="gelu_exact")).eval()
    exact_model.load_state_dict(tanh_model.state_dict())
    x = torch.randn(3, config.n_embd) * 3
    mlp = exact_model.blocks[0].mlp
    expected = mlp.down_proj(F.gelu(mlp.up_proj(x)))
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(tanh_model.blocks[0].mlp(x), expected, atol=1e-6)


def test_bare_gpt2_chat_state_dict_infers_sizes_and_says_so(tmp_path):
    # models/gpt2_nano.pt of the GPT-2 chat card: torch.save(model.state_dict()), no config.
    model = nanogpt(n_embd=128, n_head=2, vocab_size=80, block_size=20)
    torch.save(model.state_dict(), tmp_path / "gpt2_nano.pt")
    result = import_torch(tmp_path / "gpt2_nano.pt")
    c = result.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.context_length) == (2, 128, 2, 80, 20)
    assert any("assumed 2 heads of 64 (GPT-2's convention)" in note for note in result.notes)
    ids = tokens(80)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)


def test_bare_state_dict_takes_the_head_count_given(tmp_path):
    model = nanogpt(n_embd=32, n_head=8)
    torch.save(model.state_dict(), tmp_path / "gpt2_nano.pt")
    with pytest.raises(CheckpointError, match="give the head count with --n-head"):
        import_torch(tmp_path / "gpt2_nano.pt")
    result = import_torch(tmp_path / "gpt2_nano.pt", n_head=8)
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("module", ["model", "__main__"])
def test_finetuned_file_with_a_pickled_gptconfig_object(tmp_path, monkeypatch, module):
    # finetuned_*.pt of the GPT-2 chat card: the config is the GPTConfig instance itself.
    pickled_class = dataclasses.make_dataclass(
        "GPTConfig", [(f.name, f.type, dataclasses.field(default=f.default))
                      for f in dataclasses.fields(GPTConfig)])
    pickled_class.__module__ = module
    if module == "__main__":
        monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", pickled_class, raising=False)
    else:
        fake = types.ModuleType(module)
        fake.GPTConfig = pickled_class
        monkeypatch.setitem(sys.modules, module, fake)
    model = nanogpt(seed=3, n_head=2)
    torch.save({"model_state_dict": model.state_dict(),
                "config": pickled_class(**dataclasses.asdict(model.config)),
                "iter": 150, "train_loss": 1.25, "val_loss": 1.5},
               tmp_path / "finetuned_20250101_120000.pt")
    monkeypatch.undo()  # the class is gone when the file is read, as in a fresh process
    result = import_torch(tmp_path / "finetuned_20250101_120000.pt")
    assert result.config.n_head == 2  # from the pickled config, not GPT-2's convention
    assert not any("assumed" in note for note in result.notes)
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ meta.pkl
def write_meta(path, characters):
    stoi = {ch: i for i, ch in enumerate(characters)}
    itos = {i: ch for i, ch in enumerate(characters)}
    with open(path, "wb") as handle:
        pickle.dump({"vocab_size": len(characters), "itos": itos, "stoi": stoi}, handle)


def test_meta_pkl_becomes_a_char_tokenizer_with_the_same_predictions(tmp_path):
    characters = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.!?"))
    model = nanogpt(vocab_size=len(characters), block_size=32)
    save_nanogpt_ckpt(model, tmp_path / "ckpt.pt")
    write_meta(tmp_path / "meta.pkl", characters)
    result = import_torch(tmp_path / "ckpt.pt", meta=tmp_path / "meta.pkl")
    tokenizer = result.tokenizer
    text = "Before we speak, hear me!"
    our_ids = tokenizer.encode(text)
    assert tokenizer.decode(our_ids) == text
    their_ids = [characters.index(ch) for ch in text]
    assert our_ids == [257 + i for i in their_ids]
    with torch.no_grad():
        mine = ours(result)(torch.tensor([our_ids])).logits
        theirs = model(torch.tensor([their_ids]))
    # The characters' logits are nanoGPT's, in the char tokenizer's order.
    torch.testing.assert_close(mine[..., 257:], theirs, atol=ATOL, rtol=0)
    assert any("never trained" in note for note in result.notes)


def test_meta_pkl_with_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    with open(tmp_path / "meta.pkl", "wb") as handle:
        pickle.dump({"itos": Malicious(marker)}, handle)
    with pytest.raises(CheckpointError) as error:
        read_meta_pkl(tmp_path / "meta.pkl")
    assert str(error.value) == (f"{tmp_path / 'meta.pkl'} holds a pickled reference to "
                                f"{os.system.__module__}.system, which could run code; refused.")
    assert not marker.exists()


# ------------------------------------------------------------------------------ malicious files
class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class MaliciousConfig:
    """Named like a config class, but unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


MaliciousConfig.__name__ = MaliciousConfig.__qualname__ = "GPTConfig"


@pytest.mark.parametrize("payload", [Malicious, MaliciousConfig])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "PWNED"
    model = nanogpt()
    torch.save({"model_state_dict": model.state_dict(), "config": payload(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as error:
        import_torch(tmp_path / "evil.pt")
    assert str(error.value) == (f"{tmp_path / 'evil.pt'} holds a pickled reference to "
                                f"{os.system.__module__}.system, which could run code; refused.")
    assert not marker.exists()


def test_a_config_class_with_an_unknown_name_is_refused(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class TrainingSettings:
        lr: float = 0.1

    TrainingSettings.__module__ = "train"
    TrainingSettings.__qualname__ = "TrainingSettings"
    fake = types.ModuleType("train")
    fake.TrainingSettings = TrainingSettings
    monkeypatch.setitem(sys.modules, "train", fake)
    torch.save({"model": nanogpt().state_dict(), "config": TrainingSettings()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="pickled reference to train.TrainingSettings"):
        import_torch(tmp_path / "x.pt")


# ------------------------------------------------------------------------------ Gemma-3 (notebook)
class GemmaFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc1(x), approximate="tanh") * self.fc2(x))


class GemmaRMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6, bias=False):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        x_f = x.float()
        x_norm = x_f * torch.rsqrt(x_f.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        out = x_norm * (1.0 + self.scale.float())
        if self.shift is not None:
            out = out + self.shift.float()
        return out.to(x.dtype)


def compute_rope_params(head_dim, theta_base, context_length):
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(context_length).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    seq_len, head_dim = x.shape[2], x.shape[3]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    cos, sin = cos[:seq_len][None, None], sin[:seq_len][None, None]
    return ((x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)).to(x.dtype)


class GemmaGroupedQueryAttention(nn.Module):
    def __init__(self, d_in, num_heads, num_kv_groups, head_dim, query_pre_attn_scalar):
        super().__init__()
        self.num_heads, self.num_kv_groups = num_heads, num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.head_dim, self.d_out = head_dim, num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False)
        self.q_norm = GemmaRMSNorm(head_dim, eps=1e-6)
        self.k_norm = GemmaRMSNorm(head_dim, eps=1e-6)
        self.scaling = query_pre_attn_scalar ** -0.5

    def forward(self, x, mask, cos, sin):
        b, n, _ = x.shape
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)
        scores = (queries * self.scaling) @ keys.transpose(2, 3)
        weights = torch.softmax(scores.masked_fill(mask, -torch.inf), dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out))


class GemmaBlock(nn.Module):
    def __init__(self, cfg, attn_type):
        super().__init__()
        self.attn_type = attn_type
        self.att = GemmaGroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"],
                                              cfg["head_dim"], cfg["query_pre_attn_scalar"])
        self.ff = GemmaFeedForward(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg["emb_dim"])
        self.post_attention_layernorm = GemmaRMSNorm(cfg["emb_dim"])
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg["emb_dim"])
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg["emb_dim"])

    def forward(self, x, mask_global, mask_local, cos_global, sin_global, cos_local, sin_local):
        sliding = self.attn_type == "sliding_attention"
        mask = mask_local if sliding else mask_global
        cos, sin = (cos_local, sin_local) if sliding else (cos_global, sin_global)
        x = x + self.post_attention_layernorm(self.att(self.input_layernorm(x), mask, cos, sin))
        return x + self.post_feedforward_layernorm(self.ff(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.blocks = nn.ModuleList([GemmaBlock(cfg, kind) for kind in cfg["layer_types"]])
        self.final_norm = GemmaRMSNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        for name, theta in (("local", cfg["rope_local_base"]), ("global", cfg["rope_base"])):
            cos, sin = compute_rope_params(cfg["head_dim"], theta, cfg["context_length"])
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)

    def forward(self, input_ids):
        seq_len = input_ids.shape[1]
        x = self.tok_emb(input_ids) * (self.cfg["emb_dim"] ** 0.5)
        ones = torch.ones((seq_len, seq_len), dtype=torch.bool)
        mask_global = torch.triu(ones, diagonal=1)
        mask_local = mask_global | torch.triu(ones, diagonal=self.cfg["sliding_window"]).T
        for block in self.blocks:
            x = block(x, mask_global, mask_local, self.cos_global, self.sin_global,
                      self.cos_local, self.sin_local)
        return self.out_head(self.final_norm(x))


GEMMA_TINY = {
    "vocab_size": 300, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 7,
    "hidden_dim": 48, "head_dim": 16, "qk_norm": True, "n_kv_groups": 2,
    "rope_local_base": 10_000.0, "rope_base": 1_000_000.0, "sliding_window": 4,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
    "query_pre_attn_scalar": 12,
}


def test_gemma3_from_scratch_state_dict_gives_its_logits(tmp_path):
    torch.manual_seed(0)
    model = trained_like(Gemma3Model(GEMMA_TINY), seed=4, gain_names=("norm",))
    torch.save(model.state_dict(), tmp_path / "best_model_params.pt")
    # The file has no config; the sizes come from the shapes, the rest from --config.
    settings = {k: GEMMA_TINY[k] for k in ("context_length", "rope_local_base", "rope_base",
                                           "sliding_window", "layer_types",
                                           "query_pre_attn_scalar")}
    (tmp_path / "model.json").write_text(json.dumps(settings))
    result = import_torch(tmp_path / "best_model_params.pt", config=tmp_path / "model.json")
    c = result.config
    assert result.format == "gemma3-scratch"
    assert (c.n_layer, c.n_head, c.kv_heads, c.head_size, c.global_layers) == (7, 4, 2, 16, (5,))
    assert not c.tie_embeddings  # the from-scratch model trains its own output head
    ids = tokens(300, length=12)  # longer than the window of 4, so the sliding layers matter
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)


def test_gemma3_defaults_are_the_tinystories_cards(tmp_path):
    """Without --config, the non-shape settings are the card's: window 512, 10k/1M, 5:1."""
    cfg = {**GEMMA_TINY, "n_layers": 6, "layer_types": None}
    cfg["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    torch.manual_seed(0)
    model = Gemma3Model({**cfg, "context_length": 32768, "sliding_window": 512,
                         "query_pre_attn_scalar": 256})
    torch.save(model.state_dict(), tmp_path / "best_model_params.pt")
    c = import_torch(tmp_path / "best_model_params.pt").config
    assert (c.context_length, c.sliding_window, c.global_layers) == (32768, 512, (5,))
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)


def test_gemma3_norm_with_a_nonzero_shift_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Gemma3Model(GEMMA_TINY)
    model.final_norm.shift = nn.Parameter(torch.full((32,), 0.5))
    torch.save(model.state_dict(), tmp_path / "best_model_params.pt")
    with pytest.raises(CheckpointError, match="non-zero shift \\(final_norm.shift\\)"):
        import_torch(tmp_path / "best_model_params.pt")


# ------------------------------------------------------------------------------ MiniMacLLM
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class MiniMacRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 / torch.sqrt(torch.mean(x32 ** 2, dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


class MiniMacAttention(nn.Module):
    def __init__(self, d_model, num_query_heads, num_kv_heads):
        super().__init__()
        self.h, self.kv, self.head_dim = num_query_heads, num_kv_heads, d_model // num_query_heads
        self.q_proj = nn.Linear(d_model, num_query_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_query_heads * self.head_dim, d_model, bias=False)

    def forward(self, x, cos, sin, mask):
        b, n, d = x.shape
        q = self.q_proj(x).view(b, n, self.h, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[None, None], sin[None, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, n, self.head_dim).reshape(b, self.h, n, -1)
        v = v[:, :, None].expand(b, self.kv, rep, n, self.head_dim).reshape(b, self.h, n, -1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((weights @ v).transpose(1, 2).contiguous().view(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MiniMacBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = MiniMacAttention(c["d_model"], c["num_query_heads"], c["num_kv_heads"])
        self.feed_forward = SwiGLU(c["d_model"], c["d_ff"])
        self.attention_norm = MiniMacRMSNorm(c["d_model"])
        self.ffn_norm = MiniMacRMSNorm(c["d_model"])

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class ContinualLLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.token_embedding = nn.Embedding(c["vocab_size"], c["d_model"])
        head_dim = c["d_model"] // c["num_query_heads"]
        inv_freq = 1.0 / (c["rope_base"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList([MiniMacBlock(c) for _ in range(c["num_layers"])])
        self.norm = MiniMacRMSNorm(c["d_model"])
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.token_embedding.weight

    def forward(self, ids):
        n = ids.shape[1]
        freqs = torch.outer(torch.arange(n).float(), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        mask = torch.triu(torch.ones(n, n), diagonal=1).masked_fill(
            torch.triu(torch.ones(n, n), diagonal=1) == 1, float("-inf")).view(1, 1, n, n)
        x = self.token_embedding(ids)
        for layer in self.layers:
            x = layer(x, emb.cos(), emb.sin(), mask)
        return self.lm_head(self.norm(x))


MINIMAC_TINY = {"vocab_size": 320, "d_model": 32, "num_layers": 2, "num_query_heads": 4,
                "num_kv_heads": 1, "d_ff": 64, "max_seq_len": 64, "dropout": 0.0,
                "norm_type": "rmsnorm", "ff_type": "swiglu", "norm_eps": 1e-6, "bias": False,
                "rope_base": 10000.0, "tie_embeddings": True}


def minimac(seed=0) -> ContinualLLM:
    torch.manual_seed(seed)
    return trained_like(ContinualLLM(MINIMAC_TINY), seed)


@pytest.mark.parametrize("config_as", ["dict", "dataclass"])
def test_minimac_model_pt_gives_its_logits(tmp_path, monkeypatch, config_as):
    model = minimac()
    config = dict(MINIMAC_TINY)
    if config_as == "dataclass":  # MiniMacLLM's own ModelConfig object, pickled whole
        cls = dataclasses.make_dataclass("ModelConfig", list(config))
        cls.__module__ = "src.model.llm"
        for name in ("src", "src.model", "src.model.llm"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["src.model.llm"].ModelConfig = cls
        config = cls(**config)
    torch.save({"model_state_dict": model.state_dict(), "config": config, "loss": 5.324,
                "epoch": 5}, tmp_path / "model.pt")
    monkeypatch.undo()
    result = import_torch(tmp_path / "model.pt")
    assert result.format == "minimac" and result.config.kv_heads == 1
    ids = tokens(320)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)
    assert any("loss (5.324)" in note and "epoch (5)" in note for note in result.notes)


def test_a_mapping_adapts_a_variant_of_minimac_names(tmp_path):
    model = minimac(seed=2)
    state = {name.replace(".feed_forward.", ".mlp."): t for name, t in model.state_dict().items()}
    torch.save({"model_state_dict": state, "config": MINIMAC_TINY}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as error:
        import_torch(tmp_path / "model.pt")
    assert str(error.value) == (
        f"{tmp_path / 'model.pt'} lacks 6 tensors a MiniMacLLM ContinualLLM of this size needs "
        "(layers.0.feed_forward.w1.weight, layers.1.feed_forward.w1.weight, "
        "layers.0.feed_forward.w3.weight, layers.1.feed_forward.w3.weight, "
        "layers.0.feed_forward.w2.weight, layers.1.feed_forward.w2.weight) and holds 6 tensors "
        "that match nothing (layers.0.mlp.w1.weight, layers.0.mlp.w2.weight, "
        "layers.0.mlp.w3.weight, layers.1.mlp.w1.weight, layers.1.mlp.w2.weight, "
        "layers.1.mlp.w3.weight); a --mapping TOML can name where tensors go.")
    (tmp_path / "map.toml").write_text(
        '[tensors]\n'
        '"blocks.{layer}.mlp.gate_proj.weight" = "layers.{layer}.mlp.w1.weight"\n'
        '"blocks.{layer}.mlp.up_proj.weight" = "layers.{layer}.mlp.w3.weight"\n'
        '"blocks.{layer}.mlp.down_proj.weight" = "layers.{layer}.mlp.w2.weight"\n')
    result = import_torch(tmp_path / "model.pt", mapping=tmp_path / "map.toml")
    ids = tokens(320)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ any state dict
def test_state_dict_with_a_mapping(tmp_path):
    """An unknown layout: a Gemma-style norm stored as the gain minus one (add_one), names of
    its own, and a rotary table to ignore; its logits are the MiniMac reference's."""
    model = minimac(seed=5)
    theirs = {}
    for name, tensor in model.state_dict().items():
        name = (name.replace("token_embedding", "tok").replace("layers.", "h.")
                .replace(".attention.", ".att.").replace(".feed_forward.", ".ff."))
        theirs[name] = tensor - 1.0 if name.endswith("norm.weight") else tensor
    del theirs["lm_head.weight"]
    for layer in range(2):
        theirs[f"h.{layer}.rotary.freqs"] = torch.ones(4)
    torch.save(theirs, tmp_path / "weights.pt")
    lines = ['[model]', 'vocab_size = 320', 'context_length = 64', 'n_layer = 2', 'n_embd = 32',
             'n_head = 4', 'n_kv_head = 1', 'd_ff = 64', 'mlp = "swiglu"', 'norm = "rmsnorm"',
             'norm_eps = 1e-6', 'position = "rope"', '[tensors]',
             'ignore = ["h.{layer}.rotary.freqs"]',
             '"token_embedding.weight" = "tok.weight"',
             '"final_norm.weight" = { from = "norm.weight", transform = "add_one" }']
    for ours_name, their_name in (("attn.q_proj", "att.q_proj"), ("attn.k_proj", "att.k_proj"),
                                  ("attn.v_proj", "att.v_proj"), ("attn.o_proj", "att.o_proj"),
                                  ("mlp.gate_proj", "ff.w1"), ("mlp.up_proj", "ff.w3"),
                                  ("mlp.down_proj", "ff.w2")):
        lines.append(f'"blocks.{{layer}}.{ours_name}.weight" = "h.{{layer}}.{their_name}.weight"')
    for ours_name, their_name in (("attn_norm", "attention_norm"), ("mlp_norm", "ffn_norm")):
        lines.append(f'"blocks.{{layer}}.{ours_name}.weight" = '
                     f'{{ from = "h.{{layer}}.{their_name}.weight", transform = "add_one" }}')
    (tmp_path / "map.toml").write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="cannot tell which system wrote"):
        import_torch(tmp_path / "weights.pt")
    result = import_torch(tmp_path / "weights.pt", "state-dict", mapping=tmp_path / "map.toml")
    ids = tokens(320)
    with torch.no_grad():
        torch.testing.assert_close(ours(result)(ids).logits, model(ids), atol=ATOL, rtol=0)
    assert any("ignored 2 tensors" in note for note in result.notes)


def test_state_dict_needs_a_mapping(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match="needs a --mapping TOML"):
        import_torch(tmp_path / "weights.pt", "state-dict")


def test_not_a_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        import_torch(tmp_path / "notes.pt")


# ------------------------------------------------------------------------------ the CLI
def run(*args):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], capture_output=True,
                            text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_cli_converts_a_nanogpt_char_model_and_generate_runs_on_it(tmp_path):
    characters = sorted(set("To be, or not to be: that is the question.\n"))
    model = nanogpt(vocab_size=len(characters))
    save_nanogpt_ckpt(model, tmp_path / "ckpt.pt")
    write_meta(tmp_path / "meta.pkl", characters)
    out = tmp_path / "imported"
    converted = run("convert", "from-torch", str(tmp_path / "ckpt.pt"), "--out", str(out),
                    "--tokenizer", str(tmp_path / "meta.pkl"))
    assert converted.returncode == 0, converted.stderr
    assert "format: nanogpt" in converted.stdout
    assert "ignored the file's" in converted.stdout and "optimizer state" in converted.stdout
    loaded = load_checkpoint(out)
    assert loaded.tokenizer.kind == "char"
    assert loaded.model.config.mlp == "gelu_exact"
    generated = run("generate", str(out), "--prompt", "To be", "--max-new-tokens", "8",
                    "--seed", "0", "--top-k", str(len(characters)))
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("To be")

    again = run("convert", "from-torch", str(tmp_path / "ckpt.pt"), "--out", str(out),
                "--tokenizer", str(tmp_path / "meta.pkl"))
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and len(again.stderr.strip().splitlines()) == 1
    assert run("convert", "from-torch", str(tmp_path / "ckpt.pt"), "--out", str(out),
               "--tokenizer", str(tmp_path / "meta.pkl"), "--overwrite").returncode == 0


def test_cli_refuses_a_malicious_file_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"model": Malicious(marker)}, tmp_path / "evil.pt")
    result = run("convert", "from-torch", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {tmp_path / 'evil.pt'} holds a pickled reference "
                                     f"to {os.system.__module__}.system, which could run code; "
                                     "refused.")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_cli_asks_for_a_tokenizer_when_the_vocabulary_is_small(tmp_path):
    torch.save({"model_state_dict": minimac().state_dict(), "config": MINIMAC_TINY},
               tmp_path / "model.pt")
    result = run("convert", "from-torch", str(tmp_path / "model.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "name its tokenizer with --tokenizer" in result.stderr
    ok = run("convert", "from-torch", str(tmp_path / "model.pt"), "--out", str(tmp_path / "o"),
             "--tokenizer", "bytes")
    assert ok.returncode == 0, ok.stderr
    assert "format: minimac" in ok.stdout


def test_an_exact_gelu_model_prepared_for_inference_keeps_its_logits():
    """The CPU kernels compute GELU's tanh form only: an exact-GELU model prepared for them
    applies the exact one between the products, and decodes without the fused step."""
    from promethean.config import load_preset
    from promethean.inference import fused_decode, kernels
    from promethean.inference.quantize import prepare_for_inference

    config = load_preset("tiny-gpt2").model.with_overrides(mlp="gelu_exact")
    torch.manual_seed(0)
    reference = Transformer(config).eval()
    prepared = Transformer(config).eval()
    prepared.load_state_dict(reference.state_dict())
    prepare_for_inference(prepared, "fp32")
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
        cache = prepared.new_cache(2)
        prepared(ids[:, :8], cache=cache)
        step = prepared(ids[:, 8:9], cache=cache).logits
        torch.testing.assert_close(step, reference(ids[:, :9]).logits[:, 8:9], atol=1e-4, rtol=0)
    if kernels.available():
        assert prepared.fused_decode is None
        assert fused_decode.install(prepared) == (
            "layer 0 has an exact-GELU MLP, which the fused step does not compute")


@pytest.mark.parametrize("wrong, sentence", [
    ("minimac", "has no tensor 'token_embedding.weight', so it is not a MiniMacLLM checkpoint."),
    ("gemma3-scratch", "has no tensor 'tok_emb.weight', so it is not a Gemma-3 from-scratch "
                       "state dict."),
])
def test_a_wrong_format_is_one_sentence(tmp_path, wrong, sentence):
    save_nanogpt_ckpt(nanogpt(), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as error:
        import_torch(tmp_path / "ckpt.pt", wrong)
    assert str(error.value) == f"{tmp_path / 'ckpt.pt'} {sentence}"


def test_gguf_refuses_exact_gelu_in_a_sentence():
    from promethean.config import load_preset
    from promethean.interop.export import gguf_problem

    config = load_preset("tiny-gpt2").model.with_overrides(mlp="gelu_exact")
    assert gguf_problem(config) == (
        "cannot export to GGUF as llama.cpp's gpt2 architecture, which cannot express: "
        "mlp = 'gelu_exact' (llama.cpp computes GELU in its tanh approximation).")


@pytest.mark.parametrize("entry, sentence", [
    ('"final_norm.weight" = { from = "norm.weight", transform = "negate" }',
     "tensors.\"final_norm.weight\" has transform 'negate'; known transforms are copy, add_one, "
     "transpose."),
    ('"blocks.{layer}.attn_norm.weight" = "norm.weight"',
     "tensors.\"blocks.{layer}.attn_norm.weight\" = \"norm.weight\" must use {layer} on both "
     "sides or on neither."),
])
def test_a_bad_mapping_entry_is_one_sentence(tmp_path, entry, sentence):
    (tmp_path / "map.toml").write_text(f"[tensors]\n{entry}\n")
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(ConfigError) as error:
        import_torch(tmp_path / "weights.pt", "state-dict", mapping=tmp_path / "map.toml")
    assert str(error.value) == f"{tmp_path / 'map.toml'}: {sentence}"
