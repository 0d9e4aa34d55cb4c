import json
import subprocess
import sys

import pytest

from promethean.errors import PrometheanError
from promethean.train.plot import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, lines):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_plot_draws_losses_and_learning_rate(tmp_path):
    lines = [json.dumps({"step": s, "train_loss": 5 - s / 10, "lr": 1e-3 * s / 10}) for s in range(1, 11)]
    lines += [json.dumps({"step": 5, "val_loss": 4.6, "val_perplexity": 99.5})]
    write_metrics(tmp_path, lines)
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png"
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_malformed_line_is_named(tmp_path):
    write_metrics(tmp_path, [json.dumps({"step": 1, "train_loss": 3.0}), "{oops"])
    with pytest.raises(PrometheanError, match=r"metrics.jsonl line 2 is not valid JSON"):
        plot_run(tmp_path)


def test_cli_plot_and_its_bad_input(tmp_path):
    write_metrics(tmp_path, [json.dumps({"step": 1, "train_loss": 3.0, "lr": 0.1})])
    done = subprocess.run([sys.executable, "-m", "promethean", "plot", str(tmp_path), "--out",
                           str(tmp_path / "p.png")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_SIGNATURE)
    empty = tmp_path / "empty"
    write_metrics(empty, [])
    failed = subprocess.run([sys.executable, "-m", "promethean", "plot", str(empty)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr == f"error: {empty / 'metrics.jsonl'} holds no metrics yet.\n"
    missing = subprocess.run([sys.executable, "-m", "promethean", "plot", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "has no metrics.jsonl" in missing.stderr
