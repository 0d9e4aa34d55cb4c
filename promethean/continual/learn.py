"""`promethean learn`: one continual-learning stage, and the run record that tracks them all.

A continual run is a directory (`--run`) holding `continual.json`: the base checkpoint (and its
sha256), the method (LoRA or full fine-tuning), every known domain with its prepared data, and
one entry per stage with every known domain's exact validation loss after it. Stage 0 is the
base model itself. A stage:

1. opens the domain's data: a prepared directory, or a corpus (named or local) that is
   prepared into `RUN/data/DOMAIN` with the checkpoint's tokenizer;
2. builds the model to learn on: the base with a LoRA adapter (started from the previous stage's
   adapter, so each stage's adapter is the whole model as it stands after that stage), or, with
   `from_base`, a fresh adapter on the base (B = 0, independent of every earlier stage: an adapter
   per domain, loaded by its name), or, with `full`, the previous stage's full checkpoint with
   every weight trainable. A from-base stage's row of the matrix is what a user of per-domain
   adapters gets: each known domain evaluated on the base plus the adapter of the latest stage
   that learned it (the new one for the new domain), and on the plain base when no stage learned
   it (the base domain); `evaluated_with` records which stage's adapter served each domain.
   Every stage records `from_base` (a run may mix both kinds); EWC, which anchors to the previous
   stage's weights, and full fine-tuning, which has no adapter, are refused with it;
3. with replay, puts windows of every earlier domain into the on-disk buffer `RUN/replay`
   (reservoir, per-domain quota) and mixes them into the new domain's batches at `replay_ratio`;
   with EWC, estimates the Fisher of every earlier domain not yet consolidated (online EWC state
   in `RUN/ewc`) and adds the penalty to the loss;
4. trains `update_steps` AdamW steps (warmup + cosine, clipping), then evaluates every known
   domain (on the stage's model, or, from base, as step 2 says), writes the stage's adapter (or
   its full checkpoint) to `RUN/stages/NN-DOMAIN`, consolidates EWC on the new domain, adds it
   to the replay buffer, and appends the stage to `continual.json`;
5. commits: all of the above was written into a staging copy of the run directory (what the
   stage does not rewrite is carried over by hard links), which then takes the run's place in
   one atomic switch. Only after that is a LoRA stage's adapter published to
   `CHECKPOINT/adapters/NAME`, where generate, chat and serve find it by name (a crash between
   the two is repaired by the next stage, which publishes the last committed adapter first).

The stage's steps are `train.loop.run_loop`'s, as the trainer's and chat tuning's are (the
schedule, clipping, the non-finite skip and stop, metrics records, `max_minutes` counting every
leg); what is the stage's own is its data (replay mixed in), the EWC penalty, and what it saves:
only the trained parameters, never a model checkpoint, so not the trainer's checkpoints. A stage
is all-or-nothing: a failed or interrupted stage leaves the run exactly as it was (its staging
copy is removed by the next write). Every `checkpoint_every` steps, and on SIGINT/SIGTERM (then
it exits 130/143), the stage's training state is saved to `RUN/stage-in-progress`
(`train.state.save_partial_state`); the same command run again continues from there and ends
exactly as an uninterrupted stage would.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from promethean.continual.adapters import (
    DEFAULT_TARGETS,
    AdapterError,
    Adapters,
    LoraConfig,
    adapter_directory,
    check_name,
    checkpoint_sha256,
)
from promethean.errors import PrometheanError, TrainingInterrupted
from promethean.files import atomic_directory, link_tree

from promethean.continual.run_record import (
    DEFAULT_VAL_FRACTION,
    METRICS_FILE,
    RUN_FILE,
    RUN_FORMAT,
    RUN_VERSION,
    STAGES_DIR,
    _default_run,
    _evaluate_own_adapters,
    _write_json,
    domain_data,
    evaluate_domains,
    publish_adapter,
    read_run,
)


@dataclass(frozen=True)
class LearnOptions:
    checkpoint: str  # the base model (LoRA), or the model to continue from (full)
    domain: str
    data: str  # prepared directory, named corpus, or local file/folder/glob
    update_steps: int
    run: str | None = None  # default: the run the checkpoint came from, else CHECKPOINT/continual
    full: bool = False  # full fine-tuning instead of LoRA
    from_base: bool = False  # a fresh adapter on the base, not a continuation of the previous one
    adapter_name: str | None = None  # default: the domain
    lora_rank: int = 8
    lora_alpha: float | None = None  # default: 2 x rank
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_ewc: bool = False
    ewc_lambda: float = 0.15  # the experiment's 1e4 on the old mean-loss Fisher, rescaled by 1/256^2
    ewc_gamma: float = 1.0
    fisher_samples: int = 64
    replay: float = 0.0  # share of each batch's rows taken from the replay buffer
    replay_quota: int = 512  # windows kept per domain
    base_domain: tuple[str, str] | None = None  # (name, data) the base model was trained on
    batch_size: int = 8
    block_size: int = 256
    lr: float | None = None  # default: 2e-3 for LoRA, 3e-4 for full fine-tuning
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 10% of the steps
    weight_decay: float | None = None  # default: 0 for LoRA, 0.1 for full
    grad_clip: float = 1.0
    seed: int = 0
    eval_batches: int | None = None  # None: each domain's whole validation split
    val_fraction: float = DEFAULT_VAL_FRACTION
    device: str | None = None
    progress: bool = True
    # A wall-time budget for the stage's training: when spent, it stops there, then evaluates
    # and commits as at the end (the stage records stopped "max_minutes" and its steps).
    max_minutes: float | None = None
    # Every this many steps the stage's training state is saved to RUN/stage-in-progress, so
    # that the same command run again after a crash or Ctrl-C continues from there (None: never).
    checkpoint_every: int | None = 50


@dataclass
class StageResult:
    stage: int
    domain: str
    output: Path  # the adapter directory, or the full checkpoint
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    trainable_parameters: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- records


STAGE_PROGRESS_DIR = "stage-in-progress"
# What may differ between an interrupted stage and the command that continues it.
_RESUMABLE_DIFFERENCES = ("progress", "device", "max_minutes", "checkpoint_every")


def _stage_fingerprint(options: LearnOptions, stage_index: int) -> str:
    kept = {k: v for k, v in asdict(options).items() if k not in _RESUMABLE_DIFFERENCES}
    return json.dumps({"stage": stage_index, **kept}, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------ learn


def _check(options: LearnOptions) -> None:
    check_name(options.domain, "domain")
    if options.adapter_name is not None:
        check_name(options.adapter_name)
    if options.update_steps < 1:
        raise PrometheanError(f"--update-steps must be at least 1, got {options.update_steps}.")
    if not 0 <= options.replay < 1:
        raise PrometheanError(f"--replay must lie in [0, 1), got {options.replay}.")
    if options.batch_size < 1 or options.block_size < 1:
        raise PrometheanError("batch size and block size must be at least 1.")
    if options.fisher_samples < 1:
        raise PrometheanError(f"--fisher-samples must be at least 1, got {options.fisher_samples}.")
    from promethean.train.loop import check_max_minutes

    check_max_minutes(options.max_minutes)
    if options.checkpoint_every is not None and options.checkpoint_every < 1:
        raise PrometheanError(
            f"--checkpoint-every must be at least 1, got {options.checkpoint_every}.")
    if options.from_base and options.full:
        raise PrometheanError("--from-base cannot be used with --full: it starts a fresh LoRA "
                              "adapter on the base, and full fine-tuning has no adapter.")
    if options.from_base and options.use_ewc:
        raise PrometheanError(
            "--from-base cannot be used with --use-ewc: an independent adapter has no earlier "
            "stage to stay close to, and EWC anchors to the previous stage's weights."
        )
    if options.base_domain is not None:
        check_name(options.base_domain[0], "domain")
        if options.base_domain[0] == options.domain:
            raise PrometheanError(
                f"the base domain and the new domain are both '{options.domain}'; the base "
                "domain is the one the checkpoint was trained on before this run."
            )
    if not options.full:
        # Refuse a bad rank before anything is loaded.
        LoraConfig.for_rank(options.lora_rank, options.lora_alpha,
                            dropout=options.lora_dropout, target_modules=options.target_modules)


def learn(options: LearnOptions) -> StageResult:
    """Run one stage as `options` says (see the module docstring); returns what it produced."""
    from promethean.checkpoint import load_checkpoint, read_checkpoint_record, save_checkpoint
    from promethean.continual.ewc import EWC, estimate_fisher
    from promethean.continual.replay import ReplayBuffer, ReplayMixer
    from promethean.data.batches import WindowSampler
    from promethean.device import resolve_device
    from promethean.train.state import read_partial_state

    started = time.perf_counter()
    _check(options)
    checkpoint = Path(options.checkpoint)
    model_config, _ = read_checkpoint_record(checkpoint)  # a sentence if it is not one
    if options.block_size > model_config.context_length:
        raise PrometheanError(
            f"block size {options.block_size} is longer than the model's context "
            f"({model_config.context_length})."
        )
    run = Path(options.run) if options.run else _default_run(checkpoint)
    method = "full" if options.full else "lora"
    device = resolve_device(options.device)
    base_hash = checkpoint_sha256(checkpoint)  # read once: the run's base, or the adapted one
    record = _open_run_record(run, options, method, checkpoint, base_hash)
    is_new_domain = options.domain not in record["domains"]
    stage_index = len(record["stages"]) or 1  # stage 0 is the base model, written below
    previous = record["stages"][-1] if record["stages"] else None
    if previous is not None and previous.get("published"):
        # A crash after the last stage committed but before its adapter was published.
        publish_adapter(Path(previous["adapter"]), Path(previous["published"]))

    model, tokenizer, adapters, trainable, name = _model_to_learn_on(
        options, record, previous, checkpoint, base_hash, run, stage_index, device)

    # ---- everything the stage writes goes into a staging copy of the run, switched into place
    # in one step at the end (atomic_directory; entries it does not rewrite are carried over by
    # hard links): a stage that fails or is killed leaves the run exactly as it was.
    fingerprint = _stage_fingerprint(options, stage_index)
    resumed = read_partial_state(run / STAGE_PROGRESS_DIR, fingerprint)
    with atomic_directory(run, carry_over=True, never_carry=(STAGE_PROGRESS_DIR,)) as staging:

        def final_path(path: Path) -> Path:
            """Where a path inside the staging copy will be once the stage commits."""
            path = Path(path)
            return run / path.relative_to(staging) if path.is_relative_to(staging) else path

        def staged_copy(entry: str) -> Path:
            """`staging/entry`, starting as (links to) the run's current `entry`."""
            target = staging / entry
            if (run / entry).is_dir() and not target.exists():
                link_tree(run / entry, target)
            return target

        # ---- data for every known domain
        datasets = {}
        for known, entry in record["domains"].items():
            if known != options.domain:
                datasets[known] = domain_data(entry["data"], known, tokenizer, run, staging,
                                              options.val_fraction)
        new_dataset = domain_data(options.data, options.domain, tokenizer, run, staging,
                                  options.val_fraction)
        datasets[options.domain] = new_dataset
        if new_dataset.split_meta("val")["tokens"] == 0:
            raise PrometheanError(f"the validation split of {options.domain}'s data is empty.")

        def evaluate_now(names) -> dict[str, dict[str, float]]:
            return evaluate_domains(model, {n: datasets[n] for n in names}, options.batch_size,
                                    options.block_size, device, options.eval_batches)

        def evaluate_with_stage_adapter(stage: dict, names) -> dict[str, dict[str, float]]:
            """`names` evaluated on the base + the adapter of an earlier, committed `stage`."""
            earlier_name = f"earlier-{stage['stage']}"
            adapters.load(stage["adapter"], earlier_name, activate=False)
            try:
                with adapters.using(earlier_name):
                    return evaluate_now(names)
            finally:
                adapters.delete(earlier_name)

        # ---- stage 0 (the base), and the new domain's column before it is learned
        if not record["stages"]:
            if adapters is not None:
                with adapters.disabled():
                    base_val = evaluate_now(datasets)
            else:
                base_val = evaluate_now(datasets)
            record["stages"].append({"stage": 0, "domain": None, "val": base_val})
        elif is_new_domain:
            if adapters is not None:
                with adapters.disabled():
                    record["stages"][0]["val"].update(evaluate_now([options.domain]))
            else:
                base = load_checkpoint(record["base_checkpoint"], device=device).model
                record["stages"][0]["val"].update(evaluate_domains(
                    base, {options.domain: new_dataset}, options.batch_size, options.block_size,
                    device, options.eval_batches))
                del base
            # The model as it stands now, before learning the domain (forward transfer): a new
            # adapter starts as the previous stage's one, so this is the previous stage's model.
            # A fresh adapter (from_base) is the base instead: that is the previous stage's
            # model for the new domain only when that stage was from-base too (no adapter has
            # learned the domain); after a continuing stage it is base + that stage's adapter.
            if options.from_base and not previous.get("from_base"):
                record["stages"][-1]["val"].update(
                    evaluate_with_stage_adapter(previous, [options.domain]))
            else:
                record["stages"][-1]["val"].update(evaluate_now([options.domain]))
        if is_new_domain:
            record["domains"][options.domain] = {"data": str(final_path(new_dataset.directory)),
                                                 "learned_at_stage": stage_index}
        earlier = [d for d in record["domains"] if d != options.domain]

        # ---- EWC: consolidate every earlier domain not consolidated yet
        ewc = None
        if options.use_ewc:
            ewc_dir = staged_copy("ewc")
            ewc = (EWC.load(ewc_dir, options.ewc_lambda, options.ewc_gamma)
                   if (ewc_dir / "ewc.json").is_file() else EWC(options.ewc_lambda, options.ewc_gamma))
            for domain in earlier:
                if domain not in ewc.domains:
                    fisher = _domain_fisher(model, trainable, datasets[domain], options, device,
                                            estimate_fisher)
                    ewc.consolidate(domain, fisher, trainable)
            if not ewc.empty:
                ewc.save(ewc_dir)

        # ---- replay: every earlier domain in the buffer, mixed into the new domain's batches
        sampler = WindowSampler(new_dataset, options.batch_size, options.block_size, "train",
                                seed=options.seed + stage_index, device=device)
        batches = sampler
        buffer = None
        if options.replay > 0 and earlier:
            buffer = ReplayBuffer(staged_copy("replay"), options.block_size, options.replay_quota,
                                  seed=options.seed)
            for domain in earlier:
                if domain not in buffer:
                    buffer.add_split(domain, datasets[domain])
            batches = ReplayMixer(sampler, buffer, options.replay, domains=earlier,
                                  seed=options.seed + stage_index)

        # ---- train
        stopped, steps_trained = _train_stage(options, model, adapters, trainable, batches,
                                              sampler, ewc, run, staging, fingerprint, resumed,
                                              f"{method} {options.domain}", stage_index)
        model.eval()

        # ---- evaluate, save, consolidate
        evaluated_with = None
        if options.from_base:
            val, evaluated_with = _evaluate_own_adapters(
                record["stages"], datasets, options.domain, stage_index, adapters,
                evaluate_now, evaluate_with_stage_adapter)
        else:
            val = evaluate_now(datasets)
        stage_dir = Path(STAGES_DIR) / f"{stage_index:02d}-{options.domain}"
        if adapters is not None:
            # The stage's own copy, committed with the run; published under the checkpoint after.
            adapters.save(name, staging / stage_dir)
            output = adapter_directory(checkpoint, name)
            trainable_count = adapters.num_parameters(name)
            stage_entry = {"adapter": str(run / stage_dir), "adapter_name": name,
                           "published": str(output)}
        else:
            output = run / stage_dir
            save_checkpoint(staging / stage_dir, model, tokenizer,
                            {"continual_run": str(run), "domain": options.domain,
                             "stage": stage_index, "trained_from": str(checkpoint)})
            trainable_count = sum(p.numel() for p in trainable.values())
            stage_entry = {"checkpoint": str(output)}
        if ewc is not None:
            fisher = _domain_fisher(model, trainable, new_dataset, options, device, estimate_fisher)
            ewc.consolidate(options.domain, fisher, trainable)
            ewc.save(staged_copy("ewc"))
        if options.replay > 0:
            buffer = buffer or ReplayBuffer(staged_copy("replay"), options.block_size,
                                            options.replay_quota, seed=options.seed)
            buffer.add_split(options.domain, new_dataset)
        seconds = time.perf_counter() - started
        record["stages"].append({
            "stage": stage_index, "domain": options.domain, **stage_entry,
            "method": method, "from_base": options.from_base,
            "stopped": stopped, "steps_trained": steps_trained,
            **({"evaluated_with": evaluated_with} if evaluated_with is not None else {}),
            "update_steps": options.update_steps,
            "trainable_parameters": trainable_count,
            "total_parameters": model.num_parameters(),
            "options": {k: v for k, v in asdict(options).items()
                        if k not in ("checkpoint", "run", "progress", "device")},
            "replayed_rows": getattr(batches, "replayed_rows", 0),
            "seconds": seconds, "val": val,
        })
        _write_json(staging / RUN_FILE, record)
    if adapters is not None:
        publish_adapter(run / stage_dir, output)
    return StageResult(stage_index, options.domain, output, val, trainable_count, seconds)


def _open_run_record(run: Path, options: LearnOptions, method: str, checkpoint: Path,
                     base_hash: str) -> dict[str, Any]:
    """The run's record (checked against this stage's method), or a new run's."""
    if (run / RUN_FILE).is_file():
        record = read_run(run)
        if record["method"] != method:
            raise PrometheanError(
                f"{run} is a {record['method']} run; this stage asks for {method} "
                f"({'drop' if options.full else 'add'} --full, or use another --run)."
            )
        if options.base_domain is not None and options.base_domain[0] not in record["domains"]:
            raise PrometheanError(
                f"--base-domain belongs to a run's first stage; {run} already has stages."
            )
    else:
        record = {"format": RUN_FORMAT, "version": RUN_VERSION, "method": method,
                  "base_checkpoint": str(checkpoint), "base_model_sha256": base_hash,
                  "domains": {}, "stages": []}
        if options.base_domain is not None:
            name, data = options.base_domain
            record["domains"][name] = {"data": data, "learned_at_stage": 0}
    return record


def _model_to_learn_on(options: LearnOptions, record: dict, previous: dict | None,
                       checkpoint: Path, base_hash: str, run: Path, stage_index: int, device):
    """(model, tokenizer, adapters or None, the trainable parameters by name, the adapter's
    name or None): the stage's model as the module docstring's step 2 says."""
    from promethean.checkpoint import load_checkpoint

    name = None
    if options.full:
        source = checkpoint
        if previous is not None and previous.get("checkpoint") and \
                Path(previous["checkpoint"]).resolve() != checkpoint.resolve():
            raise PrometheanError(
                f"the last stage of {run} wrote {previous['checkpoint']}; continue from it "
                f"(--checkpoint {previous['checkpoint']}) so that the stages follow each other."
            )
        loaded = load_checkpoint(source, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        adapters = None
        named = {name: p for name, p in model.named_parameters()}
        for parameter in named.values():
            parameter.requires_grad_(True)
        trainable = named
    else:
        loaded = load_checkpoint(checkpoint, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        if base_hash != record["base_model_sha256"]:
            raise AdapterError(
                f"{checkpoint} is not the base model of {run} (sha256 {base_hash[:12]}, the run's "
                f"is {record['base_model_sha256'][:12]}); LoRA stages all adapt the same base."
            )
        adapters = Adapters(model, base_sha256=base_hash)
        name = options.adapter_name or options.domain
        config = LoraConfig.for_rank(options.lora_rank, options.lora_alpha,
                                     dropout=options.lora_dropout,
                                     target_modules=options.target_modules)
        metadata = {"domain": options.domain, "stage": stage_index, "run": str(run)}
        if options.from_base:
            metadata["from_base"] = True
        # The adapter's random A from the run's seed, not from whatever the process drew before:
        # the same command gives the same stage in any process (and a resumed stage matches).
        torch.manual_seed(options.seed + stage_index)
        adapters.add(name, config, metadata=metadata)  # B = 0: base + it is the base
        if previous is not None and previous.get("adapter") and not options.from_base:
            # Each stage's adapter continues the previous one: base + it is the model after it.
            previous_name = f"previous-{previous['stage']}"
            adapters.load(previous["adapter"], previous_name, activate=False)
            adapters.copy_weights(previous_name, name)
            adapters.delete(previous_name)
        adapters.to(device)
        trainable = adapters.trainable_parameters(name)
    return model, tokenizer, adapters, trainable, name


def _train_stage(options: LearnOptions, model, adapters, trainable: dict, batches, sampler, ewc,
                 run: Path, staging: Path, fingerprint: str, resumed, description: str,
                 stage_index: int) -> tuple[str, int]:
    """The stage's training (`train.loop.run_loop`), continuing `resumed` when there is one;
    returns why it stopped ("update_steps" or "max_minutes") and the steps trained. An
    interruption saves the stage's progress and raises TrainingInterrupted."""
    from promethean.train.loop import LoopHooks, LoopPlan, TrainedStep, json_safe, run_loop
    from promethean.train.optim import build_optimizer
    from promethean.train.schedule import lr_at
    from promethean.train.state import Progress, save_partial_state

    lr = options.lr or (3e-4 if options.full else 2e-3)
    weight_decay = options.weight_decay
    if weight_decay is None:
        weight_decay = 0.1 if options.full else 0.0
    optimizer = build_optimizer(model if adapters is None else adapters, lr, weight_decay,
                                (0.9, 0.95))
    warmup = (options.warmup_steps if options.warmup_steps is not None
              else max(1, options.update_steps // 10))
    parameters = list(trainable.values())
    progress, metric_lines = Progress(), []
    model.train()
    metrics_path = staging / METRICS_FILE
    if (run / METRICS_FILE).is_file():
        shutil.copyfile(run / METRICS_FILE, metrics_path)  # a copy: appended to below
    if resumed is not None:
        with torch.no_grad():
            for key, parameter in trainable.items():
                parameter.copy_(resumed.tensors[key])
        optimizer.load_state_dict(resumed.optimizer)
        progress = resumed.progress
        sampler.step = progress.step  # the samplers are seeded by step: this is the position
        if hasattr(batches, "replayed_rows"):
            batches.replayed_rows = resumed.extra["replayed_rows"]
        metric_lines = list(resumed.extra["metrics"])
        resumed.restore_rng()

    def train_step(step: int) -> TrainedStep:
        inputs, targets = batches.next_batch()
        _, loss = model(inputs, targets)
        penalty = ewc.penalty(trainable) if ewc is not None and not ewc.empty else None
        total = loss + penalty if penalty is not None else loss
        total.backward()
        return TrainedStep(float(total.detach()), inputs.numel(), float(loss.detach()),
                           {"ewc_penalty": 0.0 if penalty is None else float(penalty.detach())})

    def save_progress(progress: Progress) -> None:
        save_partial_state(run / STAGE_PROGRESS_DIR, fingerprint, trainable, optimizer,
                           progress, {"replayed_rows": getattr(batches, "replayed_rows", 0),
                                      "metrics": metric_lines})

    with open(metrics_path, "a") as metrics:
        for line in metric_lines:
            metrics.write(line)

        def write_metrics(line: dict[str, Any]) -> None:
            metric_lines.append(json.dumps(json_safe(line)) + "\n")
            metrics.write(metric_lines[-1])
            metrics.flush()

        plan = LoopPlan(
            description=description, optimizer=optimizer,
            parameters=parameters, max_steps=options.update_steps,
            learning_rate=lambda step: lr_at(step, lr, lr * options.min_lr_ratio, warmup,
                                             options.update_steps),
            grad_clip=options.grad_clip,
            runaway_advice="lower --lr (or --ewc-lambda); the run is as it was before this "
                           "stage.",
            checkpoint_every=options.checkpoint_every, max_minutes=options.max_minutes,
            show_progress=options.progress, metrics=write_metrics)
        hooks = LoopHooks(train_step, save_progress=save_progress,
                          record_fields=lambda: {"stage": stage_index,
                                                 "domain": options.domain})
        outcome = run_loop(plan, hooks, progress)
    if outcome.stopped == "interrupted":
        save_progress(progress)
        raise TrainingInterrupted(
            f"stage {stage_index} ({options.domain}) interrupted by {outcome.signal} at step "
            f"{progress.step} of {options.update_steps}; its progress is saved in "
            f"{run / STAGE_PROGRESS_DIR}: run the same command to continue it.",
            outcome.signal)
    stopped, steps_trained = outcome.stopped, progress.step
    if stopped == "max_steps":
        stopped = "update_steps"
    return stopped, steps_trained


def _domain_fisher(model, trainable, dataset, options: LearnOptions, device, estimate_fisher):
    from promethean.data.batches import WindowSampler

    sampler = WindowSampler(dataset, options.batch_size, options.block_size, "train",
                            seed=options.seed + 104729, device=device)
    return estimate_fisher(model, trainable, iter(sampler), options.fisher_samples)
