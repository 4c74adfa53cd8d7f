"""Friendly adversarial training (FAT; Zhang et al., "Attacks Which Do Not Kill Training Make
Adversarial Learning Stronger", ICML 2020).

The adversary is early-stopped PGD: each example is moved until it first becomes misclassified,
then ``tau`` more steps (``tau = 0``: stop at the first misclassified point), or until the step
budget ends; the model then minimises CE at those "friendly" points:

    loss = CE(f(z_adv), y),   z_adv = early_stopped_pgd(z)

Budget: ``eps``, ``norm``, ``relative``, the step budget K (``attack.steps``) and the step size
(``attack.step_size``) come from ``attack`` (the recipe's ``defense.attack`` with the task's threat
filled in); the attack object is not called. Start: uniform in the ball (the reference code's
``uniform_randominit``); each step adds ``omega`` x N(0, 1) noise (paper default 0.001). Only the
examples still being attacked are forwarded, so early stopping really saves compute.

``stats``: ``fat_steps`` = attack steps taken, summed over the batch's examples, and ``n_examples``
(the loop sums stats over an epoch, so mean steps per example = fat_steps / n_examples).

Departures: ``tau`` is fixed (the paper's default schedule raises it from 0 to 1 to 2 over
training, "dynamic tau"; use a later run or an override for that); noise and start are in units of
the attack's eps (per-token radius for relative text budgets). Optional (not in the paper):
``instance_reweight`` / ``class_reweight`` (see ``reweight.py``).

Shapes: ``z`` is B x C x H x W (vision) or B x T x D (text); step counts B (long).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import eval_mode, normalize_step, random_in_ball, unwrap
from .reweight import Reweighting
from .trades import step_size_of


def subset_batch(batch: dict, idx: Tensor) -> dict:
    """The examples ``idx`` of a batch dict (every tensor whose first dim is the batch)."""
    n = len(batch["labels"])
    return {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()}


def early_stopped_pgd(model, batch: dict, attack: Any, tau: int = 0, omega: float = 0.001,
                      random_start: bool = True) -> tuple[Tensor, Tensor]:
    """FAT's adversary. Returns ``(z_adv, steps)``: the detached points (B x ...) and the number of
    PGD steps each example took (B, long). Eval mode on the unwrapped adapter; mode restored."""
    adapter = unwrap(model)
    with eval_mode(adapter):
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
        labels = batch["labels"]
        steps_taken = torch.zeros_like(labels)
        eps, budget = float(attack.eps), int(getattr(attack, "steps", 10))
        if eps == 0 or budget == 0:
            return z0, steps_taken
        radius = adapter.radius(z0, batch, attack)
        scale = radius / eps
        step = step_size_of(attack, budget) * scale
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        z = z0 + random_in_ball(z0, attack.norm, radius, adapter.ball_dims) * mask if random_start else z0
        z = adapter.project(z, z0, batch, attack).detach()
        control = torch.full_like(labels, int(tau))
        active = torch.ones_like(labels, dtype=torch.bool)
        for _ in range(budget):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            sub = subset_batch(batch, idx)
            zi = z[idx].requires_grad_(True)
            with torch.enable_grad():
                logits = adapter.logits(zi, sub)
                grad, = torch.autograd.grad(F.cross_entropy(logits, labels[idx], reduction="sum"), zi)
            wrong = logits.detach().argmax(-1) != labels[idx]
            finish = wrong & (control[idx] == 0)
            control[idx] -= (wrong & ~finish).to(control.dtype)
            active[idx[finish]] = False
            go = ~finish
            move = normalize_step(grad, attack.norm, adapter.ball_dims) * step[idx]
            if omega:
                move = move + omega * scale[idx] * torch.randn_like(move)
            moved = adapter.project(zi.detach() + move * mask[idx], z0[idx], sub, attack)
            z[idx[go]] = moved[go]
            steps_taken[idx[go]] += 1
        return z.detach(), steps_taken


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class FAT(Reweighting):
    attack: Any
    tau: int = Field(default=0, ge=0)
    omega: float = Field(default=0.001, ge=0)
    random_start: bool = True

    def loss(self, model, batch: dict) -> dict:
        labels = batch["labels"]
        z_adv, steps = early_stopped_pgd(model, batch, self.attack, self.tau, self.omega, self.random_start)
        z = model.embed(batch)
        logits = model.logits(z + (z_adv - z.detach()), batch)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = self.reweighted_mean(model, ce, labels, logits)
        return {"loss": loss, "logits": logits,
                "stats": {"fat_steps": float(steps.sum()), "n_examples": float(len(labels))}}
