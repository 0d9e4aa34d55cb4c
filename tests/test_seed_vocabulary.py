"""The founding systems' names for settings are understood (with a note), a misspelt key gets
the setting it most likely meant, and model settings change from the command line
(`--model-set`) as training ones do, within what a checkpoint's weights allow."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promethean.checkpoint import apply_model_overrides, load_checkpoint
from promethean.config import SettingNote, load_preset, load_preset_file
from promethean.errors import ConfigError, PrometheanError
from promethean.train.config import (
    load_train_config,
    parse_model_override,
    parse_override,
    parse_train_config,
)
from promethean.train.trainer import train

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], capture_output=True,
                            text=True, env=SUBPROCESS_ENV, timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def newest_step(run):
    return sorted(run.glob("step-*"))[-1]


def notes_of(call, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call(*args, **kwargs)
    return value, [str(w.message) for w in caught if issubclass(w.category, SettingNote)]


# ------------------------------------------------------------------------- the seed cards' configs
def test_the_sssm_cards_training_config_reads_as_ours(tmp_path):
    """Card 000's train_config, written as TOML, with its nested ssmm_config."""
    path = tmp_path / "card.toml"
    path.write_text(
        'model = "tiny-sssm"\ndata = "d"\nout = "o"\n'
        'max_length = 512\nbatch_size = 2\ngradient_accumulation_steps = 4\n'
        'learning_rate = 2e-5\nwarmup_steps = 1000\nmax_steps = 100000\nsave_steps = 10000\n'
        'eval_steps = 5000\n[ssmm_config]\nstate_size = 16\nspike_threshold = 0.1\n')
    config, notes = notes_of(load_train_config, path)
    assert (config.block_size, config.grad_accum, config.lr, config.checkpoint_interval,
            config.eval_interval, config.max_steps) == (512, 4, 2e-5, 10000, 5000, 100000)
    assert config.model_overrides == {"ssm_state_size": 16, "spike_threshold": 0.1}
    assert notes == [
        "'ssmm_config' is read as model settings (model_overrides).",
        "'state_size' is read as 'ssm_state_size', Promethean's name for it.",
        "'max_length' is read as 'block_size', Promethean's name for it.",
        "'gradient_accumulation_steps' is read as 'grad_accum', Promethean's name for it.",
        "'learning_rate' is read as 'lr', Promethean's name for it.",
        "'save_steps' is read as 'checkpoint_interval', Promethean's name for it.",
        "'eval_steps' is read as 'eval_interval', Promethean's name for it.",
    ]


def test_nanogpt_style_settings_and_model_args_read_as_ours():
    config, notes = notes_of(parse_train_config, {
        "model": "tiny-gpt2", "data": "d", "out": "o", "batch_size": 2, "block_size": 128,
        "max_iters": 1000, "eval_iters": 20, "warmup_iters": 100, "learning_rate": 3e-4,
        "dropout": 0.1, "n_layer": 2, "model_args": {"n_head": 2, "bias": True},
    })
    assert (config.max_steps, config.eval_batches, config.warmup_steps, config.lr,
            config.dropout, config.block_size) == (1000, 20, 100, 3e-4, 0.1, 128)
    assert config.model_overrides == {"n_head": 2, "bias": True, "n_layer": 2}
    assert "'n_layer' is a model setting: applied to the model as --model-set n_layer=... would." in notes


def test_minimac_and_gemma_model_names_read_as_ours(tmp_path):
    path = tmp_path / "minimac.toml"
    path.write_text('tokenizer = "bytes"\n[model]\nvocab_size = 257\nd_model = 64\n'
                    'num_layers = 2\nnum_query_heads = 4\nnum_kv_heads = 2\nd_ff = 128\n'
                    'max_seq_len = 64\nnorm = "rmsnorm"\nmlp = "swiglu"\nposition = "rope"\n')
    preset, notes = notes_of(load_preset_file, path)
    model = preset.model
    assert (model.n_embd, model.n_layer, model.n_head, model.n_kv_head, model.context_length) == (
        64, 2, 4, 2, 64)
    assert notes[0] == "'d_model' is read as 'n_embd', Promethean's name for it."
    assert len(notes) == 5  # d_model, num_layers, num_query_heads, num_kv_heads, max_seq_len


@pytest.mark.parametrize(("data", "sentence"), [
    ({"learnin_rate": 1.0},
     "training config is invalid: 'learnin_rate' is not a known setting; did you mean 'lr'?"),
    ({"max_step": 3},
     "training config is invalid: 'max_step' is not a known setting; did you mean 'max_steps'?"),
    ({"gradient_accumulation": 3}, "training config is invalid: 'gradient_accumulation' is not a "
     "known setting; did you mean 'grad_accum'?"),
    ({"lr": 1e-3, "learning_rate": 2e-3},
     "training config sets both 'learning_rate' and 'lr', which are the same setting; keep one."),
    ({"model_overrides": {"n_layr": 2}}, "training config is invalid: model_overrides: 'n_layr' "
     "is not a known setting; did you mean 'n_layer'?"),
    ({"ssmm_config": 16}, "training config: 'ssmm_config' must be a table of model settings."),
])
def test_unknown_or_doubled_settings_get_one_sentence(data, sentence):
    with pytest.raises(ConfigError) as raised:
        parse_train_config({"model": "tiny-gpt2", "data": "d", "out": "o", **data})
    assert str(raised.value) == sentence


def test_overrides_take_aliases_and_point_model_settings_to_model_set():
    (key, value), notes = notes_of(parse_override, "learning_rate=3e-4")
    assert (key, value) == ("lr", 3e-4) and notes
    with pytest.raises(ConfigError) as raised:
        parse_override("n_layer=3")
    assert str(raised.value) == "override 'n_layer' is a model setting; set it with --model-set n_layer=3."
    with pytest.raises(ConfigError) as raised:
        parse_override("evel_interval=3")
    assert str(raised.value) == "override 'evel_interval' is not a known setting; did you mean 'eval_interval'?"
    assert parse_model_override("num_layers=3") == ("n_layer", 3)
    assert parse_model_override("mixer_pattern=['ssm', 'attention']") == (
        "mixer_pattern", ("ssm", "attention"))
    with pytest.raises(ConfigError) as raised:
        parse_model_override("vocab=3")
    assert str(raised.value) == "--model-set 'vocab' is not a known setting; did you mean 'vocab_size'?"


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=30), value=st.one_of(
    st.integers(), st.floats(allow_nan=True), st.text(max_size=10), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
def test_any_setting_is_read_or_refused_in_one_sentence(key, value):
    """Whatever key and value a config holds: a config, or one ConfigError line; never another
    exception."""
    for data in ({"model": "tiny-gpt2", "data": "d", "out": "o", key: value},
                 {"model": "tiny-gpt2", "data": "d", "out": "o", "model_overrides": {key: value}}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SettingNote)
            try:
                parse_train_config(data)
            except ConfigError as error:
                assert "\n" not in str(error).strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SettingNote)
        try:
            apply_model_overrides(load_preset("tiny-gpt2").model, {key: value})
        except ConfigError as error:
            assert "\n" not in str(error).strip()


# ----------------------------------------------------------------------------------- --model-set
def _run_config(data_dir, out, **extra):
    return {"model": "tiny-gpt2", "data": str(data_dir), "out": str(out), "batch_size": 2,
            "block_size": 32, "max_steps": 2, "eval_interval": 2, "eval_batches": 1,
            "progress": False, "device": "cpu", "warmup_steps": 0, **extra}


def test_model_set_shapes_a_preset_run_and_a_resume_keeps_it(data_dir, tmp_path):
    config = parse_train_config(_run_config(data_dir, tmp_path / "run", max_steps=4,
                                            checkpoint_interval=2,
                                            model_overrides={"n_layer": 1, "d_ff": 96}))
    train(config, until_step=2)
    resumed = train(config, resume=tmp_path / "run")
    checkpoint = load_checkpoint(resumed.final_checkpoint)
    assert (checkpoint.config.n_layer, checkpoint.config.d_ff) == (1, 96)
    # Resuming without the change is refused: it would be another model.
    plain = parse_train_config(_run_config(data_dir, tmp_path / "run", max_steps=4))
    with pytest.raises(PrometheanError, match=r"was trained with a different model than tiny-gpt2 "
                       r"\(n_layer is 1 there, 4 here\)"):
        train(plain, resume=tmp_path / "run" / "step-000002")


def test_model_set_on_a_checkpoint_changes_only_what_its_weights_allow(trained_checkpoint):
    trained_checkpoint, _data = trained_checkpoint
    base = load_checkpoint(trained_checkpoint)
    adjusted = apply_model_overrides(base.config, {"norm_eps": 1e-6}, trained_checkpoint)
    assert adjusted.norm_eps == 1e-6
    with pytest.raises(PrometheanError) as raised:
        apply_model_overrides(base.config, {"n_layer": 1}, trained_checkpoint)
    assert str(raised.value) == (
        f"--model-set n_layer cannot change on the checkpoint {trained_checkpoint}: its weights "
        f"were trained with n_layer = {base.config.n_layer}. A checkpoint can take other values "
        "of context_length, dropout, global_layers, init_std, norm_eps, rope_local_theta, "
        "rope_theta, sliding_window, spike_threshold; to change its architecture, start a model "
        "from a preset.")
    # Learned positions: a longer context would need a larger position table.
    assert base.config.position == "learned"
    with pytest.raises(PrometheanError) as raised:
        apply_model_overrides(base.config, {"context_length": base.config.context_length * 2},
                              trained_checkpoint)
    assert str(raised.value).startswith(
        f"--model-set context_length={base.config.context_length * 2} would change the shape of "
        f"the checkpoint {trained_checkpoint}'s weight position_embedding.weight")
    # The same setting equal to the checkpoint's own is no change at all.
    assert apply_model_overrides(base.config, {"n_layer": base.config.n_layer},
                                 trained_checkpoint) == base.config


def test_cli_model_set_on_pretrain_finetune_and_model_init(trained_checkpoint, data_dir, tmp_path):
    trained_checkpoint, _data = trained_checkpoint
    init = cli("model", "init", "tiny-llama", "--out", str(tmp_path / "init"),
               "--model-set", "num_layers=1", "--model-set", "rope_theta=500000.0")
    assert init.returncode == 0, init.stderr
    assert init.stderr == "note: 'num_layers' is read as 'n_layer', Promethean's name for it.\n"
    config = load_checkpoint(tmp_path / "init").config
    assert (config.n_layer, config.rope_theta) == (1, 500000.0)

    run_toml = tmp_path / "run.toml"
    run_toml.write_text("\n".join(f"{key} = {json.dumps(value)}" for key, value in
                                  _run_config(data_dir, tmp_path / "pre").items()) + "\n")
    # A seed card's name on the command line overrides the file's setting like ours would.
    pre = cli("pretrain", str(run_toml), "--model-set", "n_layer=1", "--set", "max_iters=3")
    assert pre.returncode == 0, pre.stderr
    assert pre.stderr.startswith(
        "note: 'max_iters' is read as 'max_steps', Promethean's name for it.\n")
    assert newest_step(tmp_path / "pre").name == "step-000003"
    assert load_checkpoint(newest_step(tmp_path / "pre")).config.n_layer == 1

    (tmp_path / "ft.toml").write_text(run_toml.read_text().replace(str(tmp_path / "pre"),
                                                                   str(tmp_path / "ft")))
    refused = cli("finetune", str(tmp_path / "ft.toml"), "--checkpoint", str(trained_checkpoint),
                  "--model-set", "d_ff=64")
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f"error: --model-set d_ff cannot change on the checkpoint {trained_checkpoint}: its weights "
        "were trained with d_ff = ")
    assert not (tmp_path / "ft").exists()
    fine = cli("finetune", str(tmp_path / "ft.toml"), "--checkpoint", str(trained_checkpoint),
               "--model-set", "norm_eps=1e-6")
    assert fine.returncode == 0, fine.stderr
    tuned = load_checkpoint(newest_step(tmp_path / "ft"))
    assert tuned.config.norm_eps == 1e-6
    assert tuned.config.n_layer == load_checkpoint(trained_checkpoint).config.n_layer


def test_model_overrides_in_a_train_config_are_recorded_with_the_run(data_dir, tmp_path):
    config = parse_train_config(_run_config(data_dir, tmp_path / "run",
                                            model_overrides={"dropout": 0.0, "n_embd": 64}))
    result = train(config)
    record = json.loads((result.final_checkpoint / "config.json").read_text())
    assert record["model"]["n_embd"] == 64
    assert record["metadata"]["train_config"]["model_overrides"] == {"dropout": 0.0, "n_embd": 64}
    model = load_checkpoint(result.final_checkpoint).model
    assert model.token_embedding.weight.shape[1] == 64
