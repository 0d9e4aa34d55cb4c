"""Pre-training and full fine-tuning: `train(config) -> TrainResult`.

The steps are `train.loop.run_loop`'s, as every training's are; this module supplies what is
the trainer's own: its data, model loading, distributed wrapping, checkpoints and resume. One
optimizer step is `grad_accum` micro-batches from a `WindowSampler` (each loss divided by
`grad_accum`), under autocast for bf16/fp16 (a GradScaler for fp16), gradients clipped, the
learning rate set from `schedule.lr_at(step)` (warmup, then `config.schedule`). The run lasts
`max_steps` optimizer steps, or `max_epochs` epochs (`steps_for_epochs`), and `dropout`, when set,
replaces the model's own. Around it:

- evaluation every `eval_interval` steps and at the end (exact loss, perplexity, bits per byte),
  each one also a console line on stderr (`evaluation_line`), printed through the progress bar's
  console when it is on so the bar stays whole;
  `out/best` is rewritten whenever the validation loss improves by more than `min_delta`, and
  `early_stopping_patience` evaluations without such an improvement end the run;
- checkpoints `out/step-XXXXXX` every `checkpoint_interval` steps and at the end, the last
  `keep_last` of this run's lineage kept; each carries the training state, so
  `train(config, resume=dir)` continues exactly where the run was (same batches, same RNG, same
  optimizer moments, same schedule);
- the run directory is claimed before anything is loaded (`claim_run_directory`): a fresh run
  into a directory that holds another run's checkpoints or metrics is refused unless
  `overwrite`, and so is a resume from an older step into a run with newer checkpoints (resume
  into another `out` to branch); a resume drops the metrics lines after the resumed step, so
  `metrics.jsonl` reads as one run;
- a non-finite loss or gradient skips the optimizer step (counted as `skipped_steps`);
  `max_nonfinite_in_a_row` of them in a row stop the run with a sentence;
- SIGINT/SIGTERM set a flag: the loop saves a checkpoint at the next step boundary and returns
  (`TrainResult.signal` says which; the CLI then exits 130 or 143);
- `max_minutes`, a wall-time budget counting every leg of a resumed run (`Progress.elapsed`):
  once spent, the step that spent it is evaluated and saved and the run stops ("max_minutes");
- metrics as JSON lines in `out/metrics.jsonl`, and a rich progress bar on stderr.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from promethean.errors import CheckpointError, PrometheanError
from promethean.files import remove_tree
from promethean.train import distributed
from promethean.train.config import TrainConfig
from promethean.train.loop import LoopHooks, LoopPlan, TrainedStep, json_safe, run_loop
from promethean.train.memory import get_memory_stats, release_free_memory
from promethean.train.optim import build_optimizer
from promethean.train.run_directory import (
    BEST_DIR,
    METRICS_FILE,
    RunClaim,
    apply_claim,
    claim_run_directory,
    resolve_resume,
    run_lineage,
    step_dir_name,
    step_directories,
)
from promethean.train.schedule import lr_at
from promethean.train.state import Progress, load_training_state, save_training_checkpoint


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in all (resumed legs included)
    tokens: int
    # "max_steps", "early_stopping", "interrupted", "until_step" or "max_minutes"
    stopped: str
    final_checkpoint: Path
    best_checkpoint: Path | None
    best_val_loss: float | None
    skipped_steps: int
    # (step, train loss) of every step this call ran; nan for skipped steps.
    losses: list[tuple[int, float]] = field(default_factory=list)
    signal: str | None = None  # "SIGINT" or "SIGTERM" when stopped == "interrupted"


def steps_for_epochs(max_epochs: float, train_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps in `max_epochs` epochs: ceil(max_epochs x train_tokens / tokens_per_step).

    An epoch is as many training tokens as the train split holds. The sampler draws windows at
    random (with replacement, `WindowSampler`), so an epoch sees each token once on average, not
    each window exactly once; counting tokens keeps an epoch the same length whatever the batch
    shape. `max_epochs` is read as the decimal it was written as (0.1 is 1/10, not the float).
    """
    exact = Fraction(repr(float(max_epochs))) * train_tokens / tokens_per_step
    return max(1, math.ceil(exact))


# ---------------------------------------------------------------------------------- setup


def _load_model(source: str, device: torch.device, seed: int, model_overrides=None):
    """(model, tokenizer, origin) from a checkpoint directory or a preset (random weights), with
    the run's `model_overrides` applied."""
    from promethean.checkpoint import apply_model_overrides, load_checkpoint, resolve_model_source
    from promethean.model import Transformer
    from promethean.tokenizer import get_tokenizer

    resolved = resolve_model_source(source)
    if resolved.checkpoint is not None:
        checkpoint = load_checkpoint(resolved.checkpoint, device=device,
                                     model_overrides=model_overrides)
        return checkpoint.model, checkpoint.tokenizer, {"checkpoint": str(source)}
    preset = resolved.preset
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(apply_model_overrides(preset.model, model_overrides))
    return model, get_tokenizer(preset.tokenizer), {"preset": preset.name}


# ------------------------------------------------------------------------------ pre-flight


def preflight(config: TrainConfig, resume: str | Path | None = None,
              overwrite: bool = False) -> RunClaim:
    """Refuse a run that cannot work, with one sentence, before any weight is loaded or step run;
    returns the run's claim on its `out` (`claim_run_directory`).

    Reads only small files (the model's config, the data's meta.json, the resume checkpoint's
    config.json and train_state.json): a data tokenizer larger than the model's vocabulary, data
    prepared with another tokenizer than the checkpoint being fine-tuned, a resume checkpoint from
    a different model or batch shape, and an `out` that holds another run or newer checkpoints.
    (Unreadable checkpoint files are refused where they are read.)
    """
    from promethean.checkpoint import read_checkpoint_record
    from promethean.data.prepare import read_meta, tokenizer_record
    from promethean.tokenizer import resolve_tokenizer
    from promethean.train.memory import run_model_config

    model_config = run_model_config(config)
    prepared = read_meta(config.data)["tokenizer"]
    if prepared["vocab_size"] > model_config.vocab_size:
        raise PrometheanError(
            f"{config.data} was prepared with a {prepared['kind']} tokenizer of "
            f"{prepared['vocab_size']:,} ids but the model's vocabulary is only "
            f"{model_config.vocab_size:,}; prepare the data with the model's tokenizer or give the "
            "model a larger vocab_size."
        )
    if Path(config.model).is_dir():
        own = tokenizer_record(resolve_tokenizer(config.model))
        if own["fingerprint"] != prepared["fingerprint"]:
            raise PrometheanError(
                f"{config.data} was prepared with a {prepared['kind']} tokenizer (fingerprint "
                f"{prepared['fingerprint'][:12]}) but the checkpoint {config.model} uses a "
                f"{own['kind']} tokenizer (fingerprint {own['fingerprint'][:12]}); prepare the data "
                f"with --tokenizer {config.model}."
            )
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PrometheanError(f"out {out} is a file; it names the run directory to write.")
    if resume is None:
        return claim_run_directory(out, None, None, None, overwrite)
    saved_model, metadata = read_checkpoint_record(resume)
    # Dropout is a training setting (TrainConfig.dropout), not a different model.
    ignored = {"name", "dropout"}
    here, there = model_config.model_dump(exclude=ignored), saved_model.model_dump(exclude=ignored)
    differing = [key for key in here if here[key] != there.get(key)]
    if differing:
        key = differing[0]
        raise PrometheanError(
            f"{resume} was trained with a different model than {config.model} ({key} is "
            f"{there.get(key)!r} there, {here[key]!r} here); resume with the config that started it."
        )
    saved = metadata.get("train_config")
    if not isinstance(saved, dict):
        return _resume_claim(out, Path(resume), overwrite)
    # What an exact resume needs is the same micro-batches per optimizer step across the whole
    # job: grad_accum x world size, so a run may resume on a different number of processes.
    world_size_here = int(os.environ.get("WORLD_SIZE", "1"))
    saved_accum = saved.get("grad_accum")
    shape_here = {
        "batch_size": config.batch_size,
        "grad_accum x processes": config.grad_accum * world_size_here,
        "block_size": config.block_size or model_config.context_length,
    }
    shape_there = {
        "batch_size": saved.get("batch_size"),
        "grad_accum x processes": (
            None if saved_accum is None else saved_accum * int(metadata.get("world_size", 1))
        ),
        "block_size": saved.get("block_size") or saved_model.context_length,
    }
    for key, value in shape_here.items():
        if shape_there[key] is not None and shape_there[key] != value:
            raise PrometheanError(
                f"{resume} was trained with {key} {shape_there[key]} but this run asks for "
                f"{value}; an exact resume needs the same batch_size, grad_accum x processes "
                "and block_size."
            )
    return _resume_claim(out, Path(resume), overwrite)


def _resume_claim(out: Path, resume: Path, overwrite: bool) -> RunClaim:
    from promethean.train.state import load_training_state

    progress = load_training_state(resume).progress
    return claim_run_directory(out, resume, progress.step, progress.run_id, overwrite)


# ----------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    resume: str | Path | None = None,
    *,
    until_step: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train as `config` says; with `resume`, continue exactly from that training checkpoint
    (or the newest step checkpoint of a run directory).

    `until_step` stops after that step as an interruption would (checkpoint saved), without
    changing the schedule, which still runs to `max_steps` (or the steps of `max_epochs`).
    `overwrite` lets the run replace another run's checkpoints and metrics in `config.out` (see
    `claim_run_directory`).

    Under `torchrun` (WORLD_SIZE > 1) every rank runs this same function on its share of the
    batches, with the model in DDP (or FSDP, `config.distributed`); rank 0 alone writes. See
    `promethean.train.distributed` for how that run relates to a one-process one.
    """
    resume = resolve_resume(resume)
    claim = preflight(config, resume, overwrite)  # one sentence before anything is loaded
    from promethean.device import resolve_device

    with distributed.session(resolve_device(config.device)) as dist_context:
        return _train(config, resume, until_step=until_step, dist_context=dist_context,
                      claim=claim)


def _train(
    config: TrainConfig,
    resume: str | Path | None,
    *,
    until_step: int | None,
    dist_context: distributed.DistributedContext,
    claim: RunClaim,
) -> TrainResult:
    """`train` inside its distributed session (a one-process context when not distributed)."""
    from promethean.data.batches import (
        TokenDataset,
        WindowSampler,
        bits_per_byte,
        exact_loss,
        perplexity,
    )
    from promethean.device import resolve_device, resolve_dtype

    device = dist_context.device if dist_context.enabled else resolve_device(config.device)
    is_main = dist_context.is_main
    amp_dtype = resolve_dtype(config.dtype, device)
    out = Path(config.out)

    state = None
    if resume is not None:
        state = load_training_state(resume)  # checked before the model is loaded
        spent = state.progress.elapsed / 60
        if config.max_minutes is not None and spent >= config.max_minutes:
            raise PrometheanError(
                f"{resume} has already trained for {spent:.1f} minutes, which spends the "
                f"max_minutes budget of {config.max_minutes:g} (it counts every leg of a run); "
                "raise max_minutes (--max-minutes) to continue it."
            )
        model, tokenizer, origin = _load_model(str(resume), device, config.seed,
                                               config.model_overrides)
        origin = {"resumed_from": str(resume)}
    else:
        model, tokenizer, origin = _load_model(config.model, device, config.seed,
                                               config.model_overrides)
    if config.dropout is not None:
        model.set_dropout(config.dropout)
    model.train()
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise PrometheanError("this model does not support gradient checkpointing.")
        model.gradient_checkpointing = True

    block_size = config.block_size or model.config.context_length
    if block_size > model.config.context_length:
        raise PrometheanError(
            f"block_size ({block_size}) is longer than the model's context "
            f"({model.config.context_length})."
        )
    dataset = TokenDataset(config.data, tokenizer)
    if dataset.vocab_size > model.config.vocab_size:
        raise PrometheanError(
            f"{config.data} has {dataset.vocab_size} token ids but the model's vocabulary is only "
            f"{model.config.vocab_size}."
        )
    val_meta = dataset.split_meta("val")
    if val_meta["tokens"] == 0:
        raise PrometheanError(
            f"the 'val' split of {config.data} is empty; training needs one to evaluate on."
        )
    if dist_context.enabled:
        # Rank r draws global micro-batches r, r + W, ...: see promethean.train.distributed.
        sampler = distributed.ShardedWindowSampler(
            dataset, config.batch_size, block_size, "train", seed=config.seed,
            rank=dist_context.rank, world_size=dist_context.world_size, device=device,
        )
    else:
        sampler = WindowSampler(
            dataset, config.batch_size, block_size, "train", seed=config.seed, device=device
        )
    # DDP wraps the model; FSDP shards it in place (so before the optimizer sees its parameters).
    train_model = distributed.wrap_model(model, config.distributed, dist_context)

    optimizer = build_optimizer(
        model, config.lr, config.weight_decay, (config.beta1, config.beta2), config.optimizer_moments
    )
    use_scaler = amp_dtype is torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
    progress = Progress(run_id=claim.run_id)
    if state is not None:
        # How the update runs (fused kernel, foreach) belongs to this machine, not the saved one.
        runtime = [
            {key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
            for group in optimizer.param_groups
        ]
        try:
            optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(
                f"the optimizer state in {resume} does not fit this model ({error})."
            ) from None
        for group, flags in zip(optimizer.param_groups, runtime, strict=True):
            group.update(flags)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        sampler.load_state_dict(state.progress.sampler)
        progress = state.progress
        progress.run_id = claim.run_id
        state.restore_rng()

    forward_model = torch.compile(train_model) if config.compile else train_model
    # Every rank evaluates the whole split itself (DDP: on the plain model, no collectives).
    eval_model = model if dist_context.enabled else forward_model
    autocast = (
        # With checkpointing, autocast's cache of low-precision weight copies would hold every
        # layer's copy until the forward ends (250 MB at GPT-2 size) though the backward recasts
        # them anyway; without it, each copy lives only while its layer runs.
        (lambda: torch.autocast(
            device.type, dtype=amp_dtype, cache_enabled=not config.gradient_checkpointing
        ))
        if amp_dtype is not torch.float32
        else contextlib.nullcontext
    )
    tokens_per_step = config.batch_size * config.grad_accum * block_size * dist_context.world_size
    max_steps = config.max_steps
    if config.max_epochs is not None:
        max_steps = steps_for_epochs(
            config.max_epochs, dataset.num_tokens("train"), tokens_per_step
        )
    metadata = {
        **origin,
        # max_steps as this run has it (derived from max_epochs when that is set).
        "train_config": {**config.model_dump(mode="json"), "max_steps": max_steps},
        "world_size": dist_context.world_size,
    }
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        apply_claim(out, claim)
    distributed.barrier()
    metrics_path = out / METRICS_FILE

    def evaluate_val() -> dict[str, float]:
        batches = dataset.iter_eval_batches("val", config.batch_size, block_size, device)
        if config.eval_batches is not None:
            batches = itertools.islice(batches, config.eval_batches)
        with autocast():
            total = exact_loss(eval_model, batches)
        mean = distributed.broadcast_float(total.mean)  # identical everywhere; rank 0's decides
        return {
            "val_loss": mean,
            "val_perplexity": perplexity(mean),
            "val_bits_per_byte": bits_per_byte(mean, val_meta),
        }

    def save(directory: Path) -> Path:
        progress.sampler = sampler.state_dict()
        if dist_context.enabled:
            # Rank 0 writes the plain model's state (so load_checkpoint reads it); others wait.
            save_model, save_optimizer = distributed.full_state(model, optimizer, config)
            if is_main:
                save_training_checkpoint(
                    directory, save_model, tokenizer, save_optimizer, scaler, progress, metadata
                )
            distributed.barrier()
            return directory
        return save_training_checkpoint(
            directory, model, tokenizer, optimizer, scaler, progress, metadata
        )

    def save_step_checkpoint() -> Path:
        path = save(out / step_dir_name(progress.step))
        # Only this run's lineage is pruned: another run's checkpoints are never ours to delete.
        mine = [p for p in step_directories(out).values() if run_lineage(p) == progress.run_id]
        for old in mine[: -config.keep_last] if is_main else ():
            remove_tree(old)
        return path

    parameters = [p for p in model.parameters() if p.requires_grad]

    def train_step(step: int) -> TrainedStep:
        step_loss = 0.0
        for micro_step in range(config.grad_accum):
            inputs, targets = sampler.next_batch()
            # Gradients are all-reduced only on the last micro-step (DDP no_sync before it).
            with distributed.gradient_sync(train_model, micro_step == config.grad_accum - 1):
                with autocast():
                    _, loss = forward_model(inputs, targets, return_logits=False)
                loss = loss / config.grad_accum
                step_loss += float(loss.detach())
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            if config.gradient_checkpointing and device.type == "cpu":
                release_free_memory()  # the next forward's peak starts lower
        # The mean over ranks: every rank decides the same about a non-finite step.
        return TrainedStep(distributed.all_reduce_mean(step_loss), tokens_per_step)

    def record_fields() -> dict[str, Any]:
        # SSM layers: the fraction of state updates that fired (the last micro-batch).
        fields: dict[str, Any] = {f"spike_rate/layer{layer}": rate
                                  for layer, rate in model.spike_rates().items()}
        fields["memory"] = get_memory_stats(device)
        return fields

    with (open(metrics_path, "a") if is_main else contextlib.nullcontext()) as metrics:

        def write_metrics(record: dict[str, Any]) -> None:
            metrics.write(json.dumps(json_safe(record)) + "\n")
            metrics.flush()

        plan = LoopPlan(
            description="train", optimizer=optimizer, parameters=parameters,
            max_steps=max_steps,
            learning_rate=lambda step: lr_at(step, config.lr, config.min_lr, config.warmup_steps,
                                             max_steps, config.schedule),
            grad_clip=config.grad_clip, max_nonfinite_in_a_row=config.max_nonfinite_in_a_row,
            runaway_advice="lower the learning rate, use bf16 or fp32, or resume from the last "
                           f"good checkpoint in {out}.",
            until_step=until_step, log_every=config.log_interval,
            eval_every=config.eval_interval, patience=config.early_stopping_patience,
            min_delta=config.early_stopping_min_delta,
            checkpoint_every=config.checkpoint_interval, max_minutes=config.max_minutes,
            show_progress=config.progress, metrics=write_metrics, scaler=scaler,
            as_float=distributed.as_float, agree=distributed.any_rank, is_main=is_main,
        )
        hooks = LoopHooks(train_step, evaluate=evaluate_val,
                          keep_best=lambda progress: save(out / BEST_DIR),
                          save_progress=lambda progress: save_step_checkpoint(),
                          record_fields=record_fields)
        outcome = run_loop(plan, hooks, progress)
    final_checkpoint = save_step_checkpoint()

    best_dir = out / BEST_DIR
    return TrainResult(
        steps=progress.step,
        tokens=progress.tokens,
        stopped=outcome.stopped,
        final_checkpoint=final_checkpoint,
        best_checkpoint=best_dir if best_dir.is_dir() else None,
        best_val_loss=progress.best_val_loss,
        skipped_steps=progress.skipped_steps,
        losses=outcome.losses,
        signal=outcome.signal,
    )
