"""Training speed, MFU and peak memory, ours against transformers.

    python benchmarks/train.py [--repeats N] [--write docs/BENCHMARKS.md] [--profile]
        [--json ROWS.json] [--quick]

Every figure has a peer measured in the same run (the machine is shared and noisy):

* small GPT-2 (6 layers, 6 heads, 384 wide, context 256, vocab 50257, batch 16), fp32 and bf16
  (CPU autocast, fp32 weights): training tokens/s of promethean's `Transformer` with
  `build_optimizer` against `transformers.GPT2LMHeadModel` with `torch.optim.AdamW` (fused where
  available, the same groups and hyper-parameters). One step = forward + loss + backward +
  clip_grad_norm_(1.0) + optimizer step + zero_grad, on random token batches. Warm-up steps are
  not timed; each round runs every engine/dtype for --steps steps, in an order that rotates from
  round to round; ratios are taken within a round, the median over rounds is reported.
* MFU: model FLOPs per token x tokens/s / the matmul peak measured just before and after each
  round (a 2048^3 torch.matmul in the same dtype, fp32 or bf16, same thread count, the median
  of up to 5 passes: `benchmarks/machine.py`).
  FLOPs per token = 6 N + 12 L T d (PaLM, appendix B), N = the parameters that take part in a
  matmul: every non-embedding parameter plus the head (vocab x d, tied or not); position and token
  embedding lookups are not matmuls and are left out. Recomputation (checkpointing) is not counted.
* `gpt2-small`, micro-batch 2 x 512, gradient accumulation 4, bf16 autocast, with and without
  gradient checkpointing: peak RSS (VmHWM of a fresh subprocess that imports, builds, and trains
  1 warm-up + --big-steps optimizer steps) and tokens/s of the timed steps, each engine in its
  own subprocess, engines alternating within a round.

With --write FILE the results replace the part of FILE between `<!-- train:start -->` and
`<!-- train:end -->` (appended with a `## Training` heading if absent). With --json FILE the
summary rows of `python -m benchmarks` are written there. --quick: one round of one step at batch
4 and no gpt2-small runs (`--big-repeats 0`), for a smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_report_options,
    cores,
    cpu_description,
    measured_line,
    parse_report_arguments,
    ratios,
    summary_row,
    write_section,
    write_summary_rows,
)
from benchmarks.machine import measure_matmul_peak  # noqa: E402

START, END = "<!-- train:start -->", "<!-- train:end -->"
HEADING = (
    "## Training\n\n"
    "`benchmarks/train.py`: training steps (forward, backward, clip, AdamW) of promethean's "
    "`Transformer` against `transformers`' `GPT2LMHeadModel` on the same config, tokens/s and MFU "
    "against a matmul peak measured in the same run, and peak RSS of a `gpt2-small` run in a "
    "fresh subprocess.\n\n"
)
SEED = 0
LR, WEIGHT_DECAY, BETAS, CLIP = 6e-4, 0.1, (0.9, 0.95), 1.0
SMALL = dict(vocab_size=50257, context_length=256, n_layer=6, n_head=6, n_embd=384, batch=16)
BIG = dict(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768)
BIG_MICRO, BIG_LENGTH, BIG_ACCUM = 2, 512, 4
ENGINES = ("ours", "transformers")
DTYPES = ("fp32", "bf16")
# "ours-bf16-moments": ours with BFloat16MomentsAdamW (optimizer_moments = "bf16"), the
# low-memory setting for the seed's 8 GB machine.
LOW_MEMORY = "ours-bf16-moments"
# --quick: one round of one step at batch 4, no gpt2-small runs (minutes of their own on two cores).
QUICK = {"repeats": 1, "steps": 1, "warmup": 1, "batch": 4, "big_repeats": 0}
BIG_RUNS = tuple((engine, ckpt) for ckpt in (True, False) for engine in ENGINES) + ((LOW_MEMORY, True),)


# ---------------------------------------------------------------------------------- engines
def build(engine: str, shape: dict):
    """A model with fp32 weights (bf16 runs use autocast) and its optimizer."""
    import torch

    torch.manual_seed(SEED)
    if engine.startswith("ours"):
        from promethean.config import ModelConfig
        from promethean.model import Transformer
        from promethean.train.optim import build_optimizer

        config = ModelConfig(
            name="bench",
            vocab_size=shape["vocab_size"],
            context_length=shape["context_length"],
            n_layer=shape["n_layer"],
            n_embd=shape["n_embd"],
            n_head=shape["n_head"],
            d_ff=4 * shape["n_embd"],
            mlp="gelu",
            norm="layernorm",
            norm_eps=1e-5,
            bias=True,
            position="learned",
            tie_embeddings=True,
        )
        model = Transformer(config).train()
        moments = "bf16" if engine == LOW_MEMORY else "fp32"
        optimizer = build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                                    moments_dtype=moments)
        return model, optimizer
    import transformers

    config = transformers.GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["context_length"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
    )
    model = transformers.GPT2LMHeadModel(config).train()
    # The same two groups as ours: >= 2-D non-embedding weights decayed, the rest not.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, weight_decay=0.0)
    return model, optimizer


def set_checkpointing(engine: str, model, on: bool) -> None:
    if engine.startswith("ours"):
        model.gradient_checkpointing = on
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def loss_of(engine: str, model, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if engine.startswith("ours"):
        return model(inputs, targets, return_logits=False).loss
    # transformers shifts labels itself: labels = inputs gives the same T-1 next-token targets
    # as ours plus nothing more (it drops the last position), an equal amount of work.
    return model(input_ids=inputs, labels=inputs, use_cache=False).loss


def train_step(engine, model, optimizer, batches, dtype_name: str) -> None:
    """One optimizer step over `batches` micro-batches (gradient accumulation)."""
    import torch

    # As our trainer does: with checkpointing, no autocast weight cache (see trainer.py).
    cache = not (engine.startswith("ours") and model.gradient_checkpointing)
    for tokens in batches:
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)
            if dtype_name == "bf16" else nullcontext()
        )
        with autocast:
            loss = loss_of(engine, model, tokens)
        (loss / len(batches)).backward()
        if not cache:
            from promethean.train.memory import release_free_memory

            release_free_memory()  # as the trainer does with checkpointing on CPU
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_batches(count: int, batch: int, length: int, vocab: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length + 1), generator=generator) for _ in range(count)]


def flops_per_token(model_config: dict, length: int, matmul_params: int) -> float:
    return 6 * matmul_params + 12 * model_config["n_layer"] * length * model_config["n_embd"]


def matmul_params(engine: str, model) -> int:
    """Non-embedding parameters + the head's vocab x d (PaLM's N, as a matmul count)."""
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    wpe = model.position_embedding if engine.startswith("ours") else model.transformer.wpe
    return total - wpe.weight.numel()  # the tied wte counts once: as the head's matmul


# ---------------------------------------------------------------------------------- peak
def matmul_peak(dtype_name: str) -> float:
    """FLOP/s of a 2048^3 matmul in the dtype, same thread count (benchmarks/machine.py)."""
    return measure_matmul_peak(dtype_name, size=2048, passes=5, budget_s=2.0)


# ---------------------------------------------------------------------------------- small GPT-2
def measure_small(repeats: int, steps: int, warmup: int, batch: int = SMALL["batch"]) -> dict:
    import torch

    torch.set_num_threads(cores())
    shape = {**SMALL, "batch": batch}
    length, batch = shape["context_length"], shape["batch"]
    models = {engine: build(engine, shape) for engine in ENGINES}
    params = {engine: matmul_params(engine, models[engine][0]) for engine in ENGINES}
    fpt = flops_per_token(shape, length, params["ours"])
    batches = random_batches(steps, batch, length, shape["vocab_size"], SEED)
    keys = [(engine, dtype) for dtype in DTYPES for engine in ENGINES]
    for key in keys:
        for _ in range(warmup):
            train_step(key[0], *models[key[0]], batches[:1], key[1])
        print(f"  warm-up {key[0]} {key[1]} done", flush=True)
    tps = {key: [] for key in keys}
    peaks = {dtype: [] for dtype in DTYPES}
    for repeat in range(repeats):
        order = keys[repeat % len(keys) :] + keys[: repeat % len(keys)]
        before = {dtype: matmul_peak(dtype) for dtype in DTYPES}
        for key in order:
            start = time.perf_counter()
            for tokens in batches:
                train_step(key[0], *models[key[0]], [tokens], key[1])
            tps[key].append(steps * batch * length / (time.perf_counter() - start))
        after = {dtype: matmul_peak(dtype) for dtype in DTYPES}
        for dtype in DTYPES:
            peaks[dtype].append((before[dtype] + after[dtype]) / 2)
        line = "  ".join(f"{k[0]} {k[1]} {tps[k][-1]:6.0f} tok/s" for k in keys)
        peak_line = " ".join(f"{d} {peaks[d][-1] / 1e9:.0f}" for d in DTYPES)
        print(f"  round {repeat + 1}/{repeats}: {line}  (matmul GFLOP/s {peak_line})", flush=True)
    attn = getattr(models["transformers"][0].config, "_attn_implementation", None) or "?"
    return {"tps": tps, "peaks": peaks, "fpt": fpt, "params": params, "attn": attn, "batch": batch}


# ---------------------------------------------------------------------------------- gpt2-small
def big_child(engine: str, ckpt: bool, steps: int) -> None:
    """Runs in a fresh subprocess: import, build, 1 warm-up + `steps` timed optimizer steps."""
    import torch

    torch.set_num_threads(cores())
    model, optimizer = build(engine, BIG)
    set_checkpointing(engine, model, ckpt)
    batches = random_batches(BIG_ACCUM, BIG_MICRO, BIG_LENGTH, BIG["vocab_size"], SEED)
    train_step(engine, model, optimizer, batches[:1], "bf16")  # warm-up: one micro-batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(engine, model, optimizer, batches, "bf16")
        times.append(time.perf_counter() - start)
    hwm = None
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    tokens = BIG_MICRO * BIG_LENGTH * BIG_ACCUM
    record = {"vm_hwm_kib": hwm, "tps": tokens * steps / sum(times), "params": None}
    record["params"] = matmul_params(engine, model)
    print(json.dumps(record))


def measure_big(repeats: int, steps: int) -> dict:
    results = {run: [] for run in BIG_RUNS}
    for repeat in range(repeats):
        order = list(BIG_RUNS[repeat % 2 :] + BIG_RUNS[: repeat % 2])
        for engine, ckpt in order:
            command = [sys.executable, str(Path(__file__).resolve()), "--big-child", engine]
            command += ["--big-steps", str(steps)] + (["--checkpointing"] if ckpt else [])
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"gpt2-small run {engine} failed:\n{done.stderr[-3000:]}")
            record = json.loads(done.stdout.strip().splitlines()[-1])
            results[(engine, ckpt)].append(record)
            print(
                f"  gpt2-small round {repeat + 1}/{repeats} {engine:12s} ckpt={ckpt!s:5s} "
                f"{record['vm_hwm_kib'] * 1024 / 1e6:7.0f} MB  {record['tps']:7.1f} tok/s",
                flush=True,
            )
    return results


# ---------------------------------------------------------------------------------- profile
def profile(engine: str, shape: dict, dtype_name: str, rows: int = 14) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(cores())
    model, optimizer = build(engine, shape)
    batches = random_batches(1, shape["batch"], shape["context_length"], shape["vocab_size"], 1)
    train_step(engine, model, optimizer, batches, dtype_name)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(engine, model, optimizer, batches, dtype_name)
    print(f"\n=== {engine} {dtype_name}: one step, by self CPU time ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---------------------------------------------------------------------------------- report
def render(small, big, info, args, command, started, elapsed) -> str:
    code = f"`{command}`"
    tps, peaks, fpt = small["tps"], small["peaks"], small["fpt"]
    med = {key: statistics.median(v) for key, v in tps.items()}
    rows = []
    mfu = {}
    for dtype in DTYPES:
        ours, theirs = ("ours", dtype), ("transformers", dtype)
        peak_tps = [p / fpt for p in peaks[dtype]]  # tokens/s at 100% of the matmul peak
        mfu[ours] = ratios(tps[ours], peak_tps)
        mfu[theirs] = ratios(tps[theirs], peak_tps)
        rows.append(
            [
                f"train tok/s, small GPT-2 (6L, 384 wide, T=256, batch {small['batch']}), {dtype}"
                + (" autocast" if dtype == "bf16" else ""),
                f"{med[ours]:.0f} tok/s",
                f"{med[theirs]:.0f} tok/s (transformers {dtype})",
                f"**{ratios(tps[ours], tps[theirs]):.2f}x**",
                f"≤ {statistics.median(peak_tps):.0f} tok/s at the {dtype} matmul peak, so ≤ "
                f"{ratios(peak_tps, tps[theirs]):.2f}x",
                code,
            ]
        )
    for dtype in DTYPES:
        ours, theirs = ("ours", dtype), ("transformers", dtype)
        rows.append(
            [
                f"MFU, small GPT-2, {dtype}",
                f"{mfu[ours]:.0%}",
                f"{mfu[theirs]:.0%} (transformers {dtype})",
                f"{ratios(tps[ours], tps[theirs]):.2f}x",
                f"100% = {statistics.median(peaks[dtype]) / 1e9:.0f} GFLOP/s "
                f"({dtype} 2048³ matmul, range "
                f"{min(peaks[dtype]) / 1e9:.0f}–{max(peaks[dtype]) / 1e9:.0f})",
                code,
            ]
        )
    rows.append(
        [
            "train tok/s, small GPT-2, ours bf16 vs ours fp32",
            f"{med[('ours', 'bf16')]:.0f} tok/s",
            f"{med[('ours', 'fp32')]:.0f} tok/s (ours fp32)",
            f"{ratios(tps[('ours', 'bf16')], tps[('ours', 'fp32')]):.2f}x",
            f"matmul peak bf16 / fp32: {ratios(peaks['bf16'], peaks['fp32']):.2f}x",
            code,
        ]
    )
    if any(big.values()):  # --big-repeats 0 (as --quick does) leaves gpt2-small out
        big_tps = {run: [r["tps"] for r in records] for run, records in big.items()}
        big_mb = {run: [r["vm_hwm_kib"] * 1024 / 1e6 for r in records]
                  for run, records in big.items()}
        big_params = big[("ours", True)][0]["params"]
        big_fpt = flops_per_token(BIG, BIG_LENGTH, big_params)
        weights_mb = big_params * 4 / 1e6  # fp32 weights; + grads + 2 Adam moments = 4x
        bf16_peak = statistics.median(peaks["bf16"])
        for ckpt in (True, False):
            ours, theirs = ("ours", ckpt), ("transformers", ckpt)
            label = "on" if ckpt else "off"
            recompute = 4 / 3 if ckpt else 1
            rows.append(
                [
                    f"train tok/s, gpt2-small 2×512 ×4 accumulation, bf16 autocast, checkpointing {label}",
                    f"{statistics.median(big_tps[ours]):.0f} tok/s "
                    f"(MFU {statistics.median(big_tps[ours]) * big_fpt / bf16_peak:.0%})",
                    f"{statistics.median(big_tps[theirs]):.0f} tok/s (transformers, checkpointing "
                    f"{label})",
                    f"**{ratios(big_tps[ours], big_tps[theirs]):.2f}x**",
                    f"≤ {bf16_peak / big_fpt / recompute:.0f} tok/s at the bf16 matmul peak "
                    f"({big_fpt / 1e9:.2f} GFLOP/token" + (" x 4/3 recompute)" if ckpt else ")"),
                    code,
                ]
            )
        for ckpt in (True, False):
            ours, theirs = ("ours", ckpt), ("transformers", ckpt)
            label = "on" if ckpt else "off"
            rows.append(
                [
                    f"peak RSS (VmHWM, fresh process), gpt2-small 2×512 ×4, bf16, checkpointing {label}",
                    f"{statistics.median(big_mb[ours]):.0f} MB",
                    f"{statistics.median(big_mb[theirs]):.0f} MB (transformers, checkpointing {label})",
                    f"**{ratios(big_mb[ours], big_mb[theirs]):.2f}x**",
                    f"≥ {4 * weights_mb:.0f} MB = fp32 weights + grads + 2 AdamW moments "
                    f"({big_params / 1e6:.0f}M × 16 B), before imports and activations",
                    code,
                ]
            )
        low, theirs = (LOW_MEMORY, True), ("transformers", True)
        rows.append(
            [
                "peak RSS (VmHWM, fresh process), gpt2-small 2×512 ×4, bf16, checkpointing on, "
                "AdamW moments in bf16 (`--set optimizer_moments=bf16`)",
                f"{statistics.median(big_mb[low]):.0f} MB ({statistics.median(big_tps[low]):.0f} tok/s)",
                f"{statistics.median(big_mb[theirs]):.0f} MB (transformers, checkpointing on, "
                f"{statistics.median(big_tps[theirs]):.0f} tok/s)",
                f"**{ratios(big_mb[low], big_mb[theirs]):.2f}x**",
                f"≥ {3 * weights_mb:.0f} MB = fp32 weights + grads + 2 bf16 moments "
                f"({big_params / 1e6:.0f}M × 12 B), before imports and activations",
                code,
            ]
        )
    header = ["what", "ours", "peer, same run", "ratio", "physical limit", "command"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    meets = lambda ok: "met" if ok else "**not met**"
    bf16_x = ratios(tps[("ours", "bf16")], tps[("transformers", "bf16")])
    mfu16 = mfu[("ours", "bf16")]
    per_round = "; ".join(
        f"{k[0]} {k[1]} " + ", ".join(f"{t:.0f}" for t in v) for k, v in tps.items()
    )
    targets = (f"Targets: ≥ 1.5x transformers in bf16 (small GPT-2): {meets(bf16_x >= 1.5)} "
               f"({bf16_x:.2f}x). MFU ≥ 70%: {meets(mfu16 >= 0.7)} (bf16 {mfu16:.0%}, fp32 "
               f"{mfu[('ours', 'fp32')]:.0%}).")
    if any(big.values()):
        rss_on = statistics.median(big_mb[("ours", True)])
        rss_low = statistics.median(big_mb[(LOW_MEMORY, True)])
        big_x = ratios(big_tps[("ours", True)], big_tps[("transformers", True)])
        big_round = "Per-round gpt2-small: " + "; ".join(
            f"{k[0]} ckpt {'on' if k[1] else 'off'} "
            + ", ".join(f"{t:.0f} tok/s {m:.0f} MB" for t, m in zip(big_tps[k], big_mb[k]))
            for k in big_tps
        ) + "."
        big_setup = (
            "gpt2-small: each engine and setting in a "
            f"fresh subprocess (a one-micro-batch warm-up step, then {args.big_steps} timed "
            "optimizer step(s) of "
            f"{BIG_ACCUM} × {BIG_MICRO} × {BIG_LENGTH} tokens), {args.big_repeats} rounds, "
            "engines alternating. "
        )
        big_flops = (f", {big_params / 1e6:.1f}M → {big_fpt / 1e6:.0f} MFLOP/token for "
                     "gpt2-small at T=512")
        targets += (
            f" gpt2-small peak RSS ≤ 2.4 GB with checkpointing: "
            f"{meets(rss_low <= 2400)} ({rss_low:.0f} MB with bf16 AdamW moments, {rss_on:.0f} MB "
            "with fp32 moments; the seed card claims ~7 GB). gpt2-small "
            f"tok/s ≥ 1.5x transformers: {meets(big_x >= 1.5)} ({big_x:.2f}x with checkpointing, "
            f"{ratios(big_tps[('ours', False)], big_tps[('transformers', False)]):.2f}x without)."
        )
    else:
        big_round = "gpt2-small: not measured in this run (`--big-repeats 0`)."
        big_setup, big_flops = "", ""
    return "\n".join(
        [
            f"{measured_line(info, started, elapsed / 60)}; torch {info['torch']}, transformers "
            f"{info['transformers']} (attention: {info['attn']}), Python {info['python']}.",
            "",
            "Setup: random weights and random token batches; ours `Transformer` with "
            "`build_optimizer` (AdamW, fused), theirs `GPT2LMHeadModel` (dropout 0) with "
            "`torch.optim.AdamW(fused=True)`, the same two parameter groups, lr 6e-4, betas "
            "(0.9, 0.95), weight decay 0.1; one step = forward + loss + backward + "
            "`clip_grad_norm_(1.0)` + `step()` + `zero_grad()`; fp32 weights, bf16 runs under "
            f"`torch.autocast('cpu', torch.bfloat16)`; `torch.set_num_threads({info['cores']})`. "
            f"Small GPT-2: {args.warmup} warm-up step(s), then {args.repeats} rounds of "
            f"{args.steps} steps per engine and dtype in rotating order; each ratio is taken "
            f"within a round and the median reported. {big_setup}"
            "MFU = FLOPs/token × tok/s / matmul peak, FLOPs/token = 6N + "
            f"12·L·T·d (PaLM app. B), N = parameters in matmuls (non-embedding + the head): "
            f"{small['params']['ours'] / 1e6:.1f}M → {fpt / 1e6:.0f} MFLOP/token for the small "
            f"model{big_flops} (recomputation not counted). MB = 10^6 bytes.",
            "",
            *table,
            "",
            targets,
            "",
            f"Per-round tok/s, small GPT-2: {per_round}.",
            big_round,
            f"Load average at start / end: {args.load_start} / "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        ]
    )


def summary(small: dict, big: dict, command: str) -> list[dict[str, str]]:
    """The rows `python -m benchmarks` puts in the report's summary table."""
    tps, peaks, fpt = small["tps"], small["peaks"], small["fpt"]
    code = f"`{command}`"
    rows = []
    for dtype in ("bf16", "fp32"):
        ours, theirs = ("ours", dtype), ("transformers", dtype)
        peak_tps = [p / fpt for p in peaks[dtype]]
        ratio = ratios(tps[ours], tps[theirs])
        mfu, peer_mfu = ratios(tps[ours], peak_tps), ratios(tps[theirs], peak_tps)
        rows.append(summary_row(
            f"training tok/s, small GPT-2 (6L, 384 wide, T=256, batch {small['batch']}), {dtype}",
            f"{statistics.median(tps[ours]):.0f} tok/s (MFU {mfu:.0%})",
            f"{statistics.median(tps[theirs]):.0f} tok/s (transformers, MFU {peer_mfu:.0%})",
            f"{ratio:.2f}x",
            f"{statistics.median(peak_tps):.0f} tok/s at the {dtype} matmul peak "
            f"({statistics.median(peaks[dtype]) / 1e9:.0f} GFLOP/s)",
            (f"≥ 1.5x: {'met' if ratio >= 1.5 else 'not met'}; MFU ≥ 70%: "
             f"{'met' if mfu >= 0.7 else 'not met'}") if dtype == "bf16" else "",
            code,
        ))
    if any(big.values()):
        big_tps = {run: [r["tps"] for r in records] for run, records in big.items()}
        big_mb = {run: [r["vm_hwm_kib"] * 1024 / 1e6 for r in records]
                  for run, records in big.items()}
        big_fpt = flops_per_token(BIG, BIG_LENGTH, big[("ours", True)][0]["params"])
        bf16_peak = statistics.median(peaks["bf16"])
        ours, theirs = ("ours", True), ("transformers", True)
        ratio = ratios(big_tps[ours], big_tps[theirs])
        rows.append(summary_row(
            "training tok/s, gpt2-small 2×512 ×4, bf16 autocast, checkpointing on",
            f"{statistics.median(big_tps[ours]):.0f} tok/s",
            f"{statistics.median(big_tps[theirs]):.0f} tok/s (transformers)",
            f"{ratio:.2f}x",
            f"{bf16_peak / big_fpt / (4 / 3):.0f} tok/s at the bf16 matmul peak (with recompute)",
            f"≥ 1.5x: {'met' if ratio >= 1.5 else 'not met'}",
            code,
        ))
        low = statistics.median(big_mb[(LOW_MEMORY, True)])
        rows.append(summary_row(
            "peak RSS, gpt2-small training, bf16, checkpointing, bf16 AdamW moments",
            f"{low:.0f} MB",
            f"{statistics.median(big_mb[theirs]):.0f} MB (transformers, checkpointing)",
            f"{ratios(big_mb[(LOW_MEMORY, True)], big_mb[theirs]):.2f}x",
            f"≥ {3 * big[('ours', True)][0]['params'] * 4 / 1e6:.0f} MB "
            "(weights, grads, moments)",
            f"≤ 2400 MB: {'met' if low <= 2400 else 'not met'}",
            code,
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds, small GPT-2")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=SMALL["batch"], help="batch, small GPT-2")
    parser.add_argument("--big-repeats", type=int, default=2, help="rounds, gpt2-small")
    parser.add_argument("--big-steps", type=int, default=1, help="timed steps, gpt2-small")
    add_report_options(parser, QUICK)
    parser.add_argument("--profile", action="store_true", help="profile one step, then exit")
    parser.add_argument("--big-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parse_report_arguments(parser, argv, QUICK)
    if args.repeats < 1 or args.steps < 1 or args.batch < 1 or args.big_repeats < 0:
        parser.error("--repeats, --steps and --batch must be at least 1, --big-repeats at least 0")
    if args.big_child:
        big_child(args.big_child, args.checkpointing, args.big_steps)
        return
    if args.profile:
        for engine in ENGINES:
            profile(engine, SMALL, "bf16")
        return
    command = f"python benchmarks/train.py --repeats {args.repeats} --steps {args.steps} "
    if args.batch != SMALL["batch"]:
        command += f"--batch {args.batch} "
    command += f"--big-repeats {args.big_repeats} --big-steps {args.big_steps}"
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    started = datetime.datetime.now(datetime.timezone.utc)
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clock = time.perf_counter()
    print(f"gpt2-small, {len(BIG_RUNS)} subprocesses x {args.big_repeats} rounds", flush=True)
    big = measure_big(args.big_repeats, args.big_steps)  # first: this process is still small
    print(f"small GPT-2, 4 engine/dtype pairs x {args.repeats} rounds", flush=True)
    small = measure_small(args.repeats, args.steps, args.warmup, args.batch)
    import torch
    import transformers

    info = {
        **cpu_description(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn": small["attn"],
    }
    body = render(small, big, info, args, command, started, time.perf_counter() - clock)
    print()
    print(body)
    if args.write:
        write_section(args.write, START, END, body, heading=HEADING)
        print(f"\nwrote the train section of {args.write}")
    write_summary_rows(args.json, summary(small, big, command))


if __name__ == "__main__":
    main()
