"""FreeLB (Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language Understanding", ICLR 2020).

K ascent steps on the perturbation; *every* step's backward also accumulates parameter gradients,
so the model descends on the average loss over the K points of the ascent path:

    delta_0 ~ init in the ball
    for k = 1..K:  L_k = CE(f(embed(x) + delta_{k-1}), y);  backward(L_k / K)     # params accumulate
                   delta_k = project(delta_{k-1} + step * normalise(grad_delta L_k))
    optimizer step on sum_k grad L_k / K

``step(model, batch, backward)`` does exactly K forward and K backward passes (the training loop
calls it instead of ``loss`` + backward): ``delta`` is a leaf requiring grad, so the one backward per
step fills both ``delta.grad`` and the parameter gradients (for text the embedding matrix too, as
``embed`` is recomputed with a fresh graph every step). ``loss`` gives the same objective for callers
without a ``backward`` (it keeps K graphs alive and takes the ascent gradients with autograd.grad).

Defaults: K = 3 (``steps``); step = ``alpha`` x eps with ``alpha`` = 2.5 / K unless set (the
attack's own ``alpha`` / ``steps`` are not used); ``init`` = 1.0: start uniform in the ball (``init``
scales the radius; 0 = zero start). Budget (``eps``, ``norm``, ``relative``) from ``attack`` (recipe
``defense.attack`` + task threat); the attack object is not called. All K passes run in the model's
current (training) mode with *one* dropout mask per batch, as in the paper (its "FreeLB-syncdp"; the
reference code passes the first pass's ``dp_masks`` to the others): every pass starts from the same
random state, so the K gradients are of one sub-network; the random stream then moves on once per
batch, as a single pass would move it. ``same_dropout: false`` draws new masks in every pass
(unirobust before 2026-12-04): on MiniLM / 2,000 SST-2 sentences / one epoch it learned more
(clean 77.0 / 50.0 / 52.5 / 56.0 over seeds 0-3, against 49.5 on all four with shared masks, which
predicted one class), so at such short budgets it is worth trying.

Departures: the ball is the adapter's (per token for text, per image for vision) instead of the
paper's one L2 ball over the whole (sequence x hidden) perturbation, and its ``adv_init_mag`` /
``adv_lr`` / ``max_norm`` become ``init`` x radius / step / eps; the first K - 1 updates follow
the paper (the last step's gradient is only used for the parameters). For an Linf ball the step
follows ``sign(grad)`` (as PGD) instead of the reference code's ``grad / ||grad||_inf``. The default
step (2.5 / K of the radius, PGD's rule) is larger than the reference GLUE scripts' ``adv_lr`` /
``max_norm`` (about 1/6); set ``alpha`` to match them. Works on pixels as well.
Under DDP each of the K backward passes all-reduces (correct, but K x the communication; wrap the
first K - 1 in ``no_sync`` to save it).

Shapes: ``delta`` like ``z``: B x C x H x W (vision) or B x T x D (text); logits B x K_classes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import forked_rng, normalize_step, random_in_ball, unwrap


def same_random_state(device: torch.device, last: bool):
    """Context for one of FreeLB's K passes: all but the ``last`` run on a forked random state
    (restored after the pass), so every pass draws the same dropout masks; the last one advances
    the caller's stream as one pass would."""
    return contextlib.nullcontext() if last else forked_rng(device)


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class FreeLB:
    attack: Any
    steps: int = Field(default=3, ge=1)
    alpha: float | None = Field(default=None, gt=0)
    init: float = Field(default=1.0, ge=0, le=1)
    same_dropout: bool = True

    def _setup(self, model, batch: dict):
        adapter = unwrap(model)
        ball = self.attack
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
        radius = adapter.radius(z0, batch, ball)
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        step = (self.alpha if self.alpha is not None else 2.5 / self.steps) * radius
        delta = random_in_ball(z0, ball.norm, radius * self.init, adapter.ball_dims) * mask if self.init \
            else torch.zeros_like(z0)
        delta = adapter.project(z0 + delta, z0, batch, ball) - z0
        return adapter, z0, mask, step, delta.detach()

    def _ascend(self, adapter, z0, batch, mask, step, delta: Tensor, grad: Tensor) -> Tensor:
        move = normalize_step(grad, self.attack.norm, adapter.ball_dims) * step * mask
        return (adapter.project(z0 + delta.detach() + move, z0, batch, self.attack) - z0).detach()

    def step(self, model, batch: dict, backward: Callable[[Tensor], Any]) -> dict:
        adapter, z0, mask, step, delta = self._setup(model, batch)
        total = 0.0
        for k in range(self.steps):
            delta.requires_grad_(True)
            with same_random_state(z0.device, last=k + 1 == self.steps or not self.same_dropout):
                logits = model.logits(model.embed(batch) + delta, batch)
            loss = F.cross_entropy(logits, batch["labels"])
            backward(loss / self.steps)
            total = total + loss.detach()
            if k + 1 < self.steps:
                delta = self._ascend(adapter, z0, batch, mask, step, delta, delta.grad)
        return {"loss": total / self.steps, "logits": logits.detach()}

    def loss(self, model, batch: dict) -> dict:
        adapter, z0, mask, step, delta = self._setup(model, batch)
        losses = []
        for k in range(self.steps):
            delta.requires_grad_(True)
            with same_random_state(z0.device, last=k + 1 == self.steps or not self.same_dropout):
                logits = model.logits(model.embed(batch) + delta, batch)
            losses.append(F.cross_entropy(logits, batch["labels"]))
            if k + 1 < self.steps:
                grad, = torch.autograd.grad(losses[-1], delta, retain_graph=True)
                delta = self._ascend(adapter, z0, batch, mask, step, delta, grad)
        return {"loss": torch.stack(losses).mean(), "logits": logits}
