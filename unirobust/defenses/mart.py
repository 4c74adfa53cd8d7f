"""MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020).

    loss = BCE(p(z_adv), y) + lam * KL(p(z) || p(z_adv)) * (1 - p_y(z))
    BCE(p, y) = -log p_y - log(1 - max_{k != y} p_k)          (the "boosted" cross-entropy)

The misclassification-aware KL term up-weights examples the model gets wrong (low clean
probability of the true class). Constants (1.0001, 1e-12, 1.0000001) follow the reference code;
gradients flow through both distributions and through ``p_y(z)``.

The adversarial point is ``attack(model, batch)`` (the recipe's ``defense.attack``, default PGD with
the task's threat model), i.e. CE-PGD as in the paper. Defaults: lam 6 (the paper's ``beta`` for
CIFAR-10 / ResNet-18).

Departures: the attack's own random start (uniform in the ball for PGD) replaces the paper's
0.001 x N(0, 1) start. Optional (not in the paper): ``instance_reweight`` (KL coefficient of DRO
instance weights, see ``reweight.py``) and ``class_reweight`` (hard-class-pair weights).

Shapes: ``z`` is B x C x H x W (vision) or B x T x D (text); logits B x K.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from .reweight import Reweighting


def boosted_ce(adv_logits: Tensor, labels: Tensor) -> Tensor:
    """MART's BCE per example: CE plus -log(1 - p of the most likely wrong class)."""
    probs = F.softmax(adv_logits, dim=-1)
    top2 = probs.topk(2, dim=-1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    margin = F.nll_loss(torch.log(1.0001 - probs + 1e-12), wrong, reduction="none")
    return F.cross_entropy(adv_logits, labels, reduction="none") + margin


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class MART(Reweighting):
    attack: Any
    lam: float = Field(default=6.0, ge=0)

    def loss(self, model, batch: dict) -> dict:
        labels = batch["labels"]
        z_adv = self.attack(model, batch)
        z = model.embed(batch)
        clean_logits = model.logits(z, batch)
        adv_logits = model.logits(z + (z_adv - z.detach()), batch)
        bce = boosted_ce(adv_logits, labels)
        nat_probs = F.softmax(clean_logits, dim=-1)
        adv_probs = F.softmax(adv_logits, dim=-1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(-1)
        true_probs = nat_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        robust = kl * (1.0000001 - true_probs)
        loss = self.reweighted_mean(model, bce + self.lam * robust, labels, adv_logits)
        return {"loss": loss, "logits": adv_logits, "bce": bce.mean().detach(), "kl": robust.mean().detach(),
                "stats": {"clean_correct": float((clean_logits.argmax(-1) == labels).sum())}}
