"""APGD-CE and APGD-DLR, written once for every adapter (pixels or token embeddings).

Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (AutoAttack); reference code ``autoattack/autopgd_base.py``.

Distance: Linf or L2, per ball unit (the whole image for vision, one token for text), radius from
``adapter.radius`` (so relative, norm-scaled text budgets work); only ``adapter.perturbable`` entries
move. Shapes: ``z0 = adapter.embed(batch)`` is B x C x H x W or B x T x D; ``__call__`` returns the
adversarial point, same shape, detached.

The algorithm (Alg. 1 of the paper), per example:

- start at a random point on the ball's surface (Linf: a uniform draw scaled so its largest entry
  is eps; L2: a Gaussian direction of length eps), projected onto the valid set;
- step size eta = 2 eps at first, **per example** (a B-vector, times each unit's radius);
- momentum 0.75: ``z' = P(z + eta * dir(grad))``, ``z_new = P(z + 0.75 (z' - z) + 0.25 (z - z_prev))``
  (no momentum on the first step); ``dir`` is ``sign`` for Linf and grad / ||grad||_2 per unit for L2;
- checkpoints (:func:`checkpoints`): the first after ``p_1 = 0.22`` of the budget, then the gap
  shrinks by ``0.03`` of the budget per checkpoint down to ``0.06``
  (``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, with AutoAttack's integer rounding:
  22, 41, 57, 70, 80, 87, 93, 99 for 100 iterations); at a checkpoint the step size of an
  example is halved when (1) its loss increased in at most ``rho = 0.75`` of the steps since the last
  checkpoint, or (2) its step size was not halved at the last checkpoint and its best loss did not
  improve since; a halved example restarts from its best point (and that point's gradient);
- the point returned is the last misclassified iterate if any, else the highest-loss iterate;
  ``restarts`` re-run the attack only on examples still unbroken (AutoAttack's cheap mode),
  keeping per example the first success or else the highest loss over restarts; examples already
  misclassified at the clean point are returned unchanged and cost no gradient (as in AutoAttack).

Losses: ``APGDCE`` ascends cross-entropy; ``APGDDLR`` ascends the Difference of Logits Ratio
``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` (pi sorts the logits decreasingly), which is
invariant to shifting and scaling the logits. DLR needs at least 3 classes; with 2 classes
``APGDDLR`` falls back to the unnormalised margin ``max_{i != y} z_i - z_y`` (and logs that it did).

Departures: the radius is per unit (per token for text) and steps are scaled by it; the
oscillation count at the first checkpoint compares against the loss of the starting point (AutoAttack
compares against an unfilled zero row there); no EOT and no targeted version (APGD-T) yet; the
budget is ``n_iter`` (default 100, the paper's) rather than ``steps``, so a task's PGD ``steps`` is not
filled in by ``build_attack``; the global RNG is used (no per-call ``seed``).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import away_from_zero, normalize_step, unit_norm
from .pgd import broadcast_mask, run_attack

log = logging.getLogger(__name__)

_WARNED_TWO_CLASS = False


# ----------------------------------------------------------------------------- losses


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example ``max_{i != y} z_i - z_y``: positive exactly when the example is misclassified."""
    true = logits.gather(-1, labels[:, None]).squeeze(-1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf")).amax(-1)
    return other - true


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` (Croce & Hein 2020).

    With fewer than 3 classes there is no third logit: falls back to :func:`margin_loss`.
    """
    if logits.shape[-1] < 3:
        global _WARNED_TWO_CLASS
        if not _WARNED_TWO_CLASS:
            log.warning("DLR loss needs >= 3 classes; with %d classes APGD-DLR uses the margin loss "
                        "max_{i!=y} z_i - z_y instead (not scale invariant)", logits.shape[-1])
            _WARNED_TWO_CLASS = True
        return margin_loss(logits, labels)
    top = logits.topk(3, dim=-1).values
    return margin_loss(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which APGD checks its step sizes (AutoAttack's schedule).

    The first after ``max(int(0.22 n), 1)`` iterations; each later gap is the previous one minus
    ``max(int(0.03 n), 1)``, but at least ``max(int(0.06 n), 1)``. For n = 100: 22, 41, 57, 70, 80, 87,
    93, 99 — the paper's p_j = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99.
    """
    gap, gap_min, decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, at = [], gap
    while at <= n_iter:
        out.append(at)
        gap = max(gap - decr, gap_min)
        at += gap
    return out


def rows(batch: dict, idx: Tensor) -> dict:
    """The rows ``idx`` of every per-example tensor of a batch dict."""
    return {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- attack


@dataclass(config=ConfigDict(extra="forbid"))
class _APGD:
    """Auto-PGD; subclasses fix the loss. See the module docstring for the algorithm.

    eps: ball radius (pixels, or embedding units / fraction of the token norm with ``relative``);
    n_iter: iterations per restart (one forward + backward each, plus one at the start);
    restarts: runs, each on the still-unbroken examples; rho: the oscillation threshold;
    random_start: start on the ball's surface (AutoAttack always does) or at the clean point.
    """

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    n_iter: int = Field(default=100, ge=0)
    restarts: int = Field(default=1, ge=1)
    rho: float = Field(default=0.75, gt=0, le=1)
    random_start: bool = True
    relative: bool = False

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-example loss the attack ascends."""
        raise NotImplementedError

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.n_iter == 0:
            return z0
        labels = batch["labels"]
        out = z0.clone()
        best_loss = torch.full(labels.shape, float("-inf"), device=z0.device, dtype=z0.dtype)
        with torch.no_grad():  # already misclassified: nothing to do (AutoAttack attacks only the rest)
            found = adapter.logits(z0, batch).argmax(-1) != labels
        for _ in range(self.restarts):
            idx = (~found).nonzero().squeeze(-1)
            if len(idx) == 0:
                break
            whole = len(idx) == len(labels)
            sub = batch if whole else rows(batch, idx)
            z_best, loss_best, success, z_success = self._single_run(adapter, sub, z0[idx], labels[idx])
            cand = torch.where(broadcast_mask(success, z_best).bool(), z_success, z_best)
            take = success | (loss_best > best_loss[idx])
            out[idx] = torch.where(broadcast_mask(take, cand).bool(), cand, out[idx])
            best_loss[idx] = torch.where(take, loss_best, best_loss[idx])
            found[idx] = success
        return out.detach()

    def _grad(self, adapter, batch: dict, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.logits(z, batch)
            loss = self.loss(logits, labels)
            grad, = torch.autograd.grad(loss.sum(), z)
        return logits.detach(), loss.detach(), grad.detach()

    def _single_run(self, adapter, batch: dict, z0: Tensor, labels: Tensor):
        """One APGD run: (highest-loss point, its loss, misclassified-at-some-step flags, last such point)."""
        dims = adapter.ball_dims
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        radius = adapter.radius(z0, batch, self)
        check_at = set(checkpoints(self.n_iter))

        if self.random_start:
            t = (torch.rand_like(z0) * 2 - 1 if self.norm == "linf" else torch.randn_like(z0)) * mask
            t = t / away_from_zero(unit_norm(t, self.norm, dims))
            z = adapter.project(z0 + t * radius, z0, batch, self).detach()
        else:
            z = z0.clone()
        logits, loss, grad = self._grad(adapter, batch, z, labels)

        per_example = (-1,) + (1,) * (z0.dim() - 1)
        eta = torch.full(labels.shape, 2.0, device=z0.device, dtype=z0.dtype)  # step size / radius, per example
        z_prev = z
        z_best, grad_best, loss_best = z.clone(), grad.clone(), loss.clone()
        success = logits.argmax(-1) != labels
        z_success = z.clone()
        history = [loss]  # losses since the last checkpoint, starting with the one at it
        loss_best_at_check = loss_best.clone()
        halved_at_check = torch.ones_like(success)

        for i in range(self.n_iter):
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                step = eta.view(per_example) * radius
                z1 = adapter.project(z + step * normalize_step(grad, self.norm, dims) * mask, z0, batch, self)
                z1 = adapter.project(z + (z1 - z) * a + (z - z_prev) * (1 - a), z0, batch, self)
                z_prev, z = z, z1.detach()
            logits, loss, grad = self._grad(adapter, batch, z, labels)

            wrong = logits.argmax(-1) != labels
            z_success = torch.where(broadcast_mask(wrong, z).bool(), z, z_success)
            success |= wrong
            better = loss > loss_best
            b = broadcast_mask(better, z).bool()
            z_best, grad_best = torch.where(b, z, z_best), torch.where(b, grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)

            history.append(loss)
            if i + 1 in check_at:
                h = torch.stack(history)
                k = len(history) - 1  # iterations since the last checkpoint
                oscillating = (h[1:] > h[:-1]).sum(0) <= k * self.rho
                stalled = ~halved_at_check & (loss_best_at_check >= loss_best)
                halve = oscillating | stalled
                halved_at_check, loss_best_at_check = halve, loss_best.clone()
                if halve.any():
                    eta = torch.where(halve, eta / 2, eta)
                    hb = broadcast_mask(halve, z).bool()
                    z, grad = torch.where(hb, z_best, z), torch.where(hb, grad_best, grad)
                history = [history[-1]]
        return z_best, loss_best, success, z_success


@dataclass(config=ConfigDict(extra="forbid"))
class APGDCE(_APGD):
    """APGD ascending the cross-entropy loss (AutoAttack's first attack)."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")


@dataclass(config=ConfigDict(extra="forbid"))
class APGDDLR(_APGD):
    """APGD ascending the DLR loss (margin loss with 2 classes; see :func:`dlr_loss`)."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return dlr_loss(logits, labels)
