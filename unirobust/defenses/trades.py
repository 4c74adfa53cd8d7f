"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019).

    loss = CE(f(z), y) + beta * KL(p(z) || p(z_adv)),   z_adv = argmax_{z' in ball} KL(p(z) || p(z'))

The inner maximisation is PGD on the KL divergence (not on CE) from a small Gaussian start
``z + init_std * N(0, 1)``, with the clean distribution ``p(z)`` fixed (computed once, eval mode, no
gradient), exactly as the reference code. The outer KL is ``sum_k p_k(z) log(p_k(z) / p_k(z_adv))``
averaged over the batch, with gradients through both distributions (as in the paper's code).

Budget: ``eps``, ``norm``, ``relative``, ``steps`` and the step size (``attack.step_size``: the
recipe's ``alpha`` or 2.5 eps / steps) come from ``attack`` (the recipe's ``defense.attack``, whose
missing keys the task's threat model fills); the attack object itself is not called, only its budget.
Defaults: beta 6 (the paper's CIFAR-10 setting; 1/lambda in its notation), init_std 0.001.

Departures: the start noise is in units of the attack's eps (``init_std * radius / eps`` per ball
unit, so 0.001 pixels for vision, 0.001 x the token norm for relative text budgets) and is zero on
tokens that may not move; L2 budgets use normalised-gradient steps (the paper's L2 variant uses an
SGD inner optimiser); the paper's step size (0.007 for eps 0.031, 10 steps) is not hard-coded.
Optional (not in the paper): ``instance_reweight`` (KL coefficient of DRO instance weights, see
``reweight.py``) and ``class_reweight`` (hard-class-pair weights) re-weight the per-example objective.

Shapes: ``z`` is B x C x H x W (vision) or B x T x D (text); logits B x K.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import eval_mode, normalize_step, unwrap
from .reweight import Reweighting


def step_size_of(attack: Any, steps: int) -> float:
    """The attack's PGD step size (its ``step_size``, else its ``alpha``, else 2.5 eps / steps)."""
    size = getattr(attack, "step_size", None) or getattr(attack, "alpha", None)
    return float(size) if size else 2.5 * float(attack.eps) / max(steps, 1)


def kl_pgd(model, batch: dict, attack: Any, init_std: float = 0.001) -> Tensor:
    """TRADES's inner attack: PGD ascent on KL(p(z0) || p(z)) inside ``attack``'s ball. Returns z_adv (detached).

    Runs in eval mode on the unwrapped adapter and restores the mode.
    """
    adapter = unwrap(model)
    with eval_mode(adapter):
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
            p_clean = F.softmax(adapter.logits(z0, batch), dim=-1)
        eps, steps = float(attack.eps), int(getattr(attack, "steps", 10))
        if eps == 0 or steps == 0:
            return z0
        radius = adapter.radius(z0, batch, attack)
        scale = radius / eps
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        step = step_size_of(attack, steps) * scale
        z = adapter.project(z0 + init_std * scale * torch.randn_like(z0) * mask, z0, batch, attack).detach()
        for _ in range(steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                log_p_adv = F.log_softmax(adapter.logits(z, batch), dim=-1)
                kl = F.kl_div(log_p_adv, p_clean, reduction="sum")
                grad, = torch.autograd.grad(kl, z)
            move = normalize_step(grad, attack.norm, adapter.ball_dims) * step * mask
            z = adapter.project(z.detach() + move, z0, batch, attack).detach()
        return z


def kl_per_example(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) per example (B)."""
    return F.kl_div(F.log_softmax(q_logits, dim=-1), F.log_softmax(p_logits, dim=-1), reduction="none",
                    log_target=True).sum(-1)


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class TRADES(Reweighting):
    attack: Any
    beta: float = Field(default=6.0, ge=0)
    init_std: float = Field(default=0.001, ge=0)

    def loss(self, model, batch: dict) -> dict:
        labels = batch["labels"]
        z_adv = kl_pgd(model, batch, self.attack, self.init_std)
        z = model.embed(batch)
        clean_logits = model.logits(z, batch)
        adv_logits = model.logits(z + (z_adv - z.detach()), batch)
        ce = F.cross_entropy(clean_logits, labels, reduction="none")
        kl = kl_per_example(clean_logits, adv_logits)
        loss = self.reweighted_mean(model, ce + self.beta * kl, labels, adv_logits)
        return {"loss": loss, "logits": adv_logits, "clean_loss": ce.mean().detach(), "kl": kl.mean().detach(),
                "stats": {"clean_correct": float((clean_logits.argmax(-1) == labels).sum())}}
