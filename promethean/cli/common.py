"""What every command module shares: the typer apps, consoles, common options, model loading
and how errors become one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promethean.errors import PrometheanError

app = typer.Typer(
    help="Train, adapt, remember and serve small language models on one modest machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect and create models.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert to and from Hugging Face transformers layouts.",
                          no_args_is_help=True)
data_app = typer.Typer(help="Corpora and their preparation into token files.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(convert_app, name="convert")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
memory_app = typer.Typer(help="The context memory: add, search, stats, prune.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

console = Console()
err_console = Console(stderr=True)

DeviceOption = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best available).")
]
OverwriteCheckpointOption = Annotated[bool, typer.Option(
    "--overwrite", help="Write into a directory that already holds files: a checkpoint there has "
    "its model files replaced; everything else in it (adapters/, your files) is kept.")]
DtypeOption = Annotated[str, typer.Option(
    "--dtype", help="fp32, bf16, fp16 or int8 (weight-only). bf16 and int8 are converted from "
    "fp32 weights after any adapter merge.")]
ModelSetOption = Annotated[Optional[list[str]], typer.Option(
    "--model-set", help="Override a model setting: key=value, a TOML literal (repeatable); on a "
    "checkpoint only those its weights allow (rope_theta, sliding_window, context_length, ...).")]


def _load_model(source: str, device_name: str | None, dtype_name: str, seed: int = 0,
                adapter: str | None = None):
    """A checkpoint directory, or a preset name (random weights, said so on stderr), with the
    checkpoint's adapter `adapter` merged in; fp32, bf16 and int8 are prepared for inference
    (`promethean.inference.quantize`: bf16 and int8 from the fp32 weights after the merge, and
    each with the fused decode step where it runs), fp16 is loaded directly."""
    import torch

    from promethean.checkpoint import load_checkpoint, resolve_model_source
    from promethean.device import resolve_device, resolve_dtype
    from promethean.inference.quantize import check_inference_dtype, prepare_for_inference
    from promethean.model import Transformer
    from promethean.tokenizer import get_tokenizer

    device = resolve_device(device_name)
    check_inference_dtype(dtype_name)
    prepared = dtype_name in ("fp32", "bf16", "int8")
    dtype = torch.float32 if prepared else resolve_dtype(dtype_name, device)
    resolved = resolve_model_source(source)
    if adapter is not None and resolved.checkpoint is None:
        raise PrometheanError(f"--adapter needs a checkpoint directory; '{source}' is a preset.")
    if resolved.checkpoint is not None:
        checkpoint = load_checkpoint(source, device=device, dtype=dtype)
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        if adapter is not None:
            from promethean.continual.adapters import load_adapter_onto

            load_adapter_onto(model, source, adapter)  # merged into the weights: base speed
        if prepared:
            prepare_for_inference(model, dtype_name)
        return model, tokenizer
    preset = resolved.preset
    err_console.print(
        f"[yellow]note:[/] '{source}' is a preset, not a checkpoint: the weights are random."
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(preset.model)
    if prepared:
        return prepare_for_inference(model, dtype_name), get_tokenizer(preset.tokenizer)
    return model.to(dtype).eval(), get_tokenizer(preset.tokenizer)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (replaced non-UTF-8 bytes, ...) as one plain line, not Python's file:line form;
    a setting read under another name is a note."""
    from promethean.config import SettingNote

    label = "note" if issubclass(category, SettingNote) else "warning"
    sys.stderr.write(f"{label}: {message}\n")


def _one_line(message: str) -> str:
    """The message with control characters (a newline or an escape in a file name, say) written
    as escapes, so that an error is always exactly one line a script can match."""
    import unicodedata

    return "".join(
        char if char == " " or not unicodedata.category(char).startswith(("C", "Z"))
        else char.encode("unicode_escape").decode("ascii")
        for char in message
    )


def _os_error_sentence(error: OSError) -> str:
    """The OS's refusal in the user's terms: the path they gave, not a staging name beside it."""
    import errno

    from promethean.files import leftover_of

    filename = getattr(error, "filename", None)
    if not filename:
        return f"{error.strerror or error}."
    path = Path(str(filename))
    if (final := leftover_of(path.name)) is not None:
        path = path.with_name(final)
    if error.errno == errno.EEXIST and path.exists() and not path.is_dir():
        return f"{path} is a file, and a directory is needed there."
    return f"{error.strerror or error} ({path})."
