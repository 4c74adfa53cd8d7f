"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018): minimise the loss at the attack's point in the ball.

Re-weighting options (``reweight.py``): ``instance_reweight`` = KL coefficient of DRO instance
weights (Xu et al. 2023), ``class_reweight`` = hard-class pair upweighting.

Departures: ``clean_weight`` > 0 mixes in the clean loss (Goodfellow et al. 2015 style; 0 = Madry);
the adversarial point is re-attached to ``embed(batch)`` so that, for text, the embedding matrix
still receives gradients (as FreeLB does). The attack runs in eval mode on the unwrapped model.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from .reweight import Reweighting


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class PGDAT(Reweighting):
    attack: Any
    clean_weight: float = Field(default=0.0, ge=0, le=1)

    def loss(self, model, batch: dict) -> dict:
        z_adv = self.attack(model, batch)
        z = model.embed(batch)
        logits = model.logits(z + (z_adv - z.detach()), batch)
        per = F.cross_entropy(logits, batch["labels"], reduction="none")
        loss = self.reweighted_mean(model, per, batch["labels"], logits)
        out = {"adv_loss": loss.detach()}
        if self.clean_weight:
            clean_logits = model.logits(z, batch)
            clean = F.cross_entropy(clean_logits, batch["labels"])
            loss = (1 - self.clean_weight) * loss + self.clean_weight * clean
        out.update(loss=loss, logits=logits)
        return out
