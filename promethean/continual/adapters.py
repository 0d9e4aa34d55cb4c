"""LoRA adapters on our Transformer: many named ones side by side, the base weights frozen.

A LoRA adapter adds a low-rank update to a linear layer: `y = W x + (alpha / rank) * B A x`,
A (rank x in) random, B (out x rank) zero, so a new adapter starts out changing nothing.

`Adapters(model)` injects them without touching the model's class or its `state_dict`: every
targeted `nn.Linear` gets one forward hook (a `LoraHook`, of the type promethean.model.hooks
names so that inference can recognise it) that adds the active adapter's update, and the LoRA
matrices live in this object's own modules (`lora_A.<adapter>.<layer>`), so a checkpoint of the
model is still exactly the base model and an adapter is saved on its own, small and
self-describing (peft's layout: `adapter_model.safetensors` + `adapter_config.json`):

    adapters = Adapters(model)                       # freezes the base; hashes it once
    adapters.add("kjv", rank=8, alpha=16)            # and makes "kjv" active
    ... train adapters.trainable_parameters() ...
    adapters.save("kjv", checkpoint / "adapters" / "kjv")
    with adapters.disabled():                        # the plain base model
        ...
    adapters.merge("kjv"); adapters.unmerge()        # fold into W for fast inference, and back

An adapter file names the sha256 of the base model it was trained on (`model_sha256`, over the
checkpoint's tensors in name order); loading it onto another base is refused with a sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from promethean.errors import PrometheanError
from promethean.files import atomic_directory, verify_checksums, write_checksums
from promethean.model.hooks import AdapterHook

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "promethean-lora-adapter"
ADAPTER_VERSION = 1
ADAPTERS_DIR = "adapters"  # inside a checkpoint directory: adapters/<name>/
IN_PROGRESS_DIR = ".in-progress"  # adapters/.in-progress/<name>/: an interrupted training
# Every linear layer inside the blocks (attention q/k/v/o, MLP gate/up/down). The output head
# (`lm_head`) may be added: it lets an adapter shift the output distribution, which a new domain's
# vocabulary needs most; when tied to the embedding, merging gives the head its own copy.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class AdapterError(PrometheanError):
    """An adapter cannot be made, found or loaded as asked."""


def check_name(name: str, what: str = "adapter") -> str:
    """Adapter and domain names become directory names: letters, digits, '-', '_' and '.'."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > 100:
        raise AdapterError(
            f"{what} name {name!r} must start with a letter or digit and hold only letters, "
            "digits, '-', '_' and '.' (at most 100 characters)."
        )
    return name


# ------------------------------------------------------------------------------- base hashing


def _update_hash(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n"
                  .encode())
    # Raw bytes whatever the dtype (numpy has no bfloat16): view the storage as bytes.
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_sha256(model: nn.Module) -> str:
    """sha256 over the model's stored tensors (tied ones once) in name order: name, dtype,
    shape and bytes of each. Equal to `checkpoint_sha256` of the checkpoint it was loaded from
    (in the checkpoint's dtype), and different after any weight changes."""
    from promethean.checkpoint import stored_state

    digest = hashlib.sha256()
    state = stored_state(model)
    for name in sorted(state):
        _update_hash(digest, name, state[name])
    return digest.hexdigest()


def checkpoint_sha256(directory: str | Path) -> str:
    """`model_sha256` of a checkpoint, read from its safetensors file one tensor at a time."""
    from promethean.checkpoint import MODEL_FILE

    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not a checkpoint: {MODEL_FILE} is missing.")
    digest = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as reader:
            for name in sorted(reader.keys()):
                _update_hash(digest, name, reader.get_tensor(name))
    except SafetensorError as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({error}).") from None
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- configs


# alpha = 2 x rank when not given: `LoraConfig.for_rank`, used by `learn` and `finetune-chat`.
DEFAULT_ALPHA_PER_RANK = 2.0


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # DEFAULT_ALPHA_PER_RANK x the default rank
    dropout: float = 0.0
    # A module is targeted when one of these equals the last part of its name ("q_proj") or,
    # read as a regular expression, matches its whole name (r"blocks\.[01]\.attn\..*").
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise AdapterError(f"LoRA rank must be a whole number of at least 1, got {self.rank}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise AdapterError(f"LoRA alpha must be a positive number, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"LoRA dropout must lie in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if not self.target_modules:
            raise AdapterError("LoRA needs at least one target module pattern.")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def for_rank(cls, rank: int, alpha: float | None = None, **settings) -> LoraConfig:
        """The config of a rank-`rank` adapter; alpha, when not given, is twice the rank (the
        founding cards' choice: scaling 2 whatever the rank)."""
        return cls(rank=rank, alpha=DEFAULT_ALPHA_PER_RANK * rank if alpha is None else alpha,
                   **settings)


def matching_linear_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the `nn.Linear` modules that `patterns` target (see `LoraConfig`), in order."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as error:
            raise AdapterError(
                f"target module pattern {pattern!r} is not a valid regular expression ({error})."
            ) from None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        last = name.rsplit(".", 1)[-1]
        if any(pattern == last or regex.fullmatch(name) for pattern, regex in compiled):
            names.append(name)
    if not names:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
        raise AdapterError(
            f"the target modules {list(patterns)} match no linear layer of this model; its linear "
            f"layers are named like {linear[0] if linear else '(none)'} (last parts: {shown})."
        )
    return names


@dataclass
class AdapterInfo:
    name: str
    config: LoraConfig
    modules: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- adapters


class Adapters(nn.Module):
    """The LoRA adapters of one model. Constructing it freezes the model's own parameters."""

    def __init__(self, model: nn.Module, base_sha256: str | None = None) -> None:
        super().__init__()
        # A plain attribute, not a submodule: our state_dict holds adapter weights only.
        object.__setattr__(self, "model", model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # Hashed once, before any merge can change the weights it describes.
        self.base_sha256 = base_sha256 or model_sha256(model)
        self.lora_A = nn.ModuleDict()  # adapter -> ParameterDict(layer key -> (rank, in))
        self.lora_B = nn.ModuleDict()  # adapter -> ParameterDict(layer key -> (out, rank))
        self.infos: dict[str, AdapterInfo] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into the base weights, if any
        self._disabled = 0
        self._hooks: dict[str, Any] = {}
        self._untied: set[str] = set()  # tied heads given their own weight by a merge
        self._modules_by_name = dict(model.named_modules())

    # ------------------------------------------------------------------------- bookkeeping
    @staticmethod
    def _key(module_name: str) -> str:
        return module_name.replace(".", "__")  # ParameterDict keys cannot hold dots

    def names(self) -> list[str]:
        return list(self.infos)

    def _require(self, name: str) -> AdapterInfo:
        if name not in self.infos:
            known = ", ".join(self.infos) or "none"
            raise AdapterError(f"no adapter named '{name}' on this model (it has: {known}).")
        return self.infos[name]

    def num_parameters(self, name: str | None = None) -> int:
        """Parameters of one adapter (default: the active one)."""
        name = name or self.active
        if name is None:
            return 0
        self._require(name)
        return sum(p.numel() for p in self.lora_A[name].values()) + sum(
            p.numel() for p in self.lora_B[name].values())

    def trainable_parameters(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """`{layer.lora_A: parameter, ...}` of one adapter (default: the active one), named
        independently of the adapter's own name so that EWC can compare adapters."""
        name = name or self.active
        if name is None:
            raise AdapterError("no adapter is active.")
        info = self._require(name)
        found = {}
        for module_name in info.modules:
            key = self._key(module_name)
            found[f"{module_name}.lora_A"] = self.lora_A[name][key]
            found[f"{module_name}.lora_B"] = self.lora_B[name][key]
        return found

    # --------------------------------------------------------------------------- add / delete
    def add(
        self,
        name: str,
        config: LoraConfig | None = None,
        *,
        activate: bool = True,
        metadata: dict[str, Any] | None = None,
        **settings: Any,
    ) -> AdapterInfo:
        """A new adapter (B = 0: the model's outputs do not change) on the targeted layers."""
        check_name(name)
        if name in self.infos:
            raise AdapterError(f"this model already has an adapter named '{name}'.")
        config = config or LoraConfig(**settings)
        modules = matching_linear_names(self.model, config.target_modules)
        reference = self._modules_by_name[modules[0]].weight
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        for module_name in modules:
            linear = self._modules_by_name[module_name]
            a = torch.empty(config.rank, linear.in_features, device=reference.device,
                            dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and peft) do
            a_dict[self._key(module_name)] = nn.Parameter(a)
            b_dict[self._key(module_name)] = nn.Parameter(
                torch.zeros(linear.out_features, config.rank, device=reference.device))
        self.lora_A[name], self.lora_B[name] = a_dict, b_dict
        info = AdapterInfo(name, config, modules, dict(metadata or {}))
        self.infos[name] = info
        for module_name in modules:
            if module_name not in self._hooks:
                module = self._modules_by_name[module_name]
                hook = LoraHook(self, self._key(module_name))
                self._hooks[module_name] = module.register_forward_hook(hook)
        if activate:
            self.set_active(name)
        return info

    def delete(self, name: str) -> None:
        self._require(name)
        if self.merged == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.infos[name]
        if self.active == name:
            self.active = None
        still_used = {m for info in self.infos.values() for m in info.modules}
        for module_name in list(self._hooks):
            if module_name not in still_used:
                self._hooks.pop(module_name).remove()

    def remove(self) -> None:
        """Take every hook off the model (the adapters' weights stay in this object)."""
        if self.merged is not None:
            self.unmerge()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ active / disabled
    def set_active(self, name: str | None) -> None:
        """Make `name` the adapter the model runs with (None: none, the plain base)."""
        if name is not None:
            self._require(name)
        if self.merged is not None and self.merged != name:
            raise AdapterError(
                f"adapter '{self.merged}' is merged into the base weights; unmerge it before "
                f"activating {'no adapter' if name is None else repr(name)}."
            )
        self.active = name

    def adds_nothing(self) -> bool:
        """Whether the forward hooks add nothing right now (no adapter active, the active one
        merged into the weights, or disabled): the model then computes exactly its base layers
        (each `LoraHook` checks it before adding anything)."""
        return bool(self._disabled) or self.active is None or self.merged == self.active

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the model is the plain base model (a merged adapter is undone and
        redone around it)."""
        merged = self.merged
        if merged is not None:
            self.unmerge()
        self._disabled += 1
        try:
            yield
        finally:
            self._disabled -= 1
            if merged is not None:
                self.merge(merged)

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        previous = self.active
        self.set_active(name)
        try:
            yield
        finally:
            self.active = previous

    # -------------------------------------------------------------------------- merging
    def delta_weight(self, name: str, module_name: str) -> torch.Tensor:
        key = self._key(module_name)
        b, a = self.lora_B[name][key], self.lora_A[name][key]
        return (b @ a) * self.infos[name].config.scaling

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold an adapter (default: the active one) into the base weights: the model then runs
        at base speed with the adapter's outputs. `unmerge` takes it out again."""
        name = name or self.active
        if name is None:
            raise AdapterError("no adapter is active, so there is nothing to merge.")
        info = self._require(name)
        if self.merged == name:
            return
        if self.merged is not None:
            raise AdapterError(f"adapter '{self.merged}' is already merged; unmerge it first.")
        for module_name in info.modules:
            module = self._modules_by_name[module_name]
            delta = self.delta_weight(name, module_name).to(module.weight.dtype)
            if self._is_tied(module):
                # A head tied to the embedding gets its own merged copy (the embedding, which the
                # input side reads, must not change); unmerge ties it again.
                module.weight = nn.Parameter(module.weight + delta, requires_grad=False)
            else:
                module.weight += delta
        self.merged = name
        self.active = name

    @torch.no_grad()
    def unmerge(self) -> None:
        name = self.merged
        if name is None:
            return
        embedding = getattr(self.model, "token_embedding", None)
        for module_name in self.infos[name].modules:
            module = self._modules_by_name[module_name]
            if module_name in self._untied:
                module.weight = embedding.weight
            else:
                module.weight -= self.delta_weight(name, module_name).to(module.weight.dtype)
        self._untied.clear()
        self.merged = None

    def _is_tied(self, module: nn.Module) -> bool:
        """Whether `module` is the output head sharing its weight with the token embedding
        (noted, so that unmerge can tie it again)."""
        embedding = getattr(self.model, "token_embedding", None)
        tied = embedding is not None and module.weight is embedding.weight
        if tied:
            self._untied.update(n for n, m in self._modules_by_name.items() if m is module)
        return tied

    # ---------------------------------------------------------------------------- save / load
    def save(self, name: str, directory: str | Path, *,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        """`adapter_model.safetensors` + `adapter_config.json` (and what `extra_files(staging)`
        adds, e.g. a training's metrics), written atomically."""
        info = self._require(name)
        tensors = {
            key: tensor.detach().to("cpu", torch.float32).contiguous()
            for key, tensor in self.trainable_parameters(name).items()
        }
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise AdapterError(
                    f"refusing to save adapter '{name}': tensor '{key}' holds NaN or infinite "
                    "values."
                )
        record = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "name": name,
            "base_model_sha256": self.base_sha256,
            "base_model": getattr(getattr(self.model, "config", None), "name", None),
            "peft_type": "LORA",
            "r": info.config.rank,
            "lora_alpha": info.config.alpha,
            "lora_dropout": info.config.dropout,
            "target_modules": list(info.config.target_modules),
            "modules": info.modules,
            "parameters": self.num_parameters(name),
            "metadata": info.metadata,
        }
        directory = Path(directory)
        with atomic_directory(directory) as scratch:
            save_file(tensors, str(scratch / ADAPTER_FILE), metadata={"format": "pt"})
            (scratch / ADAPTER_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
            if extra_files is not None:
                extra_files(scratch)
            write_checksums(scratch)
        return directory

    def load(self, directory: str | Path, name: str | None = None, *,
             activate: bool = True) -> AdapterInfo:
        """Add the adapter saved in `directory` (under its own name unless `name` is given).
        Refused, with a sentence, when it was made for a different base model."""
        directory = Path(directory)
        record = read_adapter_config(directory)
        if record["base_model_sha256"] != self.base_sha256:
            raise AdapterError(
                f"the adapter in {directory} was made for a different base model (sha256 "
                f"{record['base_model_sha256'][:12]}) than this one ({self.base_sha256[:12]}); "
                "load it onto the checkpoint it was trained from."
            )
        name = name or record["name"]
        try:
            config = LoraConfig(rank=record["r"], alpha=record["lora_alpha"],
                                dropout=record["lora_dropout"],
                                target_modules=tuple(record["target_modules"]))
        except (KeyError, TypeError) as error:
            raise AdapterError(f"{directory / ADAPTER_CONFIG_FILE} is incomplete ({error}).") \
                from None
        tensors = _read_adapter_tensors(directory)
        info = self.add(name, config, activate=False, metadata=record.get("metadata") or {})
        try:
            if info.modules != list(record.get("modules", info.modules)):
                raise AdapterError(
                    f"the adapter in {directory} targets {len(record['modules'])} layers but its "
                    f"patterns match {len(info.modules)} of this model."
                )
            own = self.trainable_parameters(name)
            for key in sorted(set(tensors) - set(own)):
                raise AdapterError(f"{directory / ADAPTER_FILE} has tensor '{key}' that this "
                                   "model has no layer for.")
            with torch.no_grad():
                for key, parameter in own.items():
                    if key not in tensors:
                        raise AdapterError(f"{directory / ADAPTER_FILE} is missing tensor '{key}'.")
                    if tuple(tensors[key].shape) != tuple(parameter.shape):
                        raise AdapterError(
                            f"tensor '{key}' in {directory / ADAPTER_FILE} has shape "
                            f"{tuple(tensors[key].shape)} but this model needs "
                            f"{tuple(parameter.shape)}."
                        )
                    parameter.copy_(tensors[key])
        except BaseException:
            self.delete(name)
            raise
        if activate:
            self.set_active(name)
        return info

    def copy_weights(self, source: str, target: str) -> None:
        """Start adapter `target` from `source`'s weights (same layers and rank)."""
        with torch.no_grad():
            mine = self.trainable_parameters(target)
            for key, value in self.trainable_parameters(source).items():
                if key not in mine or mine[key].shape != value.shape:
                    raise AdapterError(
                        f"adapter '{target}' cannot start from '{source}': their layers or ranks "
                        "differ."
                    )
                mine[key].copy_(value)


class LoraHook(AdapterHook):
    """The forward hook `Adapters` puts on one targeted linear layer: it adds the active
    adapter's update `(alpha / rank) * B A x` to the layer's output, or nothing (see
    `Adapters.adds_nothing`, and an active adapter that does not target this layer)."""

    def __init__(self, adapters: Adapters, key: str) -> None:
        self.adapters = adapters
        self.key = key  # the layer's key in each adapter's lora_A / lora_B

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        adapters = self.adapters
        name = adapters.active
        if adapters.adds_nothing():
            return output
        if self.key not in adapters.lora_A[name]:
            return output
        a, b = adapters.lora_A[name][self.key], adapters.lora_B[name][self.key]
        config = adapters.infos[name].config
        # Dropout follows the model's own train/eval mode (the layer's flag).
        x = F.dropout(args[0], config.dropout, training=module.training)
        update = (x.to(a.dtype) @ a.t()) @ b.t()
        return output + (update * config.scaling).to(output.dtype)

    def unmerged_adapter(self) -> str | None:
        active = self.adapters.active
        return active if active is not None and self.adapters.merged != active else None


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    from promethean.checkpoint import read_versioned_record

    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter: {ADAPTER_CONFIG_FILE} is missing.")
    record = read_versioned_record(path, ADAPTER_FORMAT, ADAPTER_VERSION, "adapter config")
    if not isinstance(record.get("base_model_sha256"), str) or not isinstance(
            record.get("name"), str):
        raise AdapterError(f"{path} does not name its adapter and base model.")
    return record


def _read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is missing {ADAPTER_FILE}.")
    verify_checksums(directory, (ADAPTER_CONFIG_FILE, ADAPTER_FILE), AdapterError)
    try:
        with safe_open(str(path), framework="pt") as reader:
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({error}).") from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor '{key}' in {path} holds NaN or infinite values.")
    return tensors


@dataclass
class SavedAdapter:
    """An adapter as saved, read without a model: its config and {module name: (A, B)}."""

    name: str
    config: LoraConfig
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(directory: str | Path, base_sha256: str) -> SavedAdapter:
    """The adapter saved in `directory`, checked (checksums, finite values, one A and B per
    layer it names) and refused, with a sentence, unless it was made for the base model whose
    `model_sha256` is `base_sha256` (for serving it without a model to load it onto)."""
    directory = Path(directory)
    record = read_adapter_config(directory)
    if record["base_model_sha256"] != base_sha256:
        raise AdapterError(
            f"the adapter in {directory} was made for a different base model (sha256 "
            f"{record['base_model_sha256'][:12]}) than this one ({base_sha256[:12]})."
        )
    try:
        config = LoraConfig(rank=record["r"], alpha=record["lora_alpha"],
                            dropout=record["lora_dropout"],
                            target_modules=tuple(record["target_modules"]))
        modules = [str(module) for module in record["modules"]]
    except (KeyError, TypeError) as error:
        raise AdapterError(f"{directory / ADAPTER_CONFIG_FILE} is incomplete ({error}).") from None
    tensors = _read_adapter_tensors(directory)
    expected = {f"{module}.lora_{part}" for module in modules for part in "AB"}
    for key in sorted(set(tensors) ^ expected):
        where = "is missing" if key in expected else "has"
        raise AdapterError(f"{directory / ADAPTER_FILE} {where} tensor '{key}'"
                           f"{'' if key in expected else ', which its config does not name'}.")
    matrices = {module: (tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"])
                for module in modules}
    return SavedAdapter(str(record["name"]), config, matrices)


def adapter_directory(checkpoint: str | Path, name: str) -> Path:
    return Path(checkpoint) / ADAPTERS_DIR / check_name(name)


def in_progress_directory(checkpoint: str | Path, name: str) -> Path:
    """Where an adapter's interrupted training keeps what resumes it (chat tuning): a hidden
    folder, since adapter names start with a letter or digit, and never listed as an adapter."""
    return Path(checkpoint) / ADAPTERS_DIR / IN_PROGRESS_DIR / check_name(name)


def list_adapters(checkpoint: str | Path) -> list[str]:
    folder = Path(checkpoint) / ADAPTERS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / ADAPTER_CONFIG_FILE).is_file())


def load_adapter_onto(model: nn.Module, checkpoint: str | Path, name: str,
                      merge: bool = True) -> Adapters:
    """The checkpoint's adapter `name` (from `CHECKPOINT/adapters/NAME`) on `model`, which was
    loaded from that checkpoint; merged into the weights by default (inference at base speed)."""
    directory = Path(checkpoint) / ADAPTERS_DIR / name
    if not (directory / ADAPTER_CONFIG_FILE).is_file():
        known = ", ".join(list_adapters(checkpoint)) or "none"
        raise AdapterError(f"{checkpoint} has no adapter named '{name}' (it has: {known}).")
    adapters = Adapters(model, base_sha256=checkpoint_sha256(checkpoint))
    adapters.load(directory, name)
    if merge:
        adapters.merge(name)
    return adapters


def describe(info: AdapterInfo) -> dict[str, Any]:
    return {"name": info.name, **asdict(info.config), "modules": len(info.modules)}
