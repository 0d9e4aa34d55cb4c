"""The command line as a user meets it: real processes, real exit codes, no tracebacks."""

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    result = subprocess.run(
        [sys.executable, "-m", "promethean", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def fails_with(result, sentence):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"error: {sentence}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    result = run("model", "init", "tiny-llama", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_model_info_prints_parameter_counts():
    result = run("model", "info", "gpt2-small")
    assert result.returncode == 0
    assert "124,439,808" in result.stdout
    assert "85,056,000" in result.stdout


def test_model_info_reads_a_checkpoint(checkpoint):
    result = run("model", "info", str(checkpoint))
    assert result.returncode == 0 and "836,736" in result.stdout


def test_generate_from_a_checkpoint_is_deterministic_when_greedy(checkpoint):
    args = ("generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Hello") and first.stdout == second.stdout


def test_generate_a_batch_of_prompts(checkpoint):
    # Seeded: unseeded sampling from a random model sometimes picks the end-of-text token.
    result = run("generate", str(checkpoint), "-p", "a", "-p", "bc", "--max-new-tokens", "5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finish: length") == 2


def test_generate_from_a_preset_warns_that_weights_are_random():
    result = run("generate", "tiny-gemma3", "-p", "Hi", "--max-new-tokens", "4")
    assert result.returncode == 0
    assert "is a preset, not a checkpoint: the weights are random" in result.stderr


def test_unknown_preset():
    fails_with(
        run("model", "info", "gpt-9"),
        "unknown preset 'gpt-9'; available presets: gemma3-270m, gpt2-small, gpt2-sssm, "
        "llama-127m, tiny-gemma3, tiny-gpt2, tiny-llama, tiny-ssm, tiny-sssm.",
    )


def test_malformed_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[model]\nvocab_size = = 3\n")
    result = run("model", "info", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path} is not valid TOML")


def test_missing_checkpoint_file(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    (broken / "promethean-tokenizer.json").write_text(
        (checkpoint / "promethean-tokenizer.json").read_text())
    fails_with(run("generate", str(broken), "-p", "x"), f"{broken} is missing model.safetensors.")


def test_mismatched_checkpoint_config(checkpoint, tmp_path):
    broken = tmp_path / "mismatch"
    broken.mkdir()
    for name in ("model.safetensors", "promethean-tokenizer.json"):
        (broken / name).write_bytes((checkpoint / name).read_bytes())
    record = json.loads((checkpoint / "config.json").read_text())
    record["model"]["d_ff"] = 64
    (broken / "config.json").write_text(json.dumps(record))
    fails_with(
        run("generate", str(broken), "-p", "x"),
        f"tensor 'blocks.0.mlp.gate_proj.weight' in {broken / 'model.safetensors'} has shape "
        "(352, 128) but the config needs (64, 128).",
    )


def test_prompt_longer_than_the_context(checkpoint):
    long_prompt = "x" * 300
    fails_with(
        run("generate", str(checkpoint), "-p", long_prompt, "--max-new-tokens", "3"),
        "the prompt is 300 tokens but the model's context is 256; shorten it, or ask to crop it "
        "to the most recent tokens (--crop).",
    )
    cropped = run("generate", str(checkpoint), "-p", long_prompt, "--max-new-tokens", "3", "--crop")
    assert cropped.returncode == 0


def test_unavailable_device():
    fails_with(
        run("generate", "tiny-gpt2", "-p", "x", "--device", "cuda"),
        "device 'cuda' was requested but no CUDA GPU is available.",
    )


def test_bad_sampling_value(checkpoint):
    fails_with(run("generate", str(checkpoint), "-p", "x", "--top-p", "0"), "top_p must be in (0, 1], got 0.0.")


def test_convert_to_hf_and_back_keeps_the_model(checkpoint, tmp_path):
    exported, imported = tmp_path / "hf", tmp_path / "back"
    assert run("convert", "to-hf", str(checkpoint), "--out", str(exported)).returncode == 0
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    result = run("convert", "from-hf", str(exported), "--out", str(imported), "--tokenizer", "bytes")
    assert result.returncode == 0, result.stderr
    args = ("-p", "Hello", "--max-new-tokens", "10", "--temperature", "0")
    assert run("generate", str(imported), *args).stdout == run("generate", str(checkpoint), *args).stdout


def test_convert_from_a_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = run("convert", "from-hf", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "safetensors" in result.stderr and result.stderr.count("\n") == 1


def test_bad_paths_and_ports_are_one_error_line(checkpoint, tmp_path):
    fails_with(run("pretrain", str(tmp_path)), f"{tmp_path} is a directory; give a config file (TOML).")
    fails_with(run("serve", str(checkpoint), "--port", "99999"),
               "--port must be from 0 to 65535, got 99999.")
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    result = run("export", str(checkpoint), "--format", "gguf", "--out", str(a_file / "x.gguf"))
    fails_with(result, f"{a_file} is a file, and a directory is needed there.")
    assert a_file.read_text() == "mine"
    # The OS's refusal names the path the user gave, not the staging file beside it.
    result = run("export", str(checkpoint), "--format", "gguf", "--out", "/proc/x.gguf")
    fails_with(result, "No such file or directory (/proc/x.gguf).")
    result = run("generate", str(checkpoint), "--prompt", "hi", "--seed", str(2**64))
    fails_with(result, f"seed must be an integer from -2**63 to 2**64 - 1, got {2**64}.")
    assert run("generate", str(checkpoint), "--prompt", "hi", "--temperature", "1e-300",
               "--max-new-tokens", "2").returncode == 0


# ------------------------------------------------------------------------- training knobs


def _train_config(tmp_path, data_dir, **settings):
    lines = {"model": '"tiny-gpt2"', "data": f'"{data_dir}"', "out": f'"{tmp_path / "run"}"',
             "batch_size": "2", "block_size": "32", "max_steps": "40", "eval_interval": "2",
             "eval_batches": "2", "device": '"cpu"', "warmup_steps": "0", "lr": "1e-9",
             "min_lr": "0.0", **settings}
    path = tmp_path / "run.toml"
    path.write_text("".join(f"{key} = {value}\n" for key, value in lines.items()))
    return path


@pytest.mark.parametrize("bar", ["true", "false"])
def test_pretrain_maps_patience_min_delta_and_max_minutes_and_prints_each_evaluation(
        tmp_path, data_dir, bar):
    """lr ~0 cannot improve the validation loss by 0.5: with --patience 1 the second evaluation
    stops the run. Each evaluation is one line on stderr, with the progress bar on or off."""
    config = _train_config(tmp_path, data_dir, progress=bar)
    result = run("pretrain", str(config), "--patience", "1", "--min-delta", "0.5",
                 "--max-minutes", "60")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("early stopping at step 4 ")
    lines = [line for line in result.stderr.splitlines() if "tok/s" in line and "bpb" in line]
    assert [line.split()[1] for line in lines] == ["2/40", "4/40"], result.stderr
    assert all(" train " in line and " val " in line and " lr " in line for line in lines)
    from promethean.checkpoint import read_checkpoint_record

    train_config = read_checkpoint_record(tmp_path / "run" / "step-000004")[1]["train_config"]
    assert train_config["early_stopping_patience"] == 1
    assert train_config["early_stopping_min_delta"] == 0.5
    assert train_config["max_minutes"] == 60.0


def test_finetune_takes_the_same_flags_and_a_dropout(tmp_path, data_dir):
    from promethean.checkpoint import load_checkpoint, read_checkpoint_record

    config = _train_config(tmp_path, data_dir, model='"ignored"', progress="false", max_steps="2")
    base = tmp_path / "base"
    made = run("model", "init", "tiny-gpt2", "--out", str(base))
    assert made.returncode == 0, made.stderr
    result = run("finetune", str(config), "--checkpoint", str(base), "--patience", "3",
                 "--min-delta", "0.01", "--max-minutes", "30", "--set", "dropout=0.1")
    assert result.returncode == 0, result.stderr
    saved = read_checkpoint_record(tmp_path / "run" / "step-000002")[1]["train_config"]
    assert (saved["early_stopping_patience"], saved["early_stopping_min_delta"],
            saved["max_minutes"], saved["dropout"]) == (3, 0.01, 30.0, 0.1)
    assert load_checkpoint(tmp_path / "run" / "step-000002").config.dropout == 0.1


def test_bad_training_knobs_are_one_error_line(tmp_path, data_dir):
    config = _train_config(tmp_path, data_dir, progress="false")
    fails_with(run("pretrain", str(config), "--max-minutes", "0"),
               f"training config {config} is invalid: 'max_minutes' input should be greater "
               "than 0 (got 0.0).")
    fails_with(run("pretrain", str(config), "--patience", "0"),
               f"training config {config} is invalid: 'early_stopping_patience' input should be "
               "greater than 0 (got 0).")
    fails_with(run("pretrain", str(config), "--set", "schedule='cosin'"),
               f"training config {config} is invalid: 'schedule' input should be 'cosine', "
               "'linear' or 'constant' (got 'cosin').")
    fails_with(run("pretrain", str(config), "--set", "max_epochs=2"),
               f"training config {config} is invalid: max_steps (40) and max_epochs (2.0) both "
               "set the run's length; set only one of them.")
