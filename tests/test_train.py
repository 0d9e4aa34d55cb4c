import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from promethean.checkpoint import load_checkpoint
from promethean.config import load_preset
from promethean.errors import CheckpointError, ConfigError, PrometheanError
from promethean.model import Transformer
from promethean.tokenizer import ByteTokenizer
from promethean.train.config import (
    TrainConfig,
    load_train_config,
    parse_override,
    parse_train_config,
)
from promethean.train.optim import build_optimizer, parameter_groups
from promethean.train.schedule import lr_at
from promethean.train.state import STATE_JSON_FILE, STATE_TENSORS_FILE, load_training_state
from promethean.train.trainer import step_dir_name, train

REPO = Path(__file__).resolve().parents[1]
# Subprocesses train tiny models: one thread each keeps them quick on a busy 2-core machine.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# Tiny models: one thread is as fast and does not thrash a busy machine (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(data_dir, out, **overrides) -> TrainConfig:
    settings = {
        "model": "tiny-gpt2",
        "data": str(data_dir),
        "out": str(out),
        "batch_size": 2,
        "grad_accum": 2,
        "block_size": 32,
        "max_steps": 12,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 3,
        "eval_interval": 4,
        "eval_batches": 2,
        "log_interval": 1,
        "progress": False,
        "device": "cpu",
        "seed": 1,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- config


def test_config_from_toml_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny-llama"\ndata = "d"\nout = "o"\nmax_steps = 50\nlr = 1e-3\n')
    config = load_train_config(
        path, ["max_steps=7", "dtype='bf16'", "eval_batches=3", "out=runs/x"]
    )
    assert config.max_steps == 7 and config.dtype == "bf16" and config.eval_batches == 3
    assert config.out == "runs/x" and config.lr == 1e-3
    assert config.beta2 == 0.95 and config.grad_clip == 0.5 and config.early_stopping_patience == 5


def test_config_errors_are_sentences(tmp_path):
    with pytest.raises(ConfigError, match="'max_step' is not a known setting"):
        parse_override("max_step=3")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("max_steps")
    with pytest.raises(ConfigError, match="'max_steps' input should be a valid integer"):
        load_train_config(None, ["model='a'", "data='b'", "out='c'", "max_steps='ten'"])
    with pytest.raises(ConfigError, match="'batchsize' is not a known setting"):
        parse_train_config({"model": "a", "data": "b", "out": "c", "batchsize": 2})
    with pytest.raises(ConfigError, match=r"min_lr \(0.1\) cannot be larger than lr"):
        load_train_config(None, ["model='a'", "data='b'", "out='c'", "lr=0.01", "min_lr=0.1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")


# ------------------------------------------------------------------------- optim / schedule


def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    for preset in ("tiny-gpt2", "tiny-llama"):
        torch.manual_seed(0)
        model = Transformer(load_preset(preset).model)
        decay, no_decay = parameter_groups(model, 0.1)
        decay_ids = {id(p) for p in decay["params"]}
        assert id(model.token_embedding.weight) not in decay_ids
        assert all(p.ndim >= 2 for p in decay["params"])
        assert id(model.blocks[0].mlp_norm.weight) not in decay_ids
        counted = len(decay["params"]) + len(no_decay["params"])
        assert counted == len(list(model.parameters()))  # a tied head counted once
        if model.config.tie_embeddings:
            assert id(model.lm_head.weight) not in decay_ids
        else:
            assert id(model.lm_head.weight) in decay_ids
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_the_ssm_decay_rates_are_never_weight_decayed(tmp_path):
    """A_log (2-D) is exempt as Mamba exempts it, in a fresh model and in one loaded from a
    checkpoint (whose parameters are new tensors), and an AdamW step with decay leaves it alone
    where it gets no gradient."""
    from promethean.checkpoint import save_checkpoint

    model = Transformer(load_preset("tiny-sssm").model)
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    for candidate in (model, load_checkpoint(tmp_path / "ckpt").model):
        ssm_layers = [m for m in candidate.modules() if hasattr(m, "A_log")]
        assert ssm_layers
        decay, no_decay = parameter_groups(candidate, 0.1)
        decayed = {id(p) for p in decay["params"]}
        for layer in ssm_layers:
            assert layer.A_log.ndim == 2 and id(layer.A_log) not in decayed
            assert id(layer.A_log) in {id(p) for p in no_decay["params"]}
            assert id(layer.in_proj.weight) in decayed  # the mixer's matrices still decay
    before = [m.A_log.detach().clone() for m in model.modules() if hasattr(m, "A_log")]
    optimizer = build_optimizer(model, 1e-2, 0.5, (0.9, 0.95))
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    after = [m.A_log for m in model.modules() if hasattr(m, "A_log")]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_schedule_warms_up_then_decays_to_min_lr():
    rates = [lr_at(step, 1.0, 0.1, 4, 20) for step in range(25)]
    assert rates[0] == pytest.approx(0.2) and rates[3] == pytest.approx(0.8)
    assert rates[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))
    assert rates[20] == rates[24] == 0.1


# ----------------------------------------------------------------------------------- train


def test_training_lowers_loss_and_writes_metrics_and_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(make_config(data_dir, out, max_steps=16, checkpoint_interval=4, keep_last=2))
    assert result.stopped == "max_steps" and result.steps == 16
    lines = read_metrics(out)
    assert [line["step"] for line in lines] == list(range(1, 17))
    first, last = lines[0], lines[-1]
    assert {
        "step",
        "tokens",
        "train_loss",
        "lr",
        "tokens_per_second",
        "elapsed",
        "skipped_steps",
    } <= set(first)
    assert last["tokens"] == 16 * 2 * 2 * 32
    evals = [line for line in lines if "val_loss" in line]
    assert [line["step"] for line in evals] == [4, 8, 12, 16]
    assert {"val_perplexity", "val_bits_per_byte"} <= set(evals[0])
    assert evals[0]["val_perplexity"] == pytest.approx(math.exp(evals[0]["val_loss"]))
    assert last["train_loss"] < first["train_loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    try:
        import promethean.train.memory  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        assert "memory" in first
    # Periodic checkpoints, the last two kept; the final one carries the training state.
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000012", "step-000016"]
    assert result.final_checkpoint == out / "step-000016"
    assert (result.final_checkpoint / STATE_JSON_FILE).is_file()
    assert (result.final_checkpoint / STATE_TENSORS_FILE).is_file()
    assert load_training_state(result.final_checkpoint).progress.step == 16
    best = load_checkpoint(result.best_checkpoint)
    assert result.best_val_loss == pytest.approx(min(line["val_loss"] for line in evals))
    assert best.config.name == "tiny-gpt2"


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    straight = train(make_config(data_dir, tmp_path / "a", model="tiny-llama"))
    first_leg = train(make_config(data_dir, tmp_path / "b", model="tiny-llama"), until_step=6)
    assert first_leg.stopped == "until_step" and first_leg.steps == 6
    resumed = train(
        make_config(data_dir, tmp_path / "b", model="tiny-llama"), resume=first_leg.final_checkpoint
    )
    assert resumed.steps == 12
    assert [s for s, _ in resumed.losses] == list(range(7, 13))
    joined = first_leg.losses + resumed.losses
    for (step_a, loss_a), (step_b, loss_b) in zip(straight.losses, joined, strict=True):
        assert step_a == step_b
        assert abs(loss_a - loss_b) < 1e-6, (step_a, loss_a, loss_b)
    final_a = load_checkpoint(straight.final_checkpoint).model.state_dict()
    final_b = load_checkpoint(resumed.final_checkpoint).model.state_dict()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=1e-6)
    # The metrics file was appended to, not restarted.
    assert [line["step"] for line in read_metrics(tmp_path / "b")] == list(range(1, 13))


def test_memory_saving_mode_resumes_exactly(data_dir, tmp_path):
    """bf16 AdamW moments, bf16 autocast and checkpointing (the 8 GB set-up) keep exact resume:
    the moments are saved as bf16 and come back as bf16, not upcast by torch's loader."""
    settings = dict(model="tiny-llama", optimizer_moments="bf16", dtype="bf16",
                    gradient_checkpointing=True, max_steps=8)
    straight = train(make_config(data_dir, tmp_path / "a", **settings))
    first_leg = train(make_config(data_dir, tmp_path / "b", **settings), until_step=4)
    state = load_training_state(first_leg.final_checkpoint)
    moments = [v for s in state.optimizer["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    resumed = train(make_config(data_dir, tmp_path / "b", **settings), resume=first_leg.final_checkpoint)
    joined = first_leg.losses + resumed.losses
    assert [s for s, _ in joined] == [s for s, _ in straight.losses] == list(range(1, 9))
    for (_, loss_a), (_, loss_b) in zip(straight.losses, joined, strict=True):
        assert abs(loss_a - loss_b) < 1e-6


def test_bf16_moments_adamw_follows_torch_adamw():
    from promethean.train.optim import BFloat16MomentsAdamW

    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(300, 40))
    theirs = torch.nn.Parameter(ours.detach().clone())
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    optimizers = [BFloat16MomentsAdamW([ours], **settings), torch.optim.AdamW([theirs], **settings)]
    for step in range(20):
        grad = torch.randn(300, 40)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
        if step == 0:  # the first update uses the unrounded fp32 moments: identical
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    state = optimizers[0].state[ours]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # 20 steps of lr 1e-2 move weights by up to 0.2; bf16-rounded moments stay within 1% of it.
    assert (ours - theirs).abs().max() < 2e-3


def test_resume_needs_training_state(data_dir, tmp_path):
    from promethean.checkpoint import save_checkpoint

    bare = save_checkpoint(
        tmp_path / "bare", Transformer(load_preset("tiny-gpt2").model), ByteTokenizer()
    )
    with pytest.raises(CheckpointError, match="no training state"):
        train(make_config(data_dir, tmp_path / "r"), resume=bare)


def test_bf16_autocast_runs_on_cpu(data_dir, tmp_path):
    result = train(
        make_config(data_dir, tmp_path / "bf16", dtype="bf16", max_steps=4, eval_interval=4)
    )
    assert result.steps == 4 and math.isfinite(result.best_val_loss)


def test_finetuning_starts_from_a_checkpoint(data_dir, tmp_path):
    pre = train(make_config(data_dir, tmp_path / "pre", max_steps=8))
    tuned = train(
        make_config(
            data_dir,
            tmp_path / "tuned",
            model=str(pre.best_checkpoint),
            max_steps=4,
            eval_interval=4,
        )
    )
    assert tuned.steps == 4
    assert (
        read_metrics(tmp_path / "tuned")[0]["train_loss"]
        < read_metrics(tmp_path / "pre")[0]["train_loss"]
    )


def test_early_stopping_after_patience_evaluations(data_dir, tmp_path):
    # A learning rate of ~0 cannot improve validation loss by min_delta.
    result = train(
        make_config(
            data_dir,
            tmp_path / "es",
            lr=1e-9,
            min_lr=0.0,
            max_steps=40,
            eval_interval=2,
            early_stopping_patience=2,
            early_stopping_min_delta=0.5,
        )
    )
    assert result.stopped == "early_stopping"
    assert result.steps == 6  # eval at 2 is the best; 4 and 6 do not improve


# ------------------------------------------------------------------------ non-finite guard


def _poison_forward(monkeypatch, bad_calls):
    original = Transformer.forward
    calls = {"training": 0}

    def forward(self, idx, targets=None, *args, **kwargs):
        output = original(self, idx, targets, *args, **kwargs)
        if self.training and targets is not None:
            calls["training"] += 1
            if bad_calls(calls["training"]):
                return type(output)(output.logits, output.loss * float("nan"))
        return output

    monkeypatch.setattr(Transformer, "forward", forward)


def test_a_nan_loss_skips_the_step(data_dir, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, lambda call: call in (5, 6))  # step 3's two micro-batches
    result = train(make_config(data_dir, tmp_path / "nan", max_steps=6, eval_interval=6))
    assert result.skipped_steps == 1 and result.steps == 6
    lines = read_metrics(tmp_path / "nan")
    assert lines[2]["train_loss"] is None and lines[2]["skipped_steps"] == 1
    model = load_checkpoint(result.final_checkpoint).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_a_row_stops_with_a_sentence(data_dir, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, lambda call: call > 2)
    with pytest.raises(PrometheanError, match="3 steps in a row had a NaN or infinite loss"):
        train(make_config(data_dir, tmp_path / "nan", max_nonfinite_in_a_row=3))


def test_nonfinite_weights_are_never_saved(data_dir, tmp_path):
    from promethean.train.optim import build_optimizer
    from promethean.train.state import Progress, save_training_checkpoint

    model = Transformer(load_preset("tiny-gpt2").model)
    with torch.no_grad():
        model.blocks[0].mlp_norm.weight[0] = float("inf")
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_training_checkpoint(
            tmp_path / "bad", model, ByteTokenizer(), optimizer, None, Progress()
        )
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- signals and the CLI


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "promethean", *args],
        check=False,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        cwd=REPO,
        **kwargs,
    )


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_that_resumes(data_dir, tmp_path, signal_number, status):
    out = tmp_path / "sig"
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-gpt2"\ndata = "{data_dir}"\nout = "{out}"\nbatch_size = 2\n'
        "block_size = 32\nmax_steps = 100000\nlog_interval = 1\neval_interval = 100000\n"
        'eval_batches = 1\ndevice = "cpu"\nprogress = false\nwarmup_steps = 2\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "promethean", "pretrain", str(config)],
        env=SUBPROCESS_ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr  # saved, and still says it was stopped
    assert "interrupted" in stdout
    saved = sorted(out.glob("step-*"))
    assert len(saved) == 1
    step = load_training_state(saved[0]).progress.step
    assert step >= 1
    resumed = _cli(
        "pretrain", str(config), "--set", f"max_steps={step + 2}", "--resume", str(saved[0])
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_training_state(out / f"step-{step + 2:06d}").progress.step == step + 2


def test_cli_bad_config_is_one_sentence(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny-gpt2"\ndata = "d"\nout = "o"\nlearnin_rate = 1.0\n')
    result = _cli("pretrain", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        f"error: training config {config} is invalid: 'learnin_rate' is not a known setting; "
        "did you mean 'lr'?\n"
    )
    assert "Traceback" not in result.stderr
    result = _cli(
        "finetune",
        str(config),
        "--checkpoint",
        str(tmp_path / "nowhere"),
        "--set",
        "learning_rate=1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_cli_finetune_trains_every_weight_of_a_checkpoint(data_dir, tmp_path):
    base = train(make_config(data_dir, tmp_path / "base", max_steps=4, eval_interval=4))
    config = tmp_path / "ft.toml"
    config.write_text(
        f'model = "ignored"\ndata = "{data_dir}"\nout = "{tmp_path / "ft"}"\nbatch_size = 2\n'
        'block_size = 32\nmax_steps = 3\neval_interval = 3\neval_batches = 2\nprogress = false\n'
        'device = "cpu"\nlr = 1e-3\nwarmup_steps = 0\nlog_interval = 1\n'
    )
    result = _cli("finetune", str(config), "--checkpoint", str(base.final_checkpoint),
                  "--set", "optimizer_moments='bf16'")
    assert result.returncode == 0, result.stderr
    tuned = load_checkpoint(tmp_path / "ft" / step_dir_name(3)).model.state_dict()
    original = load_checkpoint(base.final_checkpoint).model.state_dict()
    assert tuned.keys() == original.keys()
    assert all(not torch.equal(tuned[name], original[name]) for name in original)
    metrics = read_metrics(tmp_path / "ft")
    assert [line["step"] for line in metrics if "train_loss" in line] == [1, 2, 3]
    assert metrics[-1]["val_loss"] < metrics[0]["train_loss"] + 1.0


def test_compiled_training_matches_eager_and_saves_plain_names(data_dir, tmp_path):
    eager = train(make_config(data_dir, tmp_path / "eager", max_steps=4))
    compiled = train(make_config(data_dir, tmp_path / "compiled", max_steps=4, compile=True))
    for (step, loss), (compiled_step, compiled_loss) in zip(eager.losses, compiled.losses, strict=True):
        assert step == compiled_step
        assert compiled_loss == pytest.approx(loss, abs=1e-5)
    # The checkpoint holds the model's own tensor names, not torch.compile's wrapper prefix.
    assert load_checkpoint(compiled.final_checkpoint).model.num_parameters() > 0


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_a_run_directory_is_never_mixed_with_another_run_or_cut_back(data_dir, tmp_path):
    out = tmp_path / "run"
    settings = {"max_steps": 8, "checkpoint_interval": 2, "keep_last": 10}
    first = train(make_config(data_dir, out, **settings))
    (out / "best" / "adapters" / "verse").mkdir(parents=True)
    (out / "best" / "adapters" / "verse" / "adapter_config.json").write_text("{}")
    before = _snapshot(out)

    # The same run again: refused, nothing touched.
    with pytest.raises(PrometheanError) as error:
        train(make_config(data_dir, out, **settings))
    assert str(error.value) == (
        f"{out} already holds a training run (step-000008, best, metrics.jsonl); continue it "
        f"with --resume {out / 'step-000008'}, start over in it with --overwrite (its step "
        "checkpoints and metrics are replaced; adapters and other files are kept), or choose "
        "another out."
    )
    # A resume from an older step: refused, the newer checkpoints survive.
    with pytest.raises(PrometheanError) as error:
        train(make_config(data_dir, out, **settings), resume=out / "step-000004")
    assert str(error.value).startswith(
        f"{out} has checkpoints newer than {out / 'step-000004'} (step 4): step-000006, "
        "step-000008; resuming there would replace them."
    )
    assert _snapshot(out) == before

    # A branch into a new directory continues exactly and leaves the run alone.
    branch = train(make_config(data_dir, tmp_path / "branch", **settings),
                   resume=out / "step-000004")
    assert branch.losses == [(s, loss) for s, loss in first.losses if s > 4]
    assert _snapshot(out) == before

    # --overwrite from the older step: the newer checkpoints go, metrics read as one run.
    again = train(make_config(data_dir, out, **settings), resume=out / "step-000004",
                  overwrite=True)
    assert again.losses == branch.losses
    steps = [line["step"] for line in read_metrics(out) if "train_loss" in line]
    assert steps == list(range(1, 9))
    assert (out / "best" / "adapters" / "verse" / "adapter_config.json").read_text() == "{}"

    # A fresh start with --overwrite replaces the old run's checkpoints and metrics only.
    (out / "notes.txt").write_text("mine")
    fresh = train(make_config(data_dir, out, **{**settings, "max_steps": 4, "seed": 2}),
                  overwrite=True)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000004"]
    assert [line["step"] for line in read_metrics(out) if "train_loss" in line] == [1, 2, 3, 4]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "best" / "adapters" / "verse" / "adapter_config.json").read_text() == "{}"
    assert fresh.losses != first.losses[:4]
    # `--resume RUN_DIR` picks its newest step checkpoint.
    resumed = train(make_config(data_dir, out, **{**settings, "max_steps": 6, "seed": 2}),
                    resume=out)
    assert [s for s, _ in resumed.losses] == [5, 6]


# ------------------------------------------------------- schedules, epochs, dropout, budget


def test_schedules_after_warmup_match_hand_computed_values():
    # lr 1.0 -> min_lr 0.1, 4 warmup steps, max_steps 14: the decay spans steps 4..14.
    for schedule in ("cosine", "linear", "constant"):
        warmup = [lr_at(step, 1.0, 0.1, 4, 14, schedule) for step in range(4)]
        assert warmup == pytest.approx([0.2, 0.4, 0.6, 0.8])  # (step + 1) / 5
    linear = {step: lr_at(step, 1.0, 0.1, 4, 14, "linear") for step in (4, 9, 11, 14, 20)}
    assert linear == pytest.approx({4: 1.0, 9: 0.55, 11: 0.37, 14: 0.1, 20: 0.1})
    cosine = {step: lr_at(step, 1.0, 0.1, 4, 14, "cosine") for step in (4, 6, 9, 14, 20)}
    # step 6: 0.1 + 0.5 * (1 + cos(0.2 pi)) * 0.9, cos(0.2 pi) = 0.80901699...
    assert cosine == pytest.approx({4: 1.0, 6: 0.91405765, 9: 0.55, 14: 0.1, 20: 0.1})
    assert [lr_at(step, 1.0, 0.1, 4, 14, "constant") for step in (4, 9, 14, 30)] == [1.0] * 4
    # The default is today's cosine, bit for bit (the formula as it stood, written out here).
    for step in range(30):
        if step < 5:
            old = 6e-4 * (step + 1) / 6
        elif step >= 20:
            old = 6e-5
        else:
            old = 6e-5 + 0.5 * (1.0 + math.cos(math.pi * (step - 5) / 15)) * (6e-4 - 6e-5)
        assert lr_at(step, 6e-4, 6e-5, 5, 20) == old
    with pytest.raises(ValueError, match="one of cosine, linear, constant"):
        lr_at(0, 1.0, 0.1, 4, 14, "cosin")


def test_new_settings_are_refused_in_one_sentence():
    base = ["model='a'", "data='b'", "out='c'"]
    with pytest.raises(ConfigError, match=r"'schedule' input should be 'cosine', 'linear' or "
                                          r"'constant' \(got 'cosin'\)"):
        load_train_config(None, [*base, "schedule='cosin'"])
    with pytest.raises(ConfigError, match=r"max_steps \(12\) and max_epochs \(2.0\) both set the "
                                          "run's length; set only one of them"):
        load_train_config(None, [*base, "max_steps=12", "max_epochs=2"])
    with pytest.raises(ConfigError, match="'max_epochs' input should be greater than 0"):
        load_train_config(None, [*base, "max_epochs=0"])
    with pytest.raises(ConfigError, match="'max_minutes' input should be a finite number"):
        load_train_config(None, [*base, "max_minutes=inf"])
    with pytest.raises(ConfigError, match="'dropout' input should be less than 1"):
        load_train_config(None, [*base, "dropout=1.0"])
    # Copying a config with max_epochs (as the memory planner does) keeps it valid.
    epochs = load_train_config(None, [*base, "max_epochs=2"])
    assert epochs.with_overrides(batch_size=4).max_epochs == 2.0


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_a_run_follows_its_schedule(data_dir, tmp_path, schedule):
    result = train(make_config(data_dir, tmp_path / "run", max_steps=6, eval_interval=6,
                               schedule=schedule))
    rates = [line["lr"] for line in read_metrics(tmp_path / "run")]
    assert rates == [lr_at(step, 3e-3, 3e-4, 3, 6, schedule) for step in range(6)]
    assert result.steps == 6


def assert_same_run(losses_a, losses_b, checkpoint_a, checkpoint_b):
    assert [step for step, _ in losses_a] == [step for step, _ in losses_b]
    for (step, loss_a), (_, loss_b) in zip(losses_a, losses_b, strict=True):
        assert abs(loss_a - loss_b) < 1e-6, (step, loss_a, loss_b)
    weights_a = load_checkpoint(checkpoint_a).model.state_dict()
    weights_b = load_checkpoint(checkpoint_b).model.state_dict()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=1e-6)


def epoch_config(data_dir, out, max_epochs, **overrides) -> TrainConfig:
    settings = make_config(data_dir, out, **overrides).model_dump(exclude_unset=True)
    del settings["max_steps"]
    return TrainConfig(**settings, max_epochs=max_epochs)


def test_steps_for_epochs_counts_tokens_and_reads_the_decimal():
    from promethean.train.trainer import steps_for_epochs

    assert steps_for_epochs(1, 1000, 128) == 8  # 7.8 steps: the last one completes the epoch
    assert steps_for_epochs(2, 1000, 128) == 16  # 15.6
    assert steps_for_epochs(0.1, 1280, 128) == 1  # exactly one; the float 0.1 is a hair more
    assert steps_for_epochs(3, 1280, 128) == 30
    assert steps_for_epochs(0.001, 1000, 128) == 1  # never zero steps


def test_max_epochs_derives_the_steps_and_resumes_exactly(data_dir, tmp_path):
    from promethean.data.prepare import read_meta

    train_tokens = read_meta(data_dir)["splits"]["train"]["tokens"]
    tokens_per_step = 2 * 2 * 32
    expected = math.ceil(0.5 * train_tokens / tokens_per_step)
    assert 6 <= expected <= 20  # the fixture's size: a short run
    straight = train(epoch_config(data_dir, tmp_path / "a", 0.5))
    assert straight.stopped == "max_steps" and straight.steps == expected
    assert straight.tokens >= 0.5 * train_tokens > straight.tokens - tokens_per_step
    evals = [line["step"] for line in read_metrics(tmp_path / "a") if "val_loss" in line]
    assert evals[-1] == expected  # the end of the derived run is evaluated
    half = expected // 2
    first = train(epoch_config(data_dir, tmp_path / "b", 0.5), until_step=half)
    assert first.stopped == "until_step" and first.steps == half
    resumed = train(epoch_config(data_dir, tmp_path / "b", 0.5), resume=first.final_checkpoint)
    assert resumed.steps == expected
    # Same batches, same schedule (derived again from the same data and batch shape).
    assert_same_run(straight.losses, first.losses + resumed.losses, straight.final_checkpoint,
                    resumed.final_checkpoint)


def test_dropout_acts_in_training_only():
    from promethean.data.batches import exact_loss

    torch.manual_seed(0)
    model = Transformer(load_preset("tiny-gpt2").model)
    plain = Transformer(load_preset("tiny-gpt2").model)
    plain.load_state_dict(model.state_dict())
    model.set_dropout(0.1)
    assert model.config.dropout == 0.1
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train(), plain.train()
    torch.manual_seed(2)
    dropped = model(idx).logits
    torch.manual_seed(3)
    assert not torch.equal(dropped, model(idx).logits)  # a different mask each forward
    assert not torch.equal(dropped, plain(idx).logits)
    model.eval(), plain.eval()
    assert torch.equal(model(idx).logits, plain(idx).logits)  # eval: dropout is the identity
    batches = [(idx, idx.roll(-1, 1))]
    assert exact_loss(model, batches) == exact_loss(plain, batches)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        model.set_dropout(1.0)


def test_dropout_changes_the_train_loss_resumes_exactly_and_is_saved(data_dir, tmp_path):
    from promethean.data.batches import TokenDataset, evaluate

    settings = dict(max_steps=8, eval_interval=4, dropout=0.1)
    without = train(make_config(data_dir, tmp_path / "plain", max_steps=8, eval_interval=4))
    straight = train(make_config(data_dir, tmp_path / "a", **settings))
    # Same weights and batches at step 1: only dropout makes its loss differ.
    assert straight.losses[0][1] != without.losses[0][1]
    first = train(make_config(data_dir, tmp_path / "b", **settings), until_step=3)
    resumed = train(make_config(data_dir, tmp_path / "b", **settings),
                    resume=first.final_checkpoint)
    # The dropout masks resume too (the RNG state is in the checkpoint).
    assert_same_run(straight.losses, first.losses + resumed.losses, straight.final_checkpoint,
                    resumed.final_checkpoint)
    # The checkpoint records its dropout; evaluating it is deterministic and dropout-free.
    loaded = load_checkpoint(straight.final_checkpoint)
    assert loaded.config.dropout == 0.1
    dataset = TokenDataset(data_dir)
    model = loaded.model.eval()
    scores = [evaluate(model, dataset, "val", 2, 32).loss for _ in range(2)]
    model.set_dropout(0.0)
    assert scores == [evaluate(model, dataset, "val", 2, 32).loss] * 2


def test_fine_tuning_sets_dropout_on_a_checkpoint(data_dir, tmp_path):
    base = train(make_config(data_dir, tmp_path / "base", max_steps=2, eval_interval=2))
    tuned = train(make_config(data_dir, tmp_path / "tuned", model=str(base.final_checkpoint),
                              max_steps=2, eval_interval=2, dropout=0.2))
    assert load_checkpoint(tuned.final_checkpoint).config.dropout == 0.2
    kept = train(make_config(data_dir, tmp_path / "kept", model=str(tuned.final_checkpoint),
                             max_steps=2, eval_interval=2))
    assert load_checkpoint(kept.final_checkpoint).config.dropout == 0.2  # None keeps the model's


def test_max_minutes_stops_with_a_checkpoint_and_counts_earlier_legs(data_dir, tmp_path,
                                                                      monkeypatch):
    from promethean.train import loop

    def ten_seconds_a_step():  # the loop reads the clock once at its start and once a step
        ticks = itertools.count(0, 10)
        monkeypatch.setattr(loop, "wall_clock", lambda: float(next(ticks)))

    ten_seconds_a_step()
    straight = train(make_config(data_dir, tmp_path / "a"))
    ten_seconds_a_step()
    out = tmp_path / "b"
    first = train(make_config(data_dir, out, max_minutes=0.5))  # 30 s: three steps
    assert first.stopped == "max_minutes" and first.steps == 3
    assert first.final_checkpoint == out / step_dir_name(3)
    assert load_training_state(first.final_checkpoint).progress.elapsed == 30.0
    assert [line["step"] for line in read_metrics(out) if "val_loss" in line] == [3]
    with pytest.raises(PrometheanError, match=(
        r"has already trained for 0.5 minutes, which spends the max_minutes budget of 0.5 \(it "
        r"counts every leg of a run\); raise max_minutes \(--max-minutes\) to continue it.")):
        train(make_config(data_dir, out, max_minutes=0.5), resume=first.final_checkpoint)
    ten_seconds_a_step()
    second = train(make_config(data_dir, out, max_minutes=1.0), resume=first.final_checkpoint)
    assert second.stopped == "max_minutes" and second.steps == 6  # 30 s + three more
    joined = first.losses + second.losses
    assert [step for step, _ in joined] == list(range(1, 7))
    assert all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(joined, straight.losses, strict=False))


def test_evaluation_line_format():
    from promethean.train.loop import evaluation_line

    assert evaluation_line(200, 2000, 2.3141, 2.4009, 1.1203, 2.9e-4, 41200.4) == (
        "step 200/2000  train 2.314  val 2.401  bpb 1.120  lr 2.9e-4  41,200 tok/s"
    )


@pytest.mark.parametrize("bar", [False, True])
def test_each_evaluation_prints_one_line_on_stderr(data_dir, tmp_path, capsys, bar):
    import re

    train(make_config(data_dir, tmp_path / "run", max_steps=8, eval_interval=4, progress=bar))
    captured = capsys.readouterr()
    evals = [line for line in read_metrics(tmp_path / "run") if "val_loss" in line]
    pattern = re.compile(r"step (\d+)/8  train (\S+)  val (\S+)  bpb (\S+)  lr (\S+)  [\d,]+ tok/s")
    found = [m.groups() for m in map(pattern.search, captured.err.splitlines()) if m]
    assert [int(step) for step, *_ in found] == [4, 8]
    losses = [line["train_loss"] for line in read_metrics(tmp_path / "run") if "train_loss" in line]
    assert evals[0]["mean_train_loss"] == pytest.approx(sum(losses[:4]) / 4)
    for (_, train_loss, val_loss, bits, lr), record in zip(found, evals, strict=True):
        assert val_loss == f"{record['val_loss']:.3f}"
        assert train_loss == f"{record['mean_train_loss']:.3f}"  # over the steps since the last
        assert bits == f"{record['val_bits_per_byte']:.3f}"
        assert float(lr) == pytest.approx(record["lr"], rel=0.05)
    assert captured.out == ""


def test_the_shared_optimizer_step_skips_and_counts_non_finite_steps():
    """train.loop's step, which the trainer, learn and finetune-chat all take."""
    from promethean.train.loop import optimizer_step, refuse_a_runaway
    from promethean.train.state import Progress

    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    counts = Progress()
    (weight * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4): norm 5
    assert optimizer_step(optimizer, [weight], 1.0, 1.0, counts) == pytest.approx(5.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0 - 0.3, -2.0 - 0.4]))
    assert weight.grad is None and (counts.skipped_steps, counts.nonfinite_in_a_row) == (0, 0)
    for in_a_row in (1, 2):
        weight.sum().backward()
        before = weight.detach().clone()
        optimizer_step(optimizer, [weight], math.nan, 1.0, counts)
        assert torch.equal(weight.detach(), before)  # a NaN loss is never stepped on
        assert (counts.skipped_steps, counts.nonfinite_in_a_row) == (in_a_row, in_a_row)
    refuse_a_runaway(counts, 7, 3, "lower the lr.")  # 2 in a row: not yet
    with pytest.raises(PrometheanError) as raised:
        refuse_a_runaway(counts, 7, 2, "lower the lr.")
    assert str(raised.value) == ("training stopped at step 7: 2 steps in a row had a NaN or "
                                 "infinite loss or gradient; lower the lr.")
    weight.sum().backward()
    optimizer_step(optimizer, [weight], 0.5, None, counts)
    # A good step ends the streak, not the count.
    assert (counts.skipped_steps, counts.nonfinite_in_a_row) == (2, 0)


def test_run_loop_calls_the_hooks_when_the_plan_says():
    """The one loop on a toy regression: evaluations every 3 steps and at the end, a resumable
    save every 4 steps (not at the last), records every 2 steps and at each evaluation, the
    best kept on improvement only, early stopping after `patience` evaluations without one."""
    from promethean.train.loop import LoopHooks, LoopPlan, TrainedStep, run_loop
    from promethean.train.state import Progress

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3))
    inputs = torch.randn(16, 3)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    calls, records = [], []

    def train_step(step):
        loss = ((inputs @ weight - targets) ** 2).mean()
        loss.backward()
        calls.append(("train", step))
        return TrainedStep(float(loss.detach()), tokens=16, fields={"extra": step})

    scripted = iter([3.0, 2.0, 2.5])

    def evaluate():
        calls.append(("evaluate",))
        return {"val_loss": next(scripted)}

    hooks = LoopHooks(train_step, evaluate=evaluate,
                      keep_best=lambda progress: calls.append(("best", progress.step)),
                      save_progress=lambda progress: calls.append(("save", progress.step)))
    plan = LoopPlan("toy", optimizer, [weight], max_steps=8, learning_rate=lambda step: 0.1,
                    log_every=2, eval_every=3, checkpoint_every=4, show_progress=False,
                    metrics=records.append)
    progress = Progress()
    outcome = run_loop(plan, hooks, progress)
    assert outcome.stopped == "max_steps" and progress.step == 8 and progress.tokens == 128
    assert [c for c in calls if c[0] != "train"] == [
        ("evaluate",), ("best", 3), ("save", 4), ("evaluate",), ("best", 6), ("evaluate",)]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]
    assert records[0]["extra"] == 1 and "val_loss" not in records[0]
    assert records[1]["val_loss"] == 3.0
    losses = [loss for _, loss in outcome.losses]
    assert losses == sorted(losses, reverse=True)  # it learns
    assert records[1]["mean_train_loss"] == pytest.approx(sum(losses[:3]) / 3)
    assert progress.best_val_loss == 2.0 and progress.evals_without_improvement == 1
    # The same plan resumed from its counters at step 8 of 12 with patience 1 stops early.
    scripted = iter([2.0])
    plan.max_steps, plan.patience = 12, 1
    outcome = run_loop(plan, hooks, progress)
    assert (outcome.stopped, progress.step) == ("early_stopping", 9)
