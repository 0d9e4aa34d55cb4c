"""Continual learning: LoRA adapters, replay buffer, EWC, `learn` stages and the forgetting report."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.continual.adapters import (
    ADAPTER_CONFIG_FILE,
    AdapterError,
    Adapters,
    checkpoint_sha256,
    load_adapter_onto,
    model_sha256,
)
from promethean.continual.ewc import EWC, estimate_fisher
from promethean.continual.forgetting import draw_heatmap, forgetting_report
from promethean.continual.learn import LearnOptions, learn
from promethean.continual.run_record import read_run
from promethean.continual.replay import ReplayBuffer, ReplayMixer
from promethean.data.batches import TokenDataset, WindowSampler
from promethean.errors import PrometheanError
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build, generated_documents, trained_like


# Tiny models: one thread is as fast and does not thrash a busy machine (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(batch=2, length=16, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(adapters, name, scale=0.05, seed=1):
    """A trained-looking adapter: B no longer zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(name).values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_new_adapter_leaves_logits_equal_and_only_it_trains(preset):
    model = build(preset)
    idx = tokens()
    before = model(idx).logits
    keys = set(model.state_dict())
    adapters = Adapters(model)
    info = adapters.add("domain", rank=4, alpha=8)
    assert torch.equal(model(idx).logits, before)  # B = 0: exactly the base
    assert set(model.state_dict()) == keys  # the model's own checkpoint is untouched
    assert not any(p.requires_grad for p in model.parameters())
    assert len(info.modules) == model.config.n_layer * (7 if preset == "tiny-llama" else 6)
    expected = sum(4 * (model.get_submodule(m).in_features + model.get_submodule(m).out_features)
                   for m in info.modules)
    assert adapters.num_parameters("domain") == expected
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    grads = [p.grad for p in adapters.trainable_parameters().values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_merge_equals_unmerged_logits_and_unmerge_restores_the_weights():
    model = build("tiny-llama")
    idx = tokens()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(idx).logits
    adapters = Adapters(model)
    adapters.add("kjv", rank=4, alpha=8)
    randomise(adapters, "kjv")
    with_adapter = model(idx).logits
    assert not torch.allclose(with_adapter, base_logits, atol=1e-4)
    adapters.merge("kjv")
    merged = model(idx).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, weights["blocks.0.attn.q_proj.weight"])
    with adapters.disabled():  # the plain base, even while merged
        torch.testing.assert_close(model(idx).logits, base_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx).logits, with_adapter, atol=1e-5, rtol=1e-5)
    adapters.unmerge()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx).logits, with_adapter, atol=1e-5, rtol=1e-5)


def test_many_adapters_side_by_side_set_active_disable_and_delete():
    model = build("tiny-llama")
    idx = tokens()
    base = model(idx).logits
    adapters = Adapters(model)
    adapters.add("a", rank=2)
    randomise(adapters, "a", seed=1)
    adapters.add("b", rank=8, target_modules=(r"blocks\.[01]\.attn\.(q|v)_proj",))
    randomise(adapters, "b", seed=2)
    assert adapters.active == "b" and len(adapters.infos["b"].modules) == 4
    logits_b = model(idx).logits
    adapters.set_active("a")
    logits_a = model(idx).logits
    assert not torch.allclose(logits_a, logits_b, atol=1e-4)
    with adapters.disabled():
        assert torch.equal(model(idx).logits, base)
    with adapters.using("b"):
        assert torch.equal(model(idx).logits, logits_b)
    assert torch.equal(model(idx).logits, logits_a)
    adapters.delete("a")
    assert adapters.active is None and adapters.names() == ["b"]
    assert torch.equal(model(idx).logits, base)
    with pytest.raises(AdapterError) as error:
        adapters.set_active("a")
    assert str(error.value) == "no adapter named 'a' on this model (it has: b)."


def test_save_load_round_trip_and_base_hash(tmp_path):
    model = build("tiny-llama")
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    assert checkpoint_sha256(checkpoint) == model_sha256(model)
    adapters = Adapters(model)
    adapters.add("kjv", rank=4, alpha=8, metadata={"domain": "kjv"})
    randomise(adapters, "kjv")
    idx = tokens()
    expected = model(idx).logits
    saved = adapters.save("kjv", checkpoint / "adapters" / "kjv")
    record = json.loads((saved / ADAPTER_CONFIG_FILE).read_text())
    assert record["base_model_sha256"] == model_sha256(build("tiny-llama"))
    assert record["r"] == 4 and record["lora_alpha"] == 8 and record["parameters"] > 0

    fresh = load_checkpoint(checkpoint).model
    load_adapter_onto(fresh, checkpoint, "kjv")  # merged by default
    torch.testing.assert_close(fresh(idx).logits, expected, atol=1e-5, rtol=1e-5)

    other = build("tiny-llama", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterError) as error:
        Adapters(other).load(saved)
    assert str(error.value) == (
        f"the adapter in {saved} was made for a different base model (sha256 "
        f"{model_sha256(model)[:12]}) than this one ({model_sha256(other)[:12]}); load it onto "
        "the checkpoint it was trained from."
    )
    with pytest.raises(AdapterError) as error:
        load_adapter_onto(load_checkpoint(checkpoint).model, checkpoint, "bible")
    assert str(error.value) == f"{checkpoint} has no adapter named 'bible' (it has: kjv)."


def test_bad_adapter_settings_are_refused_with_a_sentence():
    model = build("tiny-llama")
    adapters = Adapters(model)
    for rank in (0, -3):
        with pytest.raises(AdapterError) as error:
            adapters.add("x", rank=rank)
        assert str(error.value) == f"LoRA rank must be a whole number of at least 1, got {rank}."
    with pytest.raises(AdapterError) as error:
        adapters.add("x", target_modules=("query", r"layers\.\d+\.attn"))
    assert str(error.value) == (
        "the target modules ['query', 'layers\\\\.\\\\d+\\\\.attn'] match no linear layer of this "
        "model; its linear layers are named like blocks.0.attn.q_proj (last parts: down_proj, "
        "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)."
    )
    with pytest.raises(AdapterError, match="must start with a letter or digit"):
        adapters.add("../escape")
    assert adapters.names() == []


def test_an_adapter_on_a_tied_head_merges_into_a_copy_and_unmerge_ties_it_again():
    model = build("tiny-gpt2")
    assert model.config.tie_embeddings
    embedding = model.token_embedding.weight.clone()
    idx = tokens()
    adapters = Adapters(model)
    adapters.add("head", rank=4, target_modules=("lm_head", "q_proj"))
    randomise(adapters, "head")
    with_adapter = model(idx).logits
    adapters.merge()
    assert model.lm_head.weight is not model.token_embedding.weight
    assert torch.equal(model.token_embedding.weight, embedding)  # the input side is untouched
    torch.testing.assert_close(model(idx).logits, with_adapter, atol=1e-5, rtol=1e-5)
    adapters.unmerge()
    assert model.lm_head.weight is model.token_embedding.weight
    assert torch.equal(model.token_embedding.weight, embedding)
    torch.testing.assert_close(model(idx).logits, with_adapter, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- replay


def test_reservoir_keeps_quota_per_domain_and_survives_a_restart(tmp_path):
    windows = [np.full(9, i, dtype=np.int32) for i in range(200)]
    buffer = ReplayBuffer(tmp_path / "replay", block_size=8, quota=10, seed=3)
    assert buffer.add("a", windows[:5]) == 5
    assert buffer.add("a", windows[5:120]) == 10
    reopened = ReplayBuffer(tmp_path / "replay", block_size=8)
    assert reopened.describe() == {"a": {"windows": 10, "offered": 120}}
    reopened.add("a", windows[120:])
    reopened.add("b", [np.full(9, 1000 + i, dtype=np.int32) for i in range(4)])
    # The same stream offered in one go keeps exactly the same windows (seeded per position).
    whole = ReplayBuffer(tmp_path / "whole", block_size=8, quota=10, seed=3)
    whole.add("a", windows)
    again = ReplayBuffer(tmp_path / "replay", block_size=8)
    kept = sorted(int(w[0]) for w in again.sample(200, np.random.default_rng(0), ["a"]))
    assert set(kept) <= {int(w[0]) for w in whole.sample(500, np.random.default_rng(1), ["a"])}
    assert len(set(kept)) > 1 and max(kept) >= 20  # later windows do get in
    assert {int(w[0]) for w in again.sample(50, np.random.default_rng(0), ["b"])} <= set(range(1000, 1004))
    with pytest.raises(PrometheanError, match="windows of 8 tokens but this run uses a block size of 16"):
        ReplayBuffer(tmp_path / "replay", block_size=16)


def test_reservoir_is_uniform_over_the_stream(tmp_path):
    counts = np.zeros(100)
    for seed in range(200):
        buffer = ReplayBuffer(tmp_path / f"r{seed}", block_size=1, quota=10, seed=seed)
        buffer.add("a", [np.array([i, i], dtype=np.int32) for i in range(100)])
        counts[buffer._windows[:, 0]] += 1
    # Each window is kept with probability 10/100: 20 of 200 runs on average.
    assert counts.sum() == 2000
    assert counts[:50].sum() == pytest.approx(1000, rel=0.1)
    assert counts.min() > 5 and counts.max() < 40


def test_mixer_replaces_about_the_ratio_of_rows(tmp_path, data_dir):
    dataset = TokenDataset(data_dir)
    buffer = ReplayBuffer(tmp_path / "replay", block_size=16, quota=8)
    buffer.add("old", [np.full(17, 300, dtype=np.int32)] * 8)  # token 300 is not a byte
    sampler = WindowSampler(dataset, batch_size=4, block_size=16, seed=0)
    mixer = ReplayMixer(sampler, buffer, ratio=0.3, seed=0)
    replayed = 0
    for _ in range(100):
        inputs, targets = mixer.next_batch()
        rows = (inputs == 300).all(dim=1)
        replayed += int(rows.sum())
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert replayed == mixer.replayed_rows
    assert replayed / 400 == pytest.approx(0.3, abs=0.05)
    with pytest.raises(PrometheanError, match=r"replay ratio must lie in \[0, 1\), got 1.5"):
        ReplayMixer(sampler, buffer, ratio=1.5)


# ----------------------------------------------------------------------------------------- EWC


def test_fisher_is_that_of_the_sequence_log_likelihood():
    """Against an independent computation: the log-likelihood summed from the logits' own
    log-softmax (not the model's loss), a row with ignored targets included."""
    model = trained_like(build("tiny-llama"))
    adapters = Adapters(model)
    adapters.add("a", rank=2)
    randomise(adapters, "a")
    params = adapters.trainable_parameters()
    inputs = tokens(batch=3, length=12)
    targets = tokens(batch=3, length=12, seed=5)
    targets[1, :5] = -100  # a row that predicts only its last 7 tokens
    fisher = estimate_fisher(model, params, [(inputs, targets)], samples=3)
    independent = {k: torch.zeros_like(v) for k, v in params.items()}
    for row in range(3):
        log_probs = torch.log_softmax(model(inputs[row : row + 1]).logits.float(), dim=-1)[0]
        kept = targets[row] != -100
        log_likelihood = log_probs[kept].gather(1, targets[row][kept].unsqueeze(1)).sum()
        grads = torch.autograd.grad(log_likelihood, list(params.values()))
        for (key, _), grad in zip(params.items(), grads):
            independent[key] += grad**2 / 3
    for key in params:
        torch.testing.assert_close(fisher[key], independent[key], rtol=1e-4, atol=1e-12)
    # The sum, not the mean: 144 = 12^2 times the squared gradient of the mean loss of a full row.
    one = estimate_fisher(model, params, [(inputs[:1], targets[:1])], samples=1)
    _, mean_loss = model(inputs[:1], targets[:1])
    grad = torch.autograd.grad(mean_loss, [params[next(iter(params))]])[0]
    expected = 144 * grad**2
    torch.testing.assert_close(one[next(iter(params))], expected, rtol=1e-3,
                               atol=1e-5 * float(expected.max()))


def test_ewc_penalty_online_decay_and_save_load(tmp_path):
    theta = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0])),
             "v": torch.nn.Parameter(torch.tensor([0.5]))}
    ewc = EWC(strength=4.0, gamma=0.5)
    ewc.consolidate("one", {"w": torch.tensor([1.0, 3.0]), "v": torch.tensor([2.0])}, theta)
    assert float(ewc.penalty(theta).detach()) == 0.0
    with torch.no_grad():
        theta["w"] += torch.tensor([1.0, -2.0])
    # 4 / 2 * (1 * 1 + 3 * 4) = 26
    assert float(ewc.penalty(theta).detach()) == pytest.approx(26.0)
    ewc.consolidate("two", {"w": torch.tensor([2.0, 2.0]), "v": torch.tensor([0.0])}, theta)
    torch.testing.assert_close(ewc.fisher["w"], torch.tensor([2.5, 3.5]))
    torch.testing.assert_close(ewc.anchor["w"], torch.tensor([2.0, 0.0]))
    ewc.save(tmp_path / "ewc")
    loaded = EWC.load(tmp_path / "ewc")
    assert loaded.domains == ["one", "two"] and loaded.strength == 4.0 and loaded.gamma == 0.5
    torch.testing.assert_close(loaded.fisher["w"], ewc.fisher["w"])
    with pytest.raises(PrometheanError, match="the online EWC decay gamma must lie in"):
        EWC(1.0, gamma=0.0)


# ------------------------------------------------------------------------ learn and forgetting


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """A tiny base checkpoint (bytes tokenizer) and two more prepared domains."""
    from promethean.data.prepare import prepare

    root = tmp_path_factory.mktemp("continual")
    prepared = {}
    for name, offset in (("alpha", 0), ("beta", 1), ("gamma", 2)):
        documents = [text.upper() if offset == 1 else text[::-1] if offset == 2 else text
                     for text in generated_documents(60)]
        prepared[name] = root / "data" / name
        prepare(documents, ByteTokenizer(), prepared[name], source_name=name,
                source_sha256=str(offset) * 64, workers=1, val_fraction=0.1, progress=False)
    checkpoint = save_checkpoint(root / "base", build("tiny-llama"), ByteTokenizer())
    return root, checkpoint, prepared


def options(checkpoint, domain, data, run, **extra):
    settings = {"checkpoint": str(checkpoint), "domain": domain, "data": str(data),
                "update_steps": 4, "run": str(run) if run else None, "batch_size": 4,
                "block_size": 32, "lora_rank": 4, "fisher_samples": 4, "replay_quota": 16,
                "device": "cpu", "progress": False}
    settings.update(extra)
    return LearnOptions(**settings)


def test_lora_ewc_replay_stages_record_every_domain(domains, tmp_path):
    _, checkpoint, data = domains
    run = tmp_path / "run"
    first = learn(options(checkpoint, "beta", data["beta"], run, use_ewc=True, replay=0.25,
                          base_domain=("alpha", str(data["alpha"])), adapter_name="beta-cl"))
    assert first.stage == 1 and first.output == checkpoint / "adapters" / "beta-cl"
    second = learn(options(checkpoint, "gamma", data["gamma"], run, use_ewc=True, replay=0.25,
                           adapter_name="gamma-cl"))
    record = read_run(run)
    assert [s["stage"] for s in record["stages"]] == [0, 1, 2]
    assert set(record["stages"][2]["val"]) == {"alpha", "beta", "gamma"}
    assert set(record["stages"][1]["val"]) == {"alpha", "beta", "gamma"}  # gamma: before learning
    assert set(record["stages"][0]["val"]) == {"alpha", "beta", "gamma"}
    assert record["stages"][2]["replayed_rows"] > 0
    assert json.loads((run / "ewc" / "ewc.json").read_text())["domains"] == ["alpha", "beta", "gamma"]
    # The penalty is in the loss: zero at a stage's first step (the adapter is its anchor), then
    # positive once training has moved it.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    penalties = [line["ewc_penalty"] for line in logged if line["stage"] == 2]
    assert penalties and all(math.isfinite(p) and p > 0 for p in penalties)
    assert ReplayBuffer(run / "replay", 32).describe().keys() == {"alpha", "beta", "gamma"}
    # The stage's recorded loss is what the saved adapter gives.
    from promethean.continual.run_record import evaluate_domains

    model = load_checkpoint(checkpoint).model
    load_adapter_onto(model, checkpoint, "gamma-cl")
    again = evaluate_domains(model, {"beta": TokenDataset(data["beta"])}, 4, 32, "cpu", None)
    assert again["beta"]["loss"] == pytest.approx(second.val["beta"]["loss"], rel=1e-4)

    report = forgetting_report(run)
    assert report.domains == ["alpha", "beta", "gamma"]
    assert report.learned_at == {"alpha": 0, "beta": 1, "gamma": 2}
    alpha = [row[0] for row in report.loss]
    assert report.forgetting["alpha"] == pytest.approx(alpha[2] - min(alpha[:2]))
    beta = [row[1] for row in report.loss]
    expected_backward = ((alpha[0] - alpha[2]) + (beta[1] - beta[2])) / 2
    assert report.backward_transfer == pytest.approx(expected_backward)
    gamma = [row[2] for row in report.loss]
    assert report.forward_transfer == pytest.approx(gamma[0] - gamma[1])
    png = draw_heatmap(report)
    assert png == run / "forgetting.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tree(root):
    """{relative path: bytes} of every file under `root` (directories as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("full", [False, True])
def test_a_failed_stage_leaves_the_run_exactly_as_it_was(domains, tmp_path, monkeypatch, full):
    import subprocess
    import sys

    import promethean.continual.learn as learn_module

    _, checkpoint, data = domains
    run = tmp_path / "run"
    first = learn(options(checkpoint, "beta", data["beta"], run, use_ewc=True, replay=0.25,
                          full=full, base_domain=("alpha", str(data["alpha"]))))
    base = first.output if full else checkpoint
    before, adapters_before = _tree(run), _tree(checkpoint)

    def disk_full(path, record):
        raise OSError(28, "No space left on device", str(path))

    # The last write of a stage, after EWC, replay, the adapter (or checkpoint) and the metrics.
    monkeypatch.setattr(learn_module, "_write_json", disk_full)
    with pytest.raises(OSError):
        learn(options(base, "gamma", data["gamma"], run, use_ewc=True, replay=0.25, full=full))
    monkeypatch.undo()
    assert _tree(run) == before
    assert _tree(checkpoint) == adapters_before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]

    # A killed stage leaves its staging copy behind; the next stage removes it and commits.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftover = run.parent / f".run.partial-{dead}-{'0' * 32}"
    (leftover / "ewc").mkdir(parents=True)
    second = learn(options(base, "gamma", data["gamma"], run, use_ewc=True, replay=0.25,
                           full=full))
    assert not leftover.exists()
    record = read_run(run)
    assert [s["stage"] for s in record["stages"]] == [0, 1, 2]
    assert json.loads((run / "ewc" / "ewc.json").read_text())["domains"] == [
        "alpha", "beta", "gamma"]
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == sorted(stages) and set(stages) == {1, 2}  # no lines of the failed stage twice
    assert stages.count(2) == stages.count(1)
    if not full:
        assert (second.output / "adapter_model.safetensors").read_bytes() == (
            run / "stages" / "02-gamma" / "adapter_model.safetensors").read_bytes()


def test_full_fine_tuning_writes_checkpoints_that_chain(domains, tmp_path):
    _, checkpoint, data = domains
    run = tmp_path / "full"
    first = learn(options(checkpoint, "beta", data["beta"], run, full=True, use_ewc=True,
                          base_domain=("alpha", str(data["alpha"]))))
    assert first.output == run / "stages" / "01-beta"
    assert first.trainable_parameters == build("tiny-llama").num_parameters()
    with pytest.raises(PrometheanError) as error:
        learn(options(checkpoint, "gamma", data["gamma"], run, full=True))
    assert str(error.value) == (f"the last stage of {run} wrote {first.output}; continue from it "
                                f"(--checkpoint {first.output}) so that the stages follow each other.")
    second = learn(options(first.output, "gamma", data["gamma"], None, full=True, use_ewc=True))
    assert second.stage == 2  # the run was found from the stage checkpoint's metadata
    assert len(read_run(run)["stages"]) == 3
    with pytest.raises(PrometheanError, match="is a full run; this stage asks for lora"):
        learn(options(checkpoint, "gamma", data["gamma"], run))


def test_learn_refuses_bad_input_with_a_sentence(domains, tmp_path):
    root, checkpoint, data = domains
    run = tmp_path / "bad"
    with pytest.raises(AdapterError) as error:
        learn(options(checkpoint, "beta", data["beta"], run, lora_rank=0))
    assert str(error.value) == "LoRA rank must be a whole number of at least 1, got 0."
    with pytest.raises(PrometheanError) as error:
        learn(options(checkpoint, "beta", "no-such-corpus", run))
    assert str(error.value).startswith(
        "'no-such-corpus' is neither a named corpus (shakespeare, kjv, smalltalk")
    with pytest.raises(AdapterError) as error:
        learn(options(checkpoint, "bible/kjv", data["beta"], run))
    assert str(error.value) == (
        "domain name 'bible/kjv' must start with a letter or digit and hold only letters, digits, "
        "'-', '_' and '.' (at most 100 characters).")
    with pytest.raises(AdapterError, match="match no linear layer"):
        learn(options(checkpoint, "beta", data["beta"], run, target_modules=("wq",)))
    # A LoRA stage on another base than the run's refuses.
    learn(options(checkpoint, "beta", data["beta"], run, update_steps=1))
    other = save_checkpoint(root / "other", build("tiny-llama", seed=5), ByteTokenizer())
    with pytest.raises(AdapterError, match=f"{other} is not the base model of {run}"):
        learn(options(other, "gamma", data["gamma"], run))
    assert not (root / "other" / "adapters").exists()


def test_cli_learn_forgetting_and_generate_with_an_adapter(domains, tmp_path):
    _, checkpoint, data = domains
    run = tmp_path / "cli-run"

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "promethean", *args], check=False,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert "Traceback" not in result.stderr, result.stderr
        return result

    common = ["--checkpoint", str(checkpoint), "--run", str(run), "--update-steps", "2",
              "--batch-size", "4", "--block-size", "32", "--lora-rank", "2", "--device", "cpu"]
    result = cli("learn", *common, "--domain", "beta", "--data", str(data["beta"]),
                 "--base-domain", f"alpha={data['alpha']}", "--adapter-name", "cli-beta",
                 "--replay", "0.25", "--use-ewc", "--lora-head")
    assert result.returncode == 0, result.stderr
    config = json.loads((checkpoint / "adapters" / "cli-beta" / ADAPTER_CONFIG_FILE).read_text())
    assert config["modules"][-1] == "lm_head" and config["r"] == 2
    assert "stage 1 (beta)" in result.stdout and "alpha: validation loss" in result.stdout
    result = cli("forgetting", str(run))
    assert result.returncode == 0, result.stderr
    assert "backward transfer" in result.stdout and (run / "forgetting.png").is_file()
    result = cli("generate", str(checkpoint), "-p", "the", "--adapter", "cli-beta",
                 "--max-new-tokens", "4", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    result = cli("generate", str(checkpoint), "-p", "the", "--adapter", "nope")
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {checkpoint} has no adapter named 'nope'")
    result = cli("learn", *common, "--domain", "beta", "--data", str(data["beta"]),
                 "--lora-rank", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: LoRA rank must be a whole number of at least 1, got 0."
    result = cli("forgetting", str(tmp_path))
    assert result.stderr.strip() == (
        f"error: {tmp_path} is not a continual-learning run: continual.json is missing.")


# ------------------------------------------------------------------- independent adapters


def test_a_from_base_stage_starts_fresh_on_the_base_after_a_continuing_stage(domains, tmp_path,
                                                                            monkeypatch):
    from safetensors.torch import load_file

    import promethean.train.optim as optim_module
    from promethean.continual.run_record import evaluate_domains

    _, checkpoint, data = domains
    run = tmp_path / "mixed"
    learn(options(checkpoint, "beta", data["beta"], run, adapter_name="beta-mixed",
                  base_domain=("alpha", str(data["alpha"]))))
    idx = tokens(length=32)
    base_logits = load_checkpoint(checkpoint).model(idx).logits
    first_step = {}
    build_optimizer = optim_module.build_optimizer

    def capture(adapters, *args, **kwargs):
        # Called just before the first step: the model is what training starts from.
        with torch.no_grad():
            first_step["logits"] = adapters.model(idx).logits
        first_step["weights"] = {k: v.detach().clone()
                                 for k, v in adapters.trainable_parameters().items()}
        return build_optimizer(adapters, *args, **kwargs)

    monkeypatch.setattr(optim_module, "build_optimizer", capture)
    second = learn(options(checkpoint, "gamma", data["gamma"], run, from_base=True,
                           adapter_name="gamma-mixed", replay=0.25))
    monkeypatch.undo()
    assert torch.equal(first_step["logits"], base_logits)  # base + fresh adapter == base
    previous = load_file(str(run / "stages" / "01-beta" / "adapter_model.safetensors"))
    for key, value in first_step["weights"].items():
        assert not torch.equal(value, previous[key])  # not a copy of stage 1's adapter
        if key.endswith("lora_B"):
            assert not value.any() and previous[key].any()

    record = read_run(run)
    stages = record["stages"]
    assert "from_base" not in stages[0]
    assert stages[1]["from_base"] is False and stages[1]["options"]["from_base"] is False
    assert stages[2]["from_base"] is True and stages[2]["options"]["from_base"] is True
    assert "evaluated_with" not in stages[1]
    assert stages[2]["evaluated_with"] == {"alpha": 0, "beta": 1, "gamma": 2}
    assert stages[2]["replayed_rows"] > 0  # replay still mixes earlier domains in
    # Each domain on its own adapter: alpha on the base, beta on stage 1's continuing adapter.
    assert stages[2]["val"]["alpha"] == stages[0]["val"]["alpha"]
    assert stages[2]["val"]["beta"] == stages[1]["val"]["beta"]
    assert second.val == stages[2]["val"]
    # Before gamma was learned, the model after stage 1 was base + beta's adapter.
    model = load_checkpoint(checkpoint).model
    load_adapter_onto(model, checkpoint, "beta-mixed", merge=False)
    again = evaluate_domains(model, {"gamma": TokenDataset(data["gamma"])}, 4, 32, "cpu", None)
    assert again == {"gamma": stages[1]["val"]["gamma"]}
    config = json.loads((checkpoint / "adapters" / "gamma-mixed" / ADAPTER_CONFIG_FILE).read_text())
    assert config["metadata"]["from_base"] is True


def test_from_base_stages_leave_each_domain_its_own_adapter(domains, tmp_path):
    from promethean.continual.run_record import evaluate_domains

    _, checkpoint, data = domains
    run = tmp_path / "independent"
    learn(options(checkpoint, "beta", data["beta"], run, from_base=True, adapter_name="beta-own",
                  base_domain=("alpha", str(data["alpha"]))))
    published = checkpoint / "adapters" / "beta-own"
    after_first = _tree(published)
    learn(options(checkpoint, "gamma", data["gamma"], run, from_base=True,
                  adapter_name="gamma-own"))
    assert _tree(published) == after_first  # stage 2 did not touch domain beta's adapter
    stages = read_run(run)["stages"]
    assert [s.get("from_base") for s in stages] == [None, True, True]
    assert stages[1]["evaluated_with"] == {"alpha": 0, "beta": 1}
    assert stages[2]["evaluated_with"] == {"alpha": 0, "beta": 1, "gamma": 2}
    assert stages[2]["val"]["beta"] == stages[1]["val"]["beta"]
    assert stages[2]["val"]["alpha"] == stages[1]["val"]["alpha"] == stages[0]["val"]["alpha"]
    assert stages[1]["val"]["gamma"] == stages[0]["val"]["gamma"]  # no adapter had learned it
    # Each published adapter alone on the base gives the loss its stage recorded for its domain.
    for name, domain, stage in (("beta-own", "beta", 1), ("gamma-own", "gamma", 2)):
        model = load_checkpoint(checkpoint).model
        load_adapter_onto(model, checkpoint, name, merge=False)
        again = evaluate_domains(model, {domain: TokenDataset(data[domain])}, 4, 32, "cpu", None)
        assert again[domain] == stages[stage]["val"][domain]
        assert stages[stage]["val"][domain]["loss"] < stages[0]["val"][domain]["loss"]
    report = forgetting_report(run)
    assert report.forgetting == {"alpha": 0.0, "beta": 0.0}
    assert report.backward_transfer == 0.0 and report.forward_transfer == 0.0


def test_cli_refuses_from_base_with_ewc_or_full(domains, tmp_path):
    _, checkpoint, data = domains
    common = ["learn", "--checkpoint", str(checkpoint), "--run", str(tmp_path / "refused"),
              "--domain", "beta", "--data", str(data["beta"]), "--update-steps", "2",
              "--from-base"]
    refusals = {
        "--use-ewc": "error: --from-base cannot be used with --use-ewc: an independent adapter "
                     "has no earlier stage to stay close to, and EWC anchors to the previous "
                     "stage's weights.\n",
        "--full": "error: --from-base cannot be used with --full: it starts a fresh LoRA adapter "
                  "on the base, and full fine-tuning has no adapter.\n",
    }
    for flag, sentence in refusals.items():
        result = subprocess.run([sys.executable, "-m", "promethean", *common, flag], check=False,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 1 and result.stderr == sentence
    assert not (tmp_path / "refused").exists()


def test_max_minutes_ends_a_stage_early_and_it_still_commits(domains, tmp_path, monkeypatch):
    from promethean.train import loop

    _, checkpoint, data = domains
    readings = iter(range(10_000))  # one minute a reading: read at the start, then each step
    monkeypatch.setattr(loop, "wall_clock", lambda: 60.0 * next(readings))
    result = learn(options(checkpoint, "beta", data["beta"], tmp_path / "run", update_steps=10,
                           max_minutes=2.5, base_domain=("alpha", str(data["alpha"]))))
    stage = read_run(tmp_path / "run")["stages"][1]
    assert (stage["stopped"], stage["steps_trained"]) == ("max_minutes", 3)
    assert set(stage["val"]) == {"alpha", "beta"} and result.stage == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [3]  # the step that spent it is logged
    with pytest.raises(PrometheanError, match="max_minutes must be a positive number of minutes"):
        learn(options(checkpoint, "gamma", data["gamma"], tmp_path / "run", max_minutes=0.0))


def test_an_interrupted_stage_continues_where_it_was_and_ends_as_an_uninterrupted_one(
        domains, tmp_path, monkeypatch):
    """Killed at step 5 of 8 (state saved every 3 steps), the same command continues from step
    3: the adapter, the recorded losses and the metrics equal a run that was never stopped."""
    from safetensors.torch import load_file

    from promethean.train import loop

    _, checkpoint, data = domains
    settings = {"use_ewc": True, "replay": 0.25, "update_steps": 8, "checkpoint_every": 3}

    def two_stages(run, interrupt_at=None):
        learn(options(checkpoint, "beta", data["beta"], run, **settings,
                      base_domain=("alpha", str(data["alpha"])), adapter_name=f"b-{run.name}"))
        second = options(checkpoint, "gamma", data["gamma"], run, **settings,
                         adapter_name=f"g-{run.name}")
        if interrupt_at is not None:
            real_step, calls = loop.optimizer_step, []

            def crashing_step(*args, **kwargs):
                calls.append(1)
                if len(calls) == interrupt_at:
                    raise KeyboardInterrupt
                return real_step(*args, **kwargs)

            monkeypatch.setattr(loop, "optimizer_step", crashing_step)
            with pytest.raises(KeyboardInterrupt):
                learn(second)
            monkeypatch.setattr(loop, "optimizer_step", real_step)
            assert len(read_run(run)["stages"]) == 2  # the stage did not commit
            saved = json.loads((run / "stage-in-progress" / "progress.json").read_text())
            assert saved["progress"]["step"] == 3
        learn(second)
        assert not (run / "stage-in-progress").exists()  # dropped by the commit
        return read_run(run)

    straight = two_stages(tmp_path / "straight")
    resumed = two_stages(tmp_path / "resumed", interrupt_at=5)
    assert resumed["stages"][2]["val"] == straight["stages"][2]["val"]
    assert resumed["stages"][2]["replayed_rows"] == straight["stages"][2]["replayed_rows"]
    adapter = lambda run, name: load_file(str(run / "stages" / "02-gamma" / "adapter_model.safetensors"))  # noqa: E731
    first, second = adapter(tmp_path / "straight", "g"), adapter(tmp_path / "resumed", "g")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    timings = ("tokens_per_second", "elapsed")

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k not in timings}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "resumed") == lines(tmp_path / "straight")
    assert [line["step"] for line in lines(tmp_path / "resumed")] == [8, 8]  # each stage's end


def test_a_signal_saves_the_stage_and_the_same_command_continues_it(domains, tmp_path,
                                                                    monkeypatch):
    """SIGTERM at step 4 of 6 (no periodic saves): the stage saves its state at that step,
    commits nothing, and says how to continue; the same command then ends as a stage that was
    never stopped (adapter and losses)."""
    import signal

    from safetensors.torch import load_file

    from promethean.errors import TrainingInterrupted
    from promethean.train import loop

    _, checkpoint, data = domains
    settings = {"update_steps": 6, "checkpoint_every": None, "replay": 0.25,
                "base_domain": ("alpha", str(data["alpha"]))}
    straight = tmp_path / "straight"
    learn(options(checkpoint, "beta", data["beta"], straight, adapter_name="b-s", **settings))
    run = tmp_path / "signalled"
    real_step, calls = loop.optimizer_step, []

    def signalling_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", signalling_step)
    with pytest.raises(TrainingInterrupted) as caught:
        learn(options(checkpoint, "beta", data["beta"], run, adapter_name="b-r", **settings))
    assert str(caught.value) == (
        f"stage 1 (beta) interrupted by SIGTERM at step 4 of 6; its progress is saved in "
        f"{run / 'stage-in-progress'}: run the same command to continue it.")
    assert not (run / "continual.json").exists()  # the run is as it was: not started
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    learn(options(checkpoint, "beta", data["beta"], run, adapter_name="b-r", **settings))
    def adapter(run):
        return load_file(str(run / "stages" / "01-beta" / "adapter_model.safetensors"))

    first, second = adapter(straight), adapter(run)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert read_run(run)["stages"][1]["val"] == read_run(straight)["stages"][1]["val"]
