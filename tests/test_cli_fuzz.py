"""Every command, given generated bad arguments: one `error:` line, a non-zero exit, no traceback,
and no byte of the user's good files changed.

The commands run in this process through `promethean.cli.main` (a subprocess each would cost
seconds of imports); anything but a SystemExit escaping main is the traceback a user would see.
"""

import contextlib
import io
import string
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.checkpoint import save_checkpoint
from promethean.cli import main
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory, data_dir):
    """A directory of things a user would not want touched: a checkpoint with an adapter, a
    training run, a config, a memory, a prepared data directory and a plain file."""
    from promethean.train.trainer import train
    from tests.test_train import make_config

    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = save_checkpoint(root / "ck", build("tiny-gpt2"), ByteTokenizer())
    (checkpoint / "adapters" / "verse").mkdir(parents=True)
    (checkpoint / "adapters" / "verse" / "adapter_config.json").write_text("{}")
    (checkpoint / "notes.txt").write_text("my notes")
    run = root / "run"
    train(make_config(data_dir, run, max_steps=2, eval_interval=2))
    config = root / "run.toml"
    config.write_text(f'model = "tiny-gpt2"\ndata = "{data_dir}"\nout = "{run}"\n'
                      'batch_size = 2\nblock_size = 32\nmax_steps = 4\ndevice = "cpu"\n'
                      "progress = false\n")
    (root / "afile.txt").write_text("thesis")
    for name, tree in (("memory-bad", "{not json"), ("memory-empty", "{}"),
                       ("memory-noitems", '{"format": "promethean-memory-tree", "version": 1}')):
        (root / name).mkdir()
        (root / name / "tree.json").write_text(tree)
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_argv = sys.argv
    sys.argv = ["promethean", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=24)
WORD = st.text(string.ascii_lowercase, min_size=1, max_size=12)
NEGATIVE = st.integers(max_value=-1).map(str)
HUGE = st.integers(min_value=2**64).map(str)
NOT_A_NUMBER = st.sampled_from(["abc", "1.5.2", "", "0x", "--", "1e999999", "١"])
BAD_INT = st.one_of(NEGATIVE, HUGE, NOT_A_NUMBER)
BAD_PORT = st.one_of(st.integers(min_value=65536).map(str), NEGATIVE, NOT_A_NUMBER)
BAD_PROBABILITY = st.one_of(st.floats(min_value=1.0001, allow_infinity=False).map(str),
                            st.floats(max_value=-0.0001, allow_infinity=False).map(str),
                            st.just("nan"), NOT_A_NUMBER)
BAD_TEMPERATURE = st.one_of(st.floats(max_value=-1e-9).map(str), st.just("nan"), NOT_A_NUMBER)
COMMANDS = [["generate"], ["model", "init"], ["model", "info"], ["convert", "from-hf"],
            ["convert", "to-hf"], ["convert", "from-torch"], ["export"], ["pretrain"], ["finetune"], ["data", "prepare"],
            ["tokenizer", "train"], ["memory", "stats"], ["memory", "prune"], ["memory", "add"],
            ["serve"], ["learn"], ["forgetting"], ["plot"], ["chat"], ["finetune-chat"]]


@st.composite
def bad_command(draw, root: Path) -> list[str]:
    ck, run, afile = str(root / "ck"), str(root / "run"), str(root / "afile.txt")
    missing = str(root / "missing") + "-" + draw(TEXT)
    good_place = draw(st.sampled_from([ck, run, afile, str(root / "ck" / "adapters")]))
    kind = draw(st.integers(0, 14))
    if kind == 0:
        # (A huge count is fine: generation ends at the context or a stop.)
        return ["generate", ck, "-p", "a", "--max-new-tokens",
                draw(st.one_of(NEGATIVE, NOT_A_NUMBER))]
    if kind == 1:
        return ["generate", ck, "-p", "a", draw(st.sampled_from(["--temperature", "--top-p"])),
                draw(BAD_TEMPERATURE)]
    if kind == 2:
        return ["generate", ck, "-p", "a", "--top-p", draw(BAD_PROBABILITY)]
    if kind == 3:
        return [draw(st.sampled_from(["generate", "chat"])), missing]
    if kind == 4:
        return ["model", "init", draw(st.sampled_from(["tiny-gpt2", "tiny-llama"])), "--out",
                good_place]
    if kind == 5:
        return ["convert", draw(st.sampled_from(["from-hf", "to-hf", "from-torch"])),
                draw(st.sampled_from([missing, ck, afile])), "--out", good_place]
    if kind == 6:
        out = draw(st.sampled_from(["/proc/x.onnx", f"{afile}/x.gguf", missing + "/\x01.gguf"]))
        fmt = draw(st.sampled_from(["onnx", "gguf", "hf", draw(WORD)]))
        return ["export", ck, "--format", fmt, "--out", out]
    if kind == 7:
        override = draw(st.one_of(
            st.sampled_from(["max_steps=-1", "lr='x'", "batch_size=0", "block_size=99999",
                             "max_steps", "=1", "dtype='fp8'", "seed=1.5"]),
            WORD.map(lambda k: f"zz_{k}=1"), TEXT.filter(lambda t: "=" not in t)))
        return ["pretrain", str(root / "run.toml"), "--set", override]
    if kind == 8:
        return ["pretrain", draw(st.sampled_from([str(root), afile, missing, run]))]
    if kind == 9:
        which = draw(st.sampled_from(["data", "tokenizer"]))
        extra = ["--tokenizer", "bytes"] if which == "data" else []
        return [which, "prepare" if which == "data" else "train", afile, *extra, "--out",
                good_place if good_place != afile else ck]
    if kind == 10:
        memory = str(root / draw(st.sampled_from(
            ["memory-bad", "memory-empty", "memory-noitems", "afile.txt", "ck"])))
        return ["memory", draw(st.sampled_from(["stats", "prune"])), memory,
                *(["--max-items", "1"] if draw(st.booleans()) else [])]
    if kind == 11:
        return ["serve", ck, "--port", draw(BAD_PORT)]
    if kind == 12:
        return ["learn", "--checkpoint", ck, "--domain", "bad/" + draw(WORD), "--data", afile,
                "--update-steps", "1"]
    if kind == 13:
        return ["learn", "--checkpoint", ck, "--domain", "d", "--data", afile,
                "--update-steps", draw(st.one_of(st.just("0"), BAD_INT))]
    return [*draw(st.sampled_from(COMMANDS)), f"--zz-{draw(WORD)}"]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_arguments_are_one_error_line_and_change_nothing(good, data):
    before = snapshot(good)
    argv = data.draw(bad_command(good), label="argv")
    code, stdout, stderr = invoke(argv)
    assert code != 0, (argv, stdout, stderr)
    lines = [line for line in stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, stderr)
    assert "Traceback" not in stderr
    assert snapshot(good) == before, argv
