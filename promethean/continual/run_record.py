"""A continual-learning run on disk, as `continual.learn` keeps it: the run record
(`continual.json`), each domain's prepared data, publishing a committed stage's adapter, and the
exact per-domain evaluation every stage records (the module docstring of `continual.learn` says
what a run holds and how a stage commits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from promethean.errors import PrometheanError
from promethean.files import atomic_directory, atomic_file, link_tree

RUN_FILE = "continual.json"
RUN_FORMAT = "promethean-continual-run"
RUN_VERSION = 1
METRICS_FILE = "metrics.jsonl"
STAGES_DIR = "stages"  # RUN/stages/NN-DOMAIN: each stage's adapter, or its full checkpoint
DEFAULT_VAL_FRACTION = 0.02


def _write_json(path: Path, record: dict) -> None:
    """A JSON file replaced atomically (temp file in the same folder, fsync, rename)."""
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")


def read_run(run: str | Path) -> dict[str, Any]:
    from promethean.checkpoint import read_versioned_record

    run = Path(run)
    path = run / RUN_FILE
    if not path.is_file():
        raise PrometheanError(f"{run} is not a continual-learning run: {RUN_FILE} is missing.")
    return read_versioned_record(path, RUN_FORMAT, RUN_VERSION, "continual-learning run")


def _default_run(checkpoint: Path) -> Path:
    from promethean.checkpoint import read_checkpoint_record

    _, metadata = read_checkpoint_record(checkpoint)
    if isinstance(metadata.get("continual_run"), str):
        return Path(metadata["continual_run"])
    return checkpoint / "continual"


# ------------------------------------------------------------------------------------- data


def domain_data(spec: str, domain: str, tokenizer, run: Path, staging: Path | None,
                val_fraction: float):
    """The prepared directory for `spec`: used as is when it holds meta.json, else the corpus
    is prepared into RUN/data/DOMAIN with the model's tokenizer (reused when already there).
    During a stage, that preparation happens in the run's staging copy (`staging`)."""
    from promethean.data.batches import TokenDataset
    from promethean.data.corpora import open_corpus
    from promethean.data.prepare import META_FILE, prepare

    if (Path(spec) / META_FILE).is_file():
        return TokenDataset(spec, tokenizer)
    corpus = open_corpus(spec)
    out = (staging or run) / "data" / domain
    if staging is not None and (run / "data" / domain).is_dir() and not out.exists():
        link_tree(run / "data" / domain, out)  # prepare sees it and skips work already done
    prepare(corpus.documents(), tokenizer, out, source_name=corpus.name,
            source_sha256=corpus.fingerprint(), workers=1, val_fraction=val_fraction,
            overwrite=True, progress=False)
    return TokenDataset(out, tokenizer)


def publish_adapter(stage_adapter: Path, published: Path) -> None:
    """Copy a committed stage's adapter to CHECKPOINT/adapters/NAME (where generate, chat and
    serve find it by name), atomically; a no-op when that copy is already the same."""
    from promethean.continual.adapters import ADAPTER_CONFIG_FILE, ADAPTER_FILE
    from promethean.files import file_sha256

    names = (ADAPTER_FILE, ADAPTER_CONFIG_FILE)
    if all((published / n).is_file() and file_sha256(published / n) == file_sha256(
            stage_adapter / n) for n in names):
        return
    with atomic_directory(published) as scratch:
        for entry in stage_adapter.iterdir():
            if entry.is_file():
                shutil.copy2(entry, scratch / entry.name)


def evaluate_domains(model, datasets: dict, batch_size: int, block_size: int, device,
                     eval_batches: int | None) -> dict[str, dict[str, float]]:
    """Exact mean validation loss and perplexity of `model` on each domain."""
    import itertools

    from promethean.data.batches import exact_loss, perplexity

    results = {}
    for name, dataset in datasets.items():
        batches = dataset.iter_eval_batches("val", batch_size, block_size, device)
        if eval_batches is not None:
            batches = itertools.islice(batches, eval_batches)
        loss = exact_loss(model, batches).mean
        results[name] = {"loss": loss, "perplexity": perplexity(loss)}
    return results


def _evaluate_own_adapters(stages: list[dict], datasets: dict, domain: str, stage_index: int,
                           adapters, evaluate_now, evaluate_with_stage_adapter):
    """Every known domain on the base + its own adapter: the one being trained for `domain`,
    the latest earlier stage's that learned it for any other, none (the plain base) when no
    stage did. Returns the losses and, per domain, the stage whose adapter served it (0: base)."""
    serving = {name: 0 for name in datasets}
    by_stage = {}
    for stage in stages:
        if stage.get("domain") in serving and stage.get("adapter"):
            serving[stage["domain"]] = stage["stage"]
            by_stage[stage["stage"]] = stage
    serving[domain] = stage_index
    results = {}
    for stage in sorted(set(serving.values())):
        names = [name for name, served_by in serving.items() if served_by == stage]
        if stage == stage_index:
            results.update(evaluate_now(names))  # the new adapter is the active one
        elif stage == 0:
            with adapters.disabled():
                results.update(evaluate_now(names))
        else:
            results.update(evaluate_with_stage_adapter(by_stage[stage], names))
    return {name: results[name] for name in datasets}, serving
