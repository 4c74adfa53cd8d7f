"""FGSM and PGD, written once for every adapter (pixels or token embeddings).

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
FGSM: Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015.

Shapes: ``z0 = adapter.embed(batch)`` is B x C x H x W (vision) or B x T x D (text); the ball is
per example (vision) or per token (text), as the adapter's ``ball_dims`` / ``radius`` say. The
attack returns the adversarial point (same shape, detached), never the perturbation.
Departures: steps are scaled by ``radius / eps`` so relative (norm-scaled) text budgets take
proportional steps. Each run returns its last iterate (as Madry et al. and torchattacks), so an
example misclassified at some step and correct again at the last counts as robust; ``early_stop``
freezes each example at its first successful iterate instead (no example lost that way, as APGD,
alt-pgd and CW track). Restarts keep, per example, the first restart whose last iterate succeeds,
else the one with the highest loss.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import normalize_step, random_in_ball, eval_mode, unwrap


def run_attack(model, batch: dict, run: Callable[..., Tensor], *args: Any) -> Tensor:
    """The common entry of every attack: ``run(adapter, batch, z0, *args)`` on the unwrapped adapter
    (Accelerate / DDP wrappers removed) in eval mode (the caller's mode is restored after), with the
    clean point ``z0 = embed(batch)`` computed without gradient."""
    adapter = unwrap(model)
    with eval_mode(adapter):
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
        if hasattr(adapter, "check_inputs"):
            adapter.check_inputs(z0)
        return run(adapter, batch, z0, *args)


def broadcast_mask(mask: Tensor, like: Tensor) -> Tensor:
    while mask.dim() < like.dim():
        mask = mask.unsqueeze(-1)
    return mask.to(like.dtype)


def attack_loss(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    """Per-example loss the attack ascends: CE of the true label, or minus CE of the target."""
    if targets is not None:
        return -F.cross_entropy(logits, targets, reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def succeeded(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    pred = logits.argmax(-1)
    return pred == targets if targets is not None else pred != labels


def start_in_ball(adapter, z0: Tensor, batch: dict, attack, random_start: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mask, radius, first point) of an lp attack from the clean point ``z0``: the perturbable mask
    broadcast to ``z0``, the adapter's per-unit radius for ``attack``'s budget, and ``z0`` (moved to
    a random point of the ball with ``random_start``) projected onto the ball."""
    mask = broadcast_mask(adapter.perturbable(batch), z0)
    radius = adapter.radius(z0, batch, attack)
    z = z0 + random_in_ball(z0, attack.norm, radius, adapter.ball_dims) * mask if random_start else z0
    return mask, radius, adapter.project(z, z0, batch, attack).detach()


def pick_targets(batch: dict, num_classes: int) -> Tensor:
    """``batch["target_labels"]`` if given, else a uniformly random class other than the label."""
    if "target_labels" in batch:
        return batch["target_labels"]
    labels = batch["labels"]
    shift = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return (labels + shift) % num_classes


@dataclass(config=ConfigDict(extra="forbid"))
class PGD:
    """Projected gradient ascent on the adapter's continuous input.

    eps: ball radius (pixels, or embedding units / fraction of the token norm with ``relative``);
    alpha: step size (default 2.5 * eps / steps, Madry et al.); steps: iterations; restarts: random
    restarts, per-example worst case kept; targeted: minimise CE to ``batch["target_labels"]`` (or a
    random other class); early_stop: freeze examples once they are misclassified.
    """

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    alpha: float | None = Field(default=None, gt=0)
    steps: int = Field(default=10, ge=0)
    random_start: bool = True
    restarts: int = Field(default=1, ge=1)
    targeted: bool = False
    early_stop: bool = False
    relative: bool = False

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.steps == 0:
            return z0
        labels = batch["labels"]
        targets = pick_targets(batch, adapter.num_classes) if self.targeted else None
        mask = adapter.perturbable(batch)
        mask = None if bool(mask.all()) else broadcast_mask(mask, z0)  # vision: everything moves
        radius = adapter.radius(z0, batch, self)
        step = self.step_size * radius / self.eps
        best = z0.clone()
        best_loss = torch.full_like(labels, float("-inf"), dtype=z0.dtype)
        found = torch.zeros_like(labels, dtype=torch.bool)
        for _ in range(self.restarts):
            z = z0
            if self.random_start:
                noise = random_in_ball(z0, self.norm, radius, adapter.ball_dims)
                z = z0 + (noise if mask is None else noise * mask)
            z = adapter.project(z, z0, batch, self).detach()
            done = torch.zeros_like(found)
            for _ in range(self.steps):
                z.requires_grad_(True)
                with torch.enable_grad():
                    logits = adapter.logits(z, batch)
                    loss = attack_loss(logits, labels, targets)
                    grad, = torch.autograd.grad(loss.sum(), z)
                if self.early_stop:
                    done |= succeeded(logits.detach(), labels, targets)
                move = normalize_step(grad, self.norm, adapter.ball_dims) * step
                if mask is not None:
                    move = move * mask
                if self.early_stop:
                    move = move * broadcast_mask(~done, move)
                z = adapter.project(z.detach() + move, z0, batch, self).detach()
            if self.restarts == 1:
                return z  # nothing to compare against: skip the scoring forward pass
            with torch.no_grad():
                logits = adapter.logits(z, batch)
                loss, success = attack_loss(logits, labels, targets), succeeded(logits, labels, targets)
            take = (success & ~found) | (~found & ~success & (loss > best_loss))
            best = torch.where(broadcast_mask(take, z).bool(), z, best)
            best_loss = torch.where(take, loss, best_loss)
            found |= success
        return best.detach()


@dataclass(config=ConfigDict(extra="forbid"))
class FGSM:
    """One step of size ``alpha`` (default eps) along the signed (Linf) or normalised (L2) gradient."""

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    alpha: float | None = Field(default=None, gt=0)
    random_start: bool = False
    targeted: bool = False
    relative: bool = False

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps

    def __call__(self, model, batch: dict) -> Tensor:
        pgd = PGD(eps=self.eps, norm=self.norm, alpha=self.step_size or None, steps=1,  # eps = 0: PGD returns z0
                  random_start=self.random_start, targeted=self.targeted, relative=self.relative)
        return pgd(model, batch)
