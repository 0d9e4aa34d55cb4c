"""Elastic weight consolidation: keep the weights that mattered for earlier domains near where
they were.

After a domain is learned, the diagonal of its Fisher information is estimated as the mean of
squared gradients of the sequence log-likelihood, log p(sequence) = the sum of its next-token
log-probabilities, over `samples` windows of the domain's data, one backward pass per window.
(Until December 2026 the gradient was that of the *mean* next-token loss, a Fisher 1/T^2 of
this one for windows of T tokens; a lambda tuned then is T^2 times too strong now: 1e4 then is
about 0.15 now at T = 256.) Learning a new domain then adds to its loss

    penalty = lambda / 2 * sum_i F_i * (theta_i - theta*_i) ** 2

where theta* are the parameters after the earlier domains. Online EWC (Schwarz et al. 2018) keeps
a single running Fisher instead of one per domain: `F <- gamma * F + F_new` and theta* moves to
the newest parameters, so the cost stays that of one domain however many are learned.

The parameters are any named set: the active LoRA adapter's (`Adapters.trainable_parameters()`,
named by layer, not by adapter, so consecutive adapters compare) or every weight of the model for
full fine-tuning (`named_parameters()`). The state is saved as safetensors + JSON, never pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promethean.errors import PrometheanError
from promethean.files import atomic_directory
from promethean.model.transformer import IGNORE_INDEX

EWC_TENSORS_FILE = "ewc.safetensors"
EWC_JSON_FILE = "ewc.json"
EWC_FORMAT = "promethean-ewc"
EWC_VERSION = 1

Batch = tuple[torch.Tensor, torch.Tensor]


def estimate_fisher(
    model: Callable,
    parameters: dict[str, torch.nn.Parameter],
    batches: Iterable[Batch],
    samples: int,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over `samples` sequences of (d log p(sequence) / d theta)^2,
    log p(sequence) being the sum over its predicted tokens (targets other than IGNORE_INDEX) of
    log p(token | prefix). `batches` may hold several rows each; every row is its own backward
    pass. Runs in eval mode (no dropout)."""
    if samples < 1:
        raise PrometheanError(f"the Fisher estimate needs at least 1 sample, got {samples}.")
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    requires = {name: p.requires_grad for name, p in parameters.items()}
    for p in parameters.values():
        p.requires_grad_(True)
    seen = 0
    try:
        for inputs, targets in batches:
            for row in range(inputs.shape[0]):
                if seen == samples:
                    break
                row_targets = targets[row : row + 1]
                _, loss = model(inputs[row : row + 1], row_targets)
                # The model's loss is the mean over the predicted tokens; their count turns it
                # into the sum, minus the sequence's log-likelihood.
                predicted = int((row_targets != IGNORE_INDEX).sum())
                if predicted == 0:
                    continue
                grads = torch.autograd.grad(loss * predicted, list(parameters.values()),
                                            allow_unused=True)
                for (name, _), grad in zip(parameters.items(), grads):
                    if grad is not None:
                        fisher[name] += grad.detach().float() ** 2
                seen += 1
            if seen == samples:
                break
    finally:
        for name, p in parameters.items():
            p.requires_grad_(requires[name])
        if was_training:
            model.train()
    if seen == 0:
        raise PrometheanError("the Fisher estimate got no data.")
    return {name: value / seen for name, value in fisher.items()}


class EWC:
    """Online EWC state: a running Fisher, the anchor parameters, lambda and gamma."""

    def __init__(self, strength: float, gamma: float = 1.0) -> None:
        if not (math.isfinite(strength) and strength >= 0):
            raise PrometheanError(f"the EWC lambda must be 0 or more, got {strength}.")
        if not 0 < gamma <= 1:
            raise PrometheanError(f"the online EWC decay gamma must lie in (0, 1], got {gamma}.")
        self.strength, self.gamma = strength, gamma
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.domains: list[str] = []

    @property
    def empty(self) -> bool:
        return not self.fisher

    def consolidate(self, domain: str, fisher: dict[str, torch.Tensor],
                    parameters: dict[str, torch.nn.Parameter]) -> None:
        """Fold a newly learned domain in: F <- gamma F + F_new, anchor <- current parameters."""
        if self.fisher and set(self.fisher) != set(fisher):
            raise PrometheanError(
                f"the Fisher for '{domain}' covers other parameters than the EWC state of "
                f"{', '.join(self.domains)}; a run keeps one kind of training (LoRA or full)."
            )
        for name, value in fisher.items():
            value = value.detach().float()
            if name in self.fisher:
                value = self.gamma * self.fisher[name].to(value.device) + value
            self.fisher[name] = value
            self.anchor[name] = parameters[name].detach().float().clone()
        self.domains.append(domain)

    def penalty(self, parameters: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta*)^2 over the parameters the state covers."""
        missing = sorted(set(self.fisher) - set(parameters))
        if missing:
            raise PrometheanError(
                f"the EWC state covers parameter '{missing[0]}' that this model does not train."
            )
        total = None
        for name, fisher in self.fisher.items():
            parameter = parameters[name]
            term = (fisher.to(parameter.device)
                    * (parameter.float() - self.anchor[name].to(parameter.device)) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.strength * total

    # ---------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        tensors = {f"fisher.{k}": v.cpu().contiguous() for k, v in self.fisher.items()}
        tensors.update({f"anchor.{k}": v.cpu().contiguous() for k, v in self.anchor.items()})
        record = {"format": EWC_FORMAT, "version": EWC_VERSION, "lambda": self.strength,
                  "gamma": self.gamma, "domains": self.domains,
                  "fisher_mean": {k: float(v.mean()) for k, v in self.fisher.items()}}
        with atomic_directory(directory) as scratch:
            save_file(tensors, str(scratch / EWC_TENSORS_FILE), metadata={"format": "pt"})
            (scratch / EWC_JSON_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, strength: float | None = None,
             gamma: float | None = None) -> EWC:
        """The saved state; `strength`/`gamma`, when given, replace the saved lambda/gamma."""
        from promethean.checkpoint import read_versioned_record

        directory = Path(directory)
        record = read_versioned_record(directory / EWC_JSON_FILE, EWC_FORMAT, EWC_VERSION,
                                       "EWC state")
        state = cls(record["lambda"] if strength is None else strength,
                    record["gamma"] if gamma is None else gamma)
        try:
            tensors = load_file(str(directory / EWC_TENSORS_FILE))
        except (SafetensorError, FileNotFoundError) as error:
            raise PrometheanError(
                f"{directory / EWC_TENSORS_FILE} is missing or unreadable ({error})."
            ) from None
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            (state.fisher if kind == "fisher" else state.anchor)[name] = value
        if set(state.fisher) != set(state.anchor):
            raise PrometheanError(f"{directory} has Fisher and anchor tensors that do not pair up.")
        state.domains = list(record["domains"])
        return state
