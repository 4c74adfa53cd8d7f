"""Carlini-Wagner L2, written once for every adapter, its result projected onto the threat ball.

Paper: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.

Objective, per example: minimise ``dist(delta) + c * max(z_y - max_{i != y} z_i, -kappa)`` with Adam,
where ``z`` are the logits at ``z0 + delta``; optionally a binary search over ``c`` (the paper's
rule: on success, a margin above ``kappa``, ``c`` moves down to the midpoint with the last failure,
on failure up to the midpoint with the last success, or x10 while none succeeded).

Distance: squared L2, measured per ball unit (whole image / one token) in units of the unit's L2
"size" ``R`` — the radius for an L2 ball, ``radius * sqrt(d)`` for an Linf ball of d entries — and
summed over units, so one ``c`` suits relative text budgets and images alike. Adam optimises
``w = delta / s`` with ``s = R / sqrt(d)`` per unit, so ``lr`` is a per-coordinate step in those units.
Only ``adapter.perturbable`` entries move.
Shapes: ``z0 = adapter.embed(batch)`` is B x C x H x W or B x T x D; returns the adversarial point.

Departures from the paper:

- CW is an unbounded minimum-distance attack; here every iterate is *projected onto the threat
  ball* (``adapter.project`` with the attack's ``eps`` / ``norm``) and the point returned, per
  example, is the first projected iterate that is misclassified, else the projected iterate with
  the largest margin ``max_{i != y} z_i - z_y``, so the result is a valid point of the cascade.
  This costs one extra forward per iterate in which some example lies outside the ball.
- The box constraint is kept by projected Adam (after each step the point is projected onto the
  adapter's valid set: [0, 1] for pixels, padding / special tokens fixed for text) instead of the
  tanh change of variables, which has no analogue for embeddings.
- Defaults are cheap: ``n_iter = 100`` and one ``c`` (no binary search) instead of 10,000 iterations
  and 9 search steps; the budget is ``n_iter`` (not ``steps``) so a task's PGD ``steps`` is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass as plain_dataclass
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import away_from_zero
from .apgd import margin_loss
from .pgd import broadcast_mask, run_attack


@plain_dataclass(frozen=True)
class _ValidSet:
    """A threat with an infinite ball: ``adapter.project`` then keeps only the valid set."""

    norm: str = "l2"
    eps: float = math.inf
    relative: bool = False


@dataclass(config=ConfigDict(extra="forbid"))
class CWL2:
    """Carlini-Wagner L2 by Adam, iterates projected onto the threat ball (see module docstring).

    eps / norm / relative: the threat ball the result must lie in; c: weight of the margin term
    (initial value when searching); kappa: confidence margin; n_iter: Adam steps per search step;
    lr: Adam step size (per coordinate, in units of the ball's per-coordinate size);
    binary_search_steps: 1 = fixed ``c``.
    """

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "l2"
    relative: bool = False
    c: float = Field(default=1.0, gt=0)
    kappa: float = Field(default=0.0, ge=0)
    n_iter: int = Field(default=100, ge=0)
    lr: float = Field(default=0.1, gt=0)
    binary_search_steps: int = Field(default=1, ge=1)

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.n_iter == 0:
            return z0
        labels = batch["labels"]
        dims = adapter.ball_dims
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        radius = adapter.radius(z0, batch, self)
        d = math.prod(z0.shape[i] for i in dims)  # entries per unit
        size = radius * (math.sqrt(d) if self.norm == "linf" else 1.0)  # unit's L2 size R
        scale = away_from_zero(size / math.sqrt(d))  # per-coordinate size s
        valid = _ValidSet()

        best = z0.clone()
        best_margin = torch.full(labels.shape, float("-inf"), device=z0.device, dtype=z0.dtype)
        found = torch.zeros_like(labels, dtype=torch.bool)
        c = torch.full(labels.shape, self.c, device=z0.device, dtype=z0.dtype)
        lo, hi = torch.zeros_like(c), torch.full_like(c, math.inf)

        def keep(z: Tensor, logits: Tensor | None) -> None:
            """Record the projected iterate (reusing ``logits`` when no example left the ball)."""
            nonlocal best, best_margin, found
            with torch.no_grad():
                zp = adapter.project(z, z0, batch, self)
                if logits is None or not torch.equal(zp, z):
                    logits = adapter.logits(zp, batch)
                margin = margin_loss(logits, labels)
                success = logits.argmax(-1) != labels
            take = (success & ~found) | (~found & ~success & (margin > best_margin))
            best = torch.where(broadcast_mask(take, z).bool(), zp, best)
            best_margin = torch.where(take, margin, best_margin)
            found = found | success

        for _ in range(self.binary_search_steps):
            w = torch.zeros_like(z0, requires_grad=True)
            opt = torch.optim.Adam([w], lr=self.lr)
            reached = torch.zeros_like(found)  # unprojected success (margin > kappa) at this c: drives the search
            for _ in range(self.n_iter):
                with torch.enable_grad():
                    z = z0 + w * scale * mask
                    logits = adapter.logits(z, batch)
                    margin = margin_loss(logits, labels)
                    dist = ((w * mask).pow(2).sum(dim=dims, keepdim=True) / d).flatten(1).sum(1)
                    objective = dist + c * (-margin).clamp_min(-self.kappa)
                    w.grad, = torch.autograd.grad(objective.sum(), w)  # no parameter grads
                reached |= margin.detach() > self.kappa
                keep(z.detach(), logits.detach())
                opt.step()
                with torch.no_grad():  # projected Adam: back onto the valid set (box / mask)
                    zv = adapter.project(z0 + w * scale * mask, z0, batch, valid)
                    w.copy_((zv - z0) / scale)
            with torch.no_grad():
                z = z0 + w * scale * mask
                logits = adapter.logits(z, batch)
                reached |= margin_loss(logits, labels) > self.kappa
            keep(z, logits)
            if found.all():
                break
            hi = torch.where(reached, torch.minimum(hi, c), hi)
            lo = torch.where(reached, lo, torch.maximum(lo, c))
            c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
        return best.detach()
