"""Transfer attacks: craft on surrogate adapters, score on a target (see ``transfer_eval.py``).

- MI-FGSM: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
    g <- decay * g + grad / ||grad||_1 (per example);  z <- project(z + alpha * step(g))
- Input diversity (DI): Xie et al., "Improving Transferability of Adversarial Examples with Input
  Diversity", CVPR 2019. With probability ``diversity_prob`` per iteration the gradient is taken at a
  randomly shrunk (to ``resize_rate`` .. 1 of the side) and randomly zero-padded copy of the image.
  Vision only: on text models (no resizing of token embeddings) it is skipped with a warning.
- CWA: Chen et al., "Rethinking Model Ensemble in Transfer-based Adversarial Attacks", ICLR 2024.
  The Common Weakness Attack seeks a point that is a flat optimum *and* close to every surrogate's
  own optimum. Per outer step t, from z_t:
    1. reverse (sharpness-aware) step: z <- z_t - r * step(grad of the ensemble loss)
    2. cosine-similarity encourager: for each surrogate i in turn,
       m <- decay * m + grad_i / ||grad_i||_2;  z <- project(z + beta * m)
    3. outer momentum on the pseudo-gradient: M <- decay * M + (z - z_t) / ||z - z_t||_1;
       z_{t+1} = project(z_t + alpha * step(M))
  On a single adapter (not an ensemble) the loop has one surrogate (SAM + momentum).

All attacks run on the adapter's continuous input (pixels or token embeddings), in eval mode, with
the adapter's ball and mask; ``step`` is sign (Linf) or per-unit L2 normalisation (L2). An
:class:`~unirobust.models.ensemble.EnsembleAdapter` is attacked through its combined logits by
MI-FGSM / PGD (averaging-based ensemble attacks) and member by member by CWA.

Defaults and departures. MI-FGSM: alpha = eps / steps, 10 steps, decay 1 (the paper's settings).
DI: diversity_prob 0.5 for ``di-fgsm`` (M-DI2-FGSM), shrink-and-pad inside the original size
(the paper enlarges 299 -> [299, 330) and pads to 330; a fixed-size model input keeps the adapter
contract). CWA (defaults scaled from the release's ImageNet settings at eps 16/255): outer step eps/5,
reverse step eps/15, inner step ``inner_alpha`` = 10 x the L2 size of the ball (the release's 250
on 224 x 224 x 3 pixels); both momenta are normalised per example (the release normalises the outer
pseudo-gradient over the whole batch, which couples examples); every intermediate point is
projected onto the ball (the release does not project after the reverse step).
Shapes: ``z`` B x C x H x W (vision) or B x T x D (text); every attack returns the adversarial point.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import normalize_step, unit_norm
from .distill import IterativeBudget, l1_normalize
from .pgd import attack_loss, pick_targets, run_attack, start_in_ball

log = logging.getLogger(__name__)


def input_diversity(z: Tensor, prob: float, resize_rate: float) -> Tensor:
    """Xie et al.'s DI transform on images: with probability ``prob``, shrink to a random side in
    [resize_rate * H, H] and zero-pad back to H x W at a random offset (differentiable in ``z``)."""
    if prob <= 0 or torch.rand(()) >= prob:
        return z
    H, W = z.shape[-2:]
    side = int(torch.randint(max(1, int(H * resize_rate)), H + 1, ()))
    width = max(1, round(side * W / H))
    small = F.interpolate(z, size=(side, width), mode="nearest")
    top, left = int(torch.randint(0, H - side + 1, ())), int(torch.randint(0, W - width + 1, ()))
    return F.pad(small, (left, W - width - left, top, H - side - top))


def _diversity_for(adapter, prob: float) -> float:
    """``prob`` on images; 0 (with a warning) elsewhere: resizing has no token-embedding form."""
    if prob > 0 and adapter.modality != "vision":
        log.warning("input diversity (Xie et al. 2019) resizes images; on a %s model it is skipped "
                    "(the attack runs as MI-FGSM)", adapter.modality)
        return 0.0
    return prob


def surrogate_logit_fns(adapter) -> list:
    """One ``f(z, batch) -> logits`` per surrogate: an ensemble's members, or the adapter itself."""
    if hasattr(adapter, "member_logit"):
        return [lambda z, b, i=i: adapter.member_logit(i, z, b) for i in range(len(adapter.members))]
    return [adapter.logits]


@dataclass(config=ConfigDict(extra="forbid"))
class MomentumBudget(IterativeBudget):
    """:class:`IterativeBudget` plus gradient momentum (``decay``), input diversity and targeting."""

    decay: float = Field(default=1.0, ge=0)
    diversity_prob: float = Field(default=0.0, ge=0, le=1)
    resize_rate: float = Field(default=0.9, gt=0, le=1)
    targeted: bool = False


@dataclass(config=ConfigDict(extra="forbid"))
class MIFGSM(MomentumBudget):
    """Momentum iterative FGSM; ``diversity_prob`` > 0 adds input diversity (vision)."""

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.steps == 0:
            return z0
        diversity = _diversity_for(adapter, self.diversity_prob)
        labels = batch["labels"]
        targets = pick_targets(batch, adapter.num_classes) if self.targeted else None
        mask, radius, z = start_in_ball(adapter, z0, batch, self, self.random_start)
        step = self.step_size * radius / self.eps
        g = torch.zeros_like(z0)
        for _ in range(self.steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                x = input_diversity(z, diversity, self.resize_rate)
                loss = attack_loss(adapter.logits(x, batch), labels, targets).sum()
                grad, = torch.autograd.grad(loss, z)
            g = self.decay * g + l1_normalize(grad * mask)
            move = normalize_step(g, self.norm, adapter.ball_dims) * step * mask
            z = adapter.project(z.detach() + move, z0, batch, self).detach()
        return z


@dataclass(config=ConfigDict(extra="forbid"))
class DIMIFGSM(MIFGSM):
    """M-DI2-FGSM: MI-FGSM with input diversity at probability 0.5 (Xie et al. 2019)."""

    diversity_prob: float = Field(default=0.5, ge=0, le=1)


@dataclass(config=ConfigDict(extra="forbid"))
class CWA(MomentumBudget):
    """Common Weakness Attack over an ensemble's members (or one adapter). See the module docstring."""

    #: ``alpha`` is CWA's outer step, not the PGD step size a task's ``threat.alpha`` gives
    takes_task_alpha: ClassVar[bool] = False
    alpha: float | None = Field(default=None, gt=0, description="outer step; default eps / 5")
    reverse_step: float | None = Field(default=None, ge=0, description="sharpness step; default eps / 15")
    inner_alpha: float = Field(default=10.0, ge=0, description="inner step in L2 sizes of the ball")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / 5

    def __call__(self, model, batch: dict) -> Tensor:
        return run_attack(model, batch, self._run)

    def _grad(self, fn, z: Tensor, batch: dict, labels, targets, mask) -> Tensor:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            x = input_diversity(z, self._diversity, self.resize_rate)
            loss = attack_loss(fn(x, batch), labels, targets).sum()
            grad, = torch.autograd.grad(loss, z)
        return grad * mask

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0 or self.steps == 0:
            return z0
        self._diversity = _diversity_for(adapter, self.diversity_prob)
        labels = batch["labels"]
        targets = pick_targets(batch, adapter.num_classes) if self.targeted else None
        mask, radius, z = start_in_ball(adapter, z0, batch, self, self.random_start)
        scale = radius / self.eps
        outer = self.step_size * scale
        reverse = (self.reverse_step if self.reverse_step is not None else self.eps / 15) * scale
        dims = tuple(range(1, z0.dim()))
        full = radius.expand_as(z0) * mask  # the ball's per-entry radius on what may move
        size = unit_norm(full, "l2", dims)  # L2 length of the Linf ball's corner, per example
        if self.norm == "l2":
            unit = 1
            for d in adapter.ball_dims:
                unit *= z0.shape[d]
            size = size / unit ** 0.5  # sqrt(sum of squared unit radii): the L2 ball's size
        inner = self.inner_alpha * size
        fns = surrogate_logit_fns(adapter)
        m_inner = torch.zeros_like(z0)
        m_outer = torch.zeros_like(z0)
        for _ in range(self.steps):
            start = z
            grad = self._grad(adapter.logits, z, batch, labels, targets, mask)
            z = adapter.project(z - normalize_step(grad, self.norm, adapter.ball_dims) * reverse * mask,
                                z0, batch, self)
            for fn in fns:
                grad = self._grad(fn, z, batch, labels, targets, mask)
                m_inner = self.decay * m_inner + normalize_step(grad, "l2", dims)
                z = adapter.project(z + inner * m_inner * mask, z0, batch, self).detach()
            m_outer = self.decay * m_outer + l1_normalize(z - start)
            z = adapter.project(start + normalize_step(m_outer, self.norm, adapter.ball_dims) * outer * mask,
                                z0, batch, self).detach()
        return z
