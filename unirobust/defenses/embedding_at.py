"""Continuous embedding-space adversarial training in the style of C-AdvUL (Xhonneux et al.,
"Efficient Adversarial Training in LLMs with Continuous Attacks", NeurIPS 2024).

Attack (as C-AdvUL's embedding attack): zero start, ``steps`` signed-gradient ascent steps on the
input embeddings, each followed by projection onto a per-token L2 ball whose radius is ``eps`` times
the embedding norm (the sst2 tasks' threat model: ``norm: l2, relative: true``); tokens that may not
move (padding, special tokens) stay put. Eval mode, unwrapped adapter, mode restored.

Loss (classification version):

    loss = adv_weight * CE(f(z_adv), y) + away_weight * UL(f(z_adv), y) + utility_weight * CE(f(z), y)
    UL = -log(1 - max_{k != y} p_k)     (unlikelihood of the most likely wrong class)

Defaults: steps 10 and eps 0.05 (their config; eps comes from the task threat / recipe attack),
adv_weight 1, away_weight 0, utility_weight 1 (their utility weight).

Departures: C-AdvUL trains generative LLMs on harmful prompts: a *toward* loss (likelihood of a
safe refusal, weight 0.5, cut off at 0.5) and an *away* loss (unlikelihood / negative CE of the
harmful completion, weight 0.5, cut off at -5) on the attacked prompt, plus a *utility* loss (SFT on
a separate clean dataset, weight 1). Here the toward loss is CE of the true class at the attacked
point, the away loss is the unlikelihood of the most likely wrong class (off by default), the
utility loss is CE on the clean batch itself, and there are no cut-offs. The radius is relative to
each token's own norm (the paper uses the mean norm of the vocabulary's embeddings), and the sign
step is ``alpha`` x radius in the ball's norm (the paper uses an absolute sign-SGD rate 1e-4).
The ball (``eps``, ``norm``, ``relative``) comes from ``attack``, so on pixels this is a zero-start
sign-gradient PGD-AT with a clean utility term; ``relative`` overrides the threat's choice for text.

Shapes: ``z`` is B x T x D (text) or B x C x H x W (vision); logits B x K.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import away_from_zero, eval_mode, unit_norm, unwrap


def sign_step(grad: Tensor, norm: str, dims: tuple[int, ...]) -> Tensor:
    """sign(grad), rescaled to unit size per ball unit in ``norm`` (Linf: itself; L2: / sqrt(#nonzero))."""
    s = grad.sign()
    return s if norm == "linf" else s / away_from_zero(unit_norm(s, "l2", dims))


def sign_pgd(model, batch: dict, ball: Any, steps: int, alpha: float) -> Tensor:
    """Zero-start signed-gradient ascent on CE inside ``ball``; returns z_adv (detached)."""
    adapter = unwrap(model)
    with eval_mode(adapter):
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
        if float(ball.eps) == 0 or steps == 0:
            return z0
        radius = adapter.radius(z0, batch, ball)
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        z = z0.clone()
        for _ in range(steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(adapter.logits(z, batch), batch["labels"], reduction="sum")
                grad, = torch.autograd.grad(loss, z)
            move = sign_step(grad * mask, ball.norm, adapter.ball_dims) * alpha * radius * mask
            z = adapter.project(z.detach() + move, z0, batch, ball).detach()
        return z


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class EmbeddingAT:
    attack: Any
    steps: int = Field(default=10, ge=0)
    alpha: float = Field(default=0.25, gt=0)
    relative: bool | None = None
    adv_weight: float = Field(default=1.0, ge=0)
    away_weight: float = Field(default=0.0, ge=0)
    utility_weight: float = Field(default=1.0, ge=0)

    def ball(self) -> SimpleNamespace:
        a = self.attack
        relative = self.relative if self.relative is not None else bool(getattr(a, "relative", False))
        return SimpleNamespace(eps=float(a.eps), norm=a.norm, relative=relative)

    def loss(self, model, batch: dict) -> dict:
        labels = batch["labels"]
        z_adv = sign_pgd(model, batch, self.ball(), self.steps, self.alpha)
        z = model.embed(batch)
        logits = model.logits(z + (z_adv - z.detach()), batch)
        adv = F.cross_entropy(logits, labels)
        loss = self.adv_weight * adv
        out = {"adv_loss": adv.detach()}
        if self.away_weight:
            from .mart import boosted_ce

            away = (boosted_ce(logits, labels) - F.cross_entropy(logits, labels, reduction="none")).mean()
            loss = loss + self.away_weight * away
            out["away_loss"] = away.detach()
        if self.utility_weight:
            clean_logits = model.logits(z, batch)
            utility = F.cross_entropy(clean_logits, labels)
            loss = loss + self.utility_weight * utility
            out["utility_loss"] = utility.detach()
            out["stats"] = {"clean_correct": float((clean_logits.argmax(-1) == labels).sum())}
        out.update(loss=loss, logits=logits)
        return out
