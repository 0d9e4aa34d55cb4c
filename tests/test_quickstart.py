"""`promethean quickstart`: the real demo (corpus, 8K BPE, data, training, plot, samples), run with
a hidden fixed step count so it stays quick."""

import os
import subprocess
import sys

from promethean.quickstart import scenes

ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def run_quickstart(out, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "promethean", "quickstart", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_scenes_keep_every_character_but_the_cut():
    play = "Title\n\nACT I\n\nSCENE I. A.\n\nx\n\nSCENE II. B.\n\ny"
    assert list(scenes([play])) == ["Title\n\nACT I\n\nSCENE I. A.\n\nx", "SCENE II. B.\n\ny"]
    assert list(scenes(["no scenes"])) == ["no scenes"]


def test_quickstart_trains_saves_plots_and_samples_then_reuses_its_cache(tmp_path):
    out = tmp_path / "qs"
    first = run_quickstart(out, "--steps", "2")
    assert first.returncode == 0, first.stderr
    for name in ("model.safetensors", "config.json", "promethean-tokenizer.json"):
        assert (out / "checkpoint" / name).is_file()
    assert (out / "tokenizer" / "promethean-tokenizer.json").is_file()
    assert (out / "data" / "meta.json").is_file()
    assert (out / "metrics.png").stat().st_size > 0
    assert "trained an 8,000-id BPE tokenizer" in first.stdout
    assert "bits per byte" in first.stdout
    for prompt in ("ROMEO:", "To be", "The king"):
        assert prompt in first.stdout
    assert f"promethean generate {out / 'checkpoint'} -p" in first.stdout
    assert "1,729,664 parameters" in first.stdout

    second = run_quickstart(out, "--steps", "1")
    assert second.returncode == 0, second.stderr
    assert "tokenizer: " in second.stdout and "(cached)" in second.stdout
    assert ", cached)" in second.stdout  # the data were not prepared again
    assert "trained 1 steps" in second.stdout or "trained 1 step" in second.stdout


def test_quickstart_refuses_a_bad_time_budget(tmp_path):
    result = run_quickstart(tmp_path / "qs", "--minutes", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --minutes must be a positive number, got 0.0."


def test_a_time_budget_plans_the_schedule_and_holds_the_trainer_to_it(tmp_path, monkeypatch):
    """The measured step time sets the schedule's length; the trainer's own max_minutes then
    enforces the budget (the shared knob, not a quickstart-only clock)."""
    import promethean.quickstart as quickstart
    import promethean.train.trainer as trainer

    class Planned(Exception):
        pass

    seen = {}

    def capture(config, **options):
        seen["config"] = config
        raise Planned

    monkeypatch.setattr(quickstart, "seconds_per_step", lambda *args, **kwargs: 0.05)
    monkeypatch.setattr(trainer, "train", capture)
    try:
        quickstart.run_quickstart(tmp_path / "qs", minutes=0.5)
    except Planned:
        pass
    config = seen["config"]
    assert config.max_minutes == 0.5
    assert 0 < config.max_steps <= 0.5 * 60 / 0.05  # evaluation time is planned in too
