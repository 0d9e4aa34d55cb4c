"""Continual-learning commands: `learn`, `forgetting`, `finetune-chat`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from promethean.errors import PrometheanError
from promethean.cli.common import (
    app,
    console,
    DeviceOption,
)


# ------------------------------------------------------------------------- continual learning


@app.command()
def learn(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The base checkpoint (LoRA), or "
                                             "the last stage's checkpoint (--full).")],
    domain: Annotated[str, typer.Option("--domain", help="Name of the domain being learned.")],
    data: Annotated[str, typer.Option("--data", help="A named corpus, a local file/folder/glob, or "
                                      "a prepared data directory.")],
    update_steps: Annotated[int, typer.Option("--update-steps", help="Optimizer steps.")],
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory holding continual.json "
                   "(default: the checkpoint's run, else CHECKPOINT/continual).")] = None,
    use_ewc: Annotated[bool, typer.Option("--use-ewc", help="Elastic weight consolidation.")] = False,
    ewc_lambda: Annotated[Optional[float], typer.Option("--ewc-lambda", help="EWC strength, on "
                          "the Fisher of the sequence log-likelihood (default 0.15).")] = None,
    ewc_gamma: Annotated[Optional[float], typer.Option("--ewc-gamma", help="Online EWC decay "
                         "(default 1).")] = None,
    replay: Annotated[Optional[float], typer.Option("--replay", help="Share of each batch "
                      "replayed from earlier domains (default 0: no replay).")] = None,
    replay_quota: Annotated[Optional[int], typer.Option("--replay-quota", help="Windows kept per "
                            "domain (default 512).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha "
                                                        "(default 2 x rank).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option("--lora-dropout", help="(default 0)")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Layers to adapt: a last "
                      "name part (q_proj) or a regex over full names (repeatable; default: every "
                      "block linear layer).")] = None,
    lora_head: Annotated[bool, typer.Option("--lora-head", help="Adapt the output head (lm_head) "
                         "too, besides the --target layers.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Fine-tune every weight instead of LoRA.")] = False,
    from_base: Annotated[bool, typer.Option("--from-base", help="The stage's adapter starts fresh "
                         "on the base, independent of earlier stages; load it by its domain "
                         "name.")] = False,
    adapter_name: Annotated[Optional[str], typer.Option("--adapter-name", help="Adapter name "
                            "(default: the domain).")] = None,
    base_domain: Annotated[Optional[str], typer.Option("--base-domain", help="NAME=DATA: the domain "
                           "the checkpoint was trained on, measured from the first stage.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 2e-3 "
                                                "LoRA, 3e-4 full).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="(default 8)")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="(default 256)")] = None,
    eval_batches: Annotated[Optional[int], typer.Option("--eval-batches", help="Cap on validation "
                            "batches per domain (default: the whole split).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Validation "
                            "share when --data is a corpus to prepare (default 0.02).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="(default 0)")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        "--max-minutes", help="Wall-time budget for the stage's training: when spent, it stops "
        "there, then evaluates and commits the stage.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help="Save the stage's training state every N steps (default 50), "
        "so that the same command run again after a crash or Ctrl-C continues from there.")] = None,
    device: DeviceOption = None,
) -> None:
    """Learn a new domain (a LoRA adapter, or full fine-tuning) and record every domain's loss."""
    from promethean.continual.adapters import DEFAULT_TARGETS
    from promethean.continual.learn import LearnOptions, learn

    base = None
    if base_domain is not None:
        name, separator, path = base_domain.partition("=")
        if not separator or not name or not path:
            raise PrometheanError(f"--base-domain '{base_domain}' is not of the form NAME=DATA.")
        base = (name, path)
    targets = tuple(target) if target else DEFAULT_TARGETS
    if lora_head and "lm_head" not in targets:
        targets += ("lm_head",)
    # Only what was given: LearnOptions holds the defaults.
    given = {key: value for key, value in {
        "lora_rank": lora_rank, "lora_dropout": lora_dropout, "ewc_lambda": ewc_lambda,
        "ewc_gamma": ewc_gamma, "replay": replay, "replay_quota": replay_quota,
        "batch_size": batch_size, "block_size": block_size, "val_fraction": val_fraction,
        "seed": seed, "max_minutes": max_minutes, "checkpoint_every": checkpoint_every,
    }.items() if value is not None}
    result = learn(LearnOptions(
        checkpoint=str(checkpoint), domain=domain, data=data, update_steps=update_steps,
        run=str(run) if run else None, full=full, from_base=from_base,
        adapter_name=adapter_name, lora_alpha=lora_alpha, target_modules=targets,
        use_ewc=use_ewc, base_domain=base, lr=lr, eval_batches=eval_batches, device=device,
        **given,
    ))
    typer.echo(f"stage {result.stage} ({result.domain}): wrote {result.output} "
               f"({result.trainable_parameters:,} trained parameters, {result.seconds:.0f} s)")
    for name, values in result.val.items():
        typer.echo(f"  {name}: validation loss {values['loss']:.4f}, perplexity "
                   f"{values['perplexity']:.1f}")


@app.command()
def forgetting(
    runs: Annotated[list[Path], typer.Argument(help="Continual-learning run directories.")],
    out: Annotated[Optional[Path], typer.Option(help="Heatmap PNG (default RUN/forgetting.png; "
                                                "one run only).")] = None,
) -> None:
    """Print a continual run's loss matrix, forgetting and transfer, and draw its heatmap; given
    several runs, also compare them."""
    from promethean.continual.forgetting import (
        draw_heatmap,
        forgetting_report,
        print_comparison,
        print_report,
    )

    if out is not None and len(runs) > 1:
        raise PrometheanError("--out names one heatmap; give one run with it.")
    reports = [forgetting_report(run) for run in runs]
    for report in reports:
        print_report(report, console)
        console.print(f"wrote {draw_heatmap(report, out)}")
    if len(reports) > 1:
        print_comparison(reports, console)


@app.command("finetune-chat")
def finetune_chat(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint that served the chats.")],
    log: Annotated[Path, typer.Option("--log", help="The server's chat log (serve --chat-log).")] = Path("chat.jsonl"),
    name: Annotated[str, typer.Option("--name", help="Adapter name: CHECKPOINT/adapters/NAME.")] = "chat",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of that name.")] = False,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (default 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default 2 x rank).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (warmup, then "
                  "cosine; default 2e-3).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Most optimizer steps "
                         "(default 1000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step "
                          "(default 8).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Longest example in "
                          "tokens (default: the model's context).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Steps between "
                          "validations (default 20).")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Validations without "
                        "improvement before stopping (default: the trainer's, 5).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share of the "
                            "conversations held out (at least one; default 0.1).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default 0.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        "--max-minutes", help="Wall-time budget (every leg of a resumed run): when spent, "
        "evaluate and stop; the best adapter so far is written.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help="Save the training's state every N steps (default 50), so "
        "that the same command run again after a crash or Ctrl-C continues from there.")] = None,
    device: DeviceOption = None,
) -> None:
    """Train a LoRA adapter on the logged chats (replies only), keeping the best by validation."""
    from promethean.continual.chat_tuning import ChatTuningOptions
    from promethean.continual.chat_tuning import finetune_chat as run_finetune_chat

    # Only what was given: ChatTuningOptions holds the defaults.
    given = {key: value for key, value in {
        "rank": rank, "lr": lr, "max_steps": max_steps, "batch_size": batch_size,
        "eval_every": eval_every, "val_fraction": val_fraction, "seed": seed,
        "checkpoint_every": checkpoint_every,
    }.items() if value is not None}
    result = run_finetune_chat(ChatTuningOptions(
        checkpoint=str(checkpoint), log=str(log), name=name, overwrite=overwrite, alpha=alpha,
        block_size=block_size, patience=patience, device=device, max_minutes=max_minutes,
        **given,
    ))
    (train_chats, val_chats), (train_examples, val_examples) = result.conversations, result.examples
    typer.echo(f"conversations: {train_chats} to train on ({train_examples} examples), {val_chats} "
               f"held out for validation ({val_examples} examples); log format: {result.log_format}")
    typer.echo(f"{result.steps} steps ({result.stopped.replace('_', ' ')}): best validation loss "
               f"{result.best_val_loss:.4f} at step {result.best_step}, base model "
               f"{result.base_val_loss:.4f}")
    typer.echo(f"wrote {result.output} ({result.trainable_parameters:,} trained parameters, "
               f"{result.seconds:.0f} s): use it with --adapter {name}, or serve it as "
               f"{checkpoint.resolve().name}:{name}")
