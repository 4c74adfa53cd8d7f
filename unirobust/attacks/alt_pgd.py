"""PGD whose loss alternates between cross-entropy and the margin (CW) loss, for every adapter.

Papers: PGD — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
2018; the margin loss ``max_{i != y} z_i - z_y`` — Carlini & Wagner, "Towards Evaluating the
Robustness of Neural Networks", IEEE S&P 2017. Using both losses in one evaluation follows the
advice of Croce & Hein 2020 (AutoAttack) and Carlini et al. 2019 ("On Evaluating Adversarial
Robustness"): CE saturates on confident examples and is sensitive to logit scaling, the margin is
not; each finds examples the other misses.

Distance: Linf or L2 per ball unit (whole image / one token), radius from ``adapter.radius``; only
``adapter.perturbable`` entries move. Shapes: ``z0 = adapter.embed(batch)`` is B x C x H x W or
B x T x D; returns the adversarial point (same shape, detached).

Choice: with ``alternate="iteration"`` (default) the loss switches every ``period`` iterations
within one run (CE first), so a single restart already gets both signals; ``alternate="restart"``
uses CE on even restarts and the margin on odd ones. Either way the point kept per example is
tracked at *every* iterate (and the final one) by one common criterion: the first misclassified
iterate, else the iterate with the largest margin ``max_{i != y} z_i - z_y`` (the two losses have
different scales, so the margin, monotone in success, is the judge).

Departures from PGD: per-iterate (not per-restart) best tracking; steps scaled by ``radius / eps``
as in :class:`~unirobust.attacks.pgd.PGD`; untargeted only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import normalize_step, random_in_ball
from .apgd import margin_loss
from .pgd import broadcast_mask, run_attack


@dataclass(config=ConfigDict(extra="forbid"))
class AltPGD:
    """PGD alternating CE and margin losses; per-example best over all iterates and restarts.

    eps: ball radius; alpha: step size (default 2.5 * eps / steps); steps: iterations per restart;
    restarts: random restarts; alternate: switch the loss every ``period`` iterations
    ("iteration") or per restart ("restart").
    """

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    alpha: float | None = Field(default=None, gt=0)
    steps: int = Field(default=10, ge=0)
    random_start: bool = True
    restarts: int = Field(default=1, ge=1)
    alternate: Literal["iteration", "restart"] = "iteration"
    period: int = Field(default=1, ge=1)
    relative: bool = False

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)

    def uses_margin(self, restart: int, step: int) -> bool:
        """Whether iteration ``step`` of restart ``restart`` ascends the margin (else CE)."""
        turn = step // self.period if self.alternate == "iteration" else restart
        return turn % 2 == 1

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.steps == 0:
            return z0
        labels = batch["labels"]
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        radius = adapter.radius(z0, batch, self)
        step = self.step_size * radius / self.eps
        best = z0.clone()
        best_margin = torch.full(labels.shape, float("-inf"), device=z0.device, dtype=z0.dtype)
        found = torch.zeros_like(labels, dtype=torch.bool)

        def keep(z: Tensor, logits: Tensor) -> None:
            nonlocal best, best_margin, found
            margin = margin_loss(logits, labels)
            success = logits.argmax(-1) != labels
            take = (success & ~found) | (~found & ~success & (margin > best_margin))
            best = torch.where(broadcast_mask(take, z).bool(), z, best)
            best_margin = torch.where(take, margin, best_margin)
            found = found | success

        for r in range(self.restarts):
            z = z0 + random_in_ball(z0, self.norm, radius, adapter.ball_dims) * mask if self.random_start else z0
            z = adapter.project(z, z0, batch, self).detach()
            for t in range(self.steps):
                z.requires_grad_(True)
                with torch.enable_grad():
                    logits = adapter.logits(z, batch)
                    loss = (margin_loss(logits, labels) if self.uses_margin(r, t)
                            else F.cross_entropy(logits, labels, reduction="none"))
                    grad, = torch.autograd.grad(loss.sum(), z)
                z = z.detach()
                keep(z, logits.detach())
                move = normalize_step(grad, self.norm, adapter.ball_dims) * step * mask
                z = adapter.project(z + move, z0, batch, self).detach()
            with torch.no_grad():
                keep(z, adapter.logits(z, batch))
        return best.detach()
