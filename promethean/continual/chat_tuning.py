"""`promethean finetune-chat`: a LoRA adapter trained on the server's own chat log.

The nanoGPT chat card's loop — serve, log the conversations, fine-tune on them with early
stopping — done so that the adapter learns what the server will later ask of it (steps 1-3,
the log and the examples, are `continual.chat_examples`; the rest is here):

1. The log (`promethean serve --chat-log`, one JSON object a line: `chat_id`, `time`, `route`,
   `human`, `assistant`) is read line by line; a line that is not such an object (bad JSON, a
   missing field, a wrong type) is skipped, and all of them are counted in one warning. A
   conversation is every line of one `chat_id`, in time order. (`/v1/chat/completions` logs
   only a request's last user message under a fresh id, so each such request is a conversation
   of one exchange.) Other systems' logs are read too, one conversation a line: the GPT-2 chat
   card's `{"user", "assistant"}` pairs and OpenAI's `{"messages": [{"role", "content"}]}`
   (`promethean.data.chat.foreign_chat_exchanges`); the result names the formats it found.
2. Each conversation is rendered in the chat format (`promethean.data.chat`) and tokenised as
   the server prompts: `Human: ...\\nAssistant:` then the reply. The loss covers the assistant
   replies only — each reply's tokens and the newline that ends it, since the server stops a
   reply at a newline and the model must learn to emit one. Human turns and the `Assistant:`
   prompts are masked out (target -100). No end-of-text is trained: the log's last line is
   where logging stopped, not a sign that the conversation was over. An empty reply stays as
   context (the server kept it in the history) but is not a target: it would teach silence.
3. A conversation longer than the context is windowed the way the server trims a long history
   (`/chat` and `promethean chat` drop the oldest whole exchanges): the opening exchanges that
   fit form one example with all their replies as targets, and every later reply gets an
   example of its own holding as many whole preceding exchanges as fit, with that reply alone
   as the target (so no reply is trained twice). An exchange longer than the context alone
   keeps its last tokens.
4. A deterministic share of the conversations (at least one; the smallest sha256 of the
   `chat_id`, so a conversation stays on its side as the log grows) is held out. The base
   model's validation loss is measured first; training then evaluates every `eval_every`
   steps, keeps the adapter weights of the best evaluation (an improvement must exceed
   `min_delta`, as in the trainer), and stops after `patience` evaluations without one. The
   best weights — not the last — are written atomically to `CHECKPOINT/adapters/NAME`, where
   `generate --adapter`, `chat --adapter` and the server (`MODEL:NAME`) find them. If no
   evaluation beat the base model nothing is written.

The steps are `train.loop.run_loop`'s, as every training's are (the warmup + cosine `lr_at`,
clipping, the non-finite skip, evaluation lines, early stopping, `max_minutes`); it uses what
`learn`'s LoRA stages use (the adapters, `build_optimizer`, `exact_loss`); only the examples are
its own. Every `checkpoint_every` steps, and on SIGINT/SIGTERM, what resumes the training (the
adapter, AdamW's moments, the best weights so far, the RNG and the counters) is written to
`CHECKPOINT/adapters/.in-progress/NAME`; the same command run again continues from there and
ends as an uninterrupted run would, and the folder is removed when the training ends. A changed
chat log or other options start afresh.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from promethean.continual.adapters import (
    ADAPTER_CONFIG_FILE,
    DEFAULT_TARGETS,
    Adapters,
    LoraConfig,
    adapter_directory,
    check_name,
    checkpoint_sha256,
    in_progress_directory,
)
from promethean.continual.chat_examples import (
    IGNORE_INDEX,
    PROMETHEAN_LOG_FORMAT,
    ChatLogWarning,
    _epochs,
    chat_log_formats,
    conversation_examples,
    read_chat_log,
    split_conversations,
    validation_loss,
)
from promethean.errors import PrometheanError, TrainingInterrupted

DEFAULT_ADAPTER_NAME = "chat"
MIN_CONVERSATIONS = 10  # fewer is warned about: too little to learn from without memorising
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_LR = 2e-3  # as `learn`'s LoRA stages
METRICS_FILE = "metrics.jsonl"  # in the adapter's directory: the training's records
BEST_PREFIX = "best:"  # a resumable state's copy of the best weights so far
# What may differ between an interrupted training and the command that continues it.
_RESUMABLE_DIFFERENCES = ("progress", "device", "max_minutes", "checkpoint_every", "overwrite")


# ---------------------------------------------------------------------------------- training


def _trainer_default(name: str):
    from promethean.train.config import TrainConfig

    return TrainConfig.model_fields[name].default


@dataclass(frozen=True)
class ChatTuningOptions:
    checkpoint: str
    log: str
    name: str = DEFAULT_ADAPTER_NAME
    overwrite: bool = False
    rank: int = 8
    alpha: float | None = None  # default: 2 x rank
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = DEFAULT_LR
    max_steps: int = 1000
    batch_size: int = 8
    block_size: int | None = None  # default: the model's context length
    eval_every: int = 20
    patience: int | None = None  # default: the trainer's early-stopping patience (5)
    min_delta: float | None = None  # default: the trainer's (0.001)
    val_fraction: float = DEFAULT_VAL_FRACTION
    grad_clip: float = 1.0
    seed: int = 0
    device: str | None = None
    progress: bool = True
    # A wall-time budget: when spent, the step that spent it is evaluated and training stops
    # (stopped "max_minutes"); the best adapter so far is written as usual. It counts every leg
    # of a resumed run.
    max_minutes: float | None = None
    # Every this many steps the training's state is saved to CHECKPOINT/adapters/.in-progress/
    # NAME, so that the same command run again after a crash or Ctrl-C continues from there.
    checkpoint_every: int | None = 50


@dataclass
class ChatTuningResult:
    output: Path
    conversations: tuple[int, int]  # train, validation
    examples: tuple[int, int]
    steps: int
    stopped: str  # "max_steps", "early_stopping" or "max_minutes"
    best_step: int
    best_val_loss: float
    base_val_loss: float
    trainable_parameters: int
    seconds: float
    log_format: str = PROMETHEAN_LOG_FORMAT  # the kinds of line the chat log held
    evaluations: list[dict[str, float]] = field(default_factory=list)


def _check(options: ChatTuningOptions) -> tuple[int, float]:
    check_name(options.name)
    for flag, value in (("--max-steps", options.max_steps), ("--batch-size", options.batch_size),
                        ("--eval-every", options.eval_every),
                        ("--checkpoint-every", options.checkpoint_every)):
        if value is not None and value < 1:
            raise PrometheanError(f"{flag} must be at least 1, got {value}.")
    patience = options.patience if options.patience is not None else \
        _trainer_default("early_stopping_patience")
    if patience < 1:
        raise PrometheanError(f"--patience must be at least 1, got {patience}.")
    min_delta = options.min_delta if options.min_delta is not None else \
        _trainer_default("early_stopping_min_delta")
    if not 0 < options.val_fraction < 1:
        raise PrometheanError(f"--val-fraction must lie between 0 and 1, got {options.val_fraction}.")
    if not (math.isfinite(options.lr) and options.lr > 0):
        raise PrometheanError(f"--lr must be a positive number, got {options.lr}.")
    if options.block_size is not None and options.block_size < 2:
        raise PrometheanError(f"--block-size must be at least 2, got {options.block_size}.")
    return patience, min_delta


def _fingerprint(options: ChatTuningOptions, base_sha256: str) -> str:
    """What a resumed training must share with the interrupted one: the options that shape it,
    the base model, and the chat log's bytes (a log that grew since gives a fresh start)."""
    kept = {k: v for k, v in asdict(options).items() if k not in _RESUMABLE_DIFFERENCES}
    digest = hashlib.sha256()
    with open(options.log, "rb") as log:
        for block in iter(lambda: log.read(1 << 20), b""):
            digest.update(block)
    return json.dumps({**kept, "base_sha256": base_sha256, "log_sha256": digest.hexdigest()},
                      sort_keys=True, default=str)


def finetune_chat(options: ChatTuningOptions) -> ChatTuningResult:
    """Train and save the chat adapter as `options` say (see the module docstring)."""
    from promethean.checkpoint import load_checkpoint, read_checkpoint_record
    from promethean.device import resolve_device
    from promethean.files import remove_tree
    from promethean.train.loop import (
        LoopHooks,
        LoopPlan,
        TrainedStep,
        check_max_minutes,
        json_safe,
        run_loop,
    )
    from promethean.train.optim import build_optimizer
    from promethean.train.schedule import lr_at
    from promethean.train.state import Progress, read_partial_state, save_partial_state

    started = time.perf_counter()
    patience, min_delta = _check(options)
    check_max_minutes(options.max_minutes)
    checkpoint = Path(options.checkpoint)
    model_config, _ = read_checkpoint_record(checkpoint)  # a sentence if it is not one
    output = adapter_directory(checkpoint, options.name)
    if (output / ADAPTER_CONFIG_FILE).is_file() and not options.overwrite:
        raise PrometheanError(
            f"{checkpoint} already has an adapter named '{options.name}'; pass --overwrite to "
            "replace it, or choose another --name."
        )
    block_size = options.block_size or model_config.context_length
    if block_size > model_config.context_length:
        raise PrometheanError(f"block size {block_size} is longer than the model's context "
                              f"({model_config.context_length}).")
    lora = LoraConfig.for_rank(options.rank, options.alpha, target_modules=options.target_modules)

    conversations = [c for c in read_chat_log(options.log) if c.has_reply]
    if not conversations:
        raise PrometheanError(f"chat log {options.log} holds no usable conversation (every "
                              "logged reply is empty).")
    train_conversations, val_conversations = split_conversations(conversations,
                                                                  options.val_fraction)
    if len(conversations) < MIN_CONVERSATIONS:
        warnings.warn(
            f"chat log {options.log} holds only {len(conversations)} conversations with a reply; "
            f"fewer than {MIN_CONVERSATIONS} is very little to learn from, so expect the adapter "
            f"to memorise them (training anyway, {len(val_conversations)} of them held out for "
            "validation).",
            ChatLogWarning, stacklevel=2,
        )

    device = resolve_device(options.device)
    loaded = load_checkpoint(checkpoint, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = tokenizer.eot_id
    train_examples = [e for c in train_conversations
                      for e in conversation_examples(c, tokenizer, block_size)]
    val_examples = [e for c in val_conversations
                    for e in conversation_examples(c, tokenizer, block_size)]

    torch.manual_seed(options.seed)  # the adapter's random A
    base_sha256 = checkpoint_sha256(checkpoint)
    adapters = Adapters(model, base_sha256=base_sha256)
    adapters.add(options.name, lora, metadata={"trained_on": "chat log"})
    adapters.to(device)
    trainable = adapters.trainable_parameters(options.name)
    parameters = list(trainable.values())
    optimizer = build_optimizer(adapters, options.lr, 0.0, (0.9, 0.95))
    warmup = max(1, options.max_steps // 10)

    def evaluate() -> dict[str, float]:
        return {"val_loss": validation_loss(model, val_examples, options.batch_size, pad_id,
                                            device)}

    # ---- a fresh start, or the interrupted training this same command left
    state_dir = in_progress_directory(checkpoint, options.name)
    fingerprint = _fingerprint(options, base_sha256)
    resumed = read_partial_state(state_dir, fingerprint)
    best: dict[str, torch.Tensor] = {}
    if resumed is None:
        with adapters.disabled():
            base_val_loss = evaluate()["val_loss"]
        # The base model is the first to beat: an adapter is kept only when it does better.
        progress, best_step, evaluations = Progress(best_val_loss=base_val_loss), 0, []
        metric_lines: list[str] = []
    else:
        with torch.no_grad():
            for key, parameter in trainable.items():
                parameter.copy_(resumed.tensors[key])
        best = {key[len(BEST_PREFIX):]: tensor for key, tensor in resumed.tensors.items()
                if key.startswith(BEST_PREFIX)}
        optimizer.load_state_dict(resumed.optimizer)
        progress = resumed.progress
        base_val_loss = resumed.extra["base_val_loss"]
        best_step, evaluations = resumed.extra["best_step"], resumed.extra["evaluations"]
        metric_lines = list(resumed.extra["metrics"])
        resumed.restore_rng()
    batches = _epochs(train_examples, options.batch_size, options.seed, pad_id, device,
                      skip=progress.step)

    def train_step(step: int) -> TrainedStep:
        inputs, targets = next(batches)
        _, loss = model(inputs, targets)
        loss.backward()
        return TrainedStep(float(loss.detach()), int((targets != IGNORE_INDEX).sum()))

    def keep_best(progress: Progress) -> None:
        nonlocal best_step
        best_step = progress.step
        best.update({k: p.detach().clone() for k, p in trainable.items()})

    def save_progress(progress: Progress) -> None:
        save_partial_state(
            state_dir, fingerprint,
            {**trainable, **{BEST_PREFIX + key: tensor for key, tensor in best.items()}},
            optimizer, progress, {"base_val_loss": base_val_loss, "best_step": best_step,
                                  "evaluations": evaluations, "metrics": metric_lines})

    plan = LoopPlan(
        description=f"chat adapter {options.name}", optimizer=optimizer, parameters=parameters,
        max_steps=options.max_steps,
        learning_rate=lambda step: lr_at(step, options.lr, options.lr * 0.1, warmup,
                                         options.max_steps),
        grad_clip=options.grad_clip, runaway_advice="lower --lr; no adapter was written.",
        eval_every=options.eval_every, patience=patience, min_delta=min_delta,
        checkpoint_every=options.checkpoint_every, max_minutes=options.max_minutes,
        show_progress=options.progress,
        metrics=lambda record: metric_lines.append(json.dumps(json_safe(record)) + "\n"))
    model.train()
    outcome = run_loop(plan, LoopHooks(
        train_step, evaluate=evaluate, keep_best=keep_best, save_progress=save_progress,
        on_evaluation=lambda e: evaluations.append({
            "step": e["step"], "val_loss": e["val_loss"], "train_loss": e["mean_train_loss"]}),
    ), progress)
    if outcome.stopped == "interrupted":
        save_progress(progress)
        raise TrainingInterrupted(
            f"chat tuning of '{options.name}' interrupted by {outcome.signal} at step "
            f"{progress.step} of {options.max_steps}; its progress is saved in {state_dir}: run "
            "the same command to continue it.", outcome.signal)
    step, stopped, best_val_loss = progress.step, outcome.stopped, progress.best_val_loss
    model.eval()
    if not best:  # no evaluation beat the base model
        remove_tree(state_dir)  # the training has ended: nothing is left to resume
        raise PrometheanError(
            f"no evaluation in {step} steps lowered the validation loss below the base model's "
            f"({base_val_loss:.4f}) by more than {min_delta}, so no adapter was written; try "
            "another --lr or more --max-steps."
        )
    with torch.no_grad():
        for key, parameter in trainable.items():
            parameter.copy_(best[key])
    log_path = Path(options.log)
    adapters.infos[options.name].metadata.update({
        "chat_log": str(log_path.resolve()),
        "conversations": {"train": len(train_conversations), "val": len(val_conversations)},
        "examples": {"train": len(train_examples), "val": len(val_examples)},
        "block_size": block_size, "lr": options.lr, "seed": options.seed,
        "steps": step, "stopped": stopped, "best_step": best_step,
        "best_val_loss": best_val_loss, "base_val_loss": base_val_loss,
        "evaluations": evaluations,
    })
    adapters.save(options.name, output, extra_files=lambda scratch: (
        scratch / METRICS_FILE).write_text("".join(metric_lines)))
    remove_tree(state_dir)  # what this training wrote to resume from: it has ended
    return ChatTuningResult(
        output=output, conversations=(len(train_conversations), len(val_conversations)),
        examples=(len(train_examples), len(val_examples)), steps=step, stopped=stopped,
        best_step=best_step, best_val_loss=best_val_loss, base_val_loss=base_val_loss,
        trainable_parameters=adapters.num_parameters(options.name),
        seconds=time.perf_counter() - started, evaluations=evaluations,
        log_format=chat_log_formats(conversations),
    )
