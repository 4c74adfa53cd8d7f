"""Interpolated adversarial training (IAT; Lamb et al., "Interpolated Adversarial Training: Achieving
Robust Neural Networks without Sacrificing Too Much Accuracy", AISec 2019).

Adversarial points are made on the clean batch (``attack(model, batch)``, default PGD with the
task's threat model); then mixup (Zhang et al. 2018) is applied to the clean batch and, separately
(own lambda, own pairing), to the adversarial batch:

    lam ~ Beta(alpha, alpha),  z~ = lam z + (1 - lam) z[perm],
    L_mix(z) = lam CE(f(z~), y) + (1 - lam) CE(f(z~), y[perm])
    loss = (L_mix(z) + L_mix(z_adv)) / 2

Default alpha 1.0 (input mixup, as in the paper's Mixup variant).

Departures: ``lam`` is folded to ``max(lam, 1 - lam)`` (with a uniformly random pairing this leaves
the distribution of mixed pairs unchanged) so that the batch's own label dominates, and the
returned ``logits`` (the mixed adversarial batch) give a meaningful training accuracy. For text the
token embeddings are mixed position by position (wordMixup, Guo et al. 2019) and the attention
mask is the union of the two examples' masks; other batch keys (token types) are the dominant
example's. Manifold mixup (the paper's other variant) is not implemented.

Shapes: ``z`` is B x C x H x W (vision) or B x T x D (text); logits B x K.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor


def mix_batch(batch: dict, perm: Tensor) -> dict:
    """The batch a mixed input is fed with: ``attention_mask`` becomes the union of the pair's masks."""
    if "attention_mask" not in batch:
        return batch
    mask = batch["attention_mask"]
    return {**batch, "attention_mask": torch.maximum(mask, mask[perm])}


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class IAT:
    attack: Any
    alpha: float = Field(default=1.0, gt=0)

    def _mixup(self, model, z: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
        labels = batch["labels"]
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(len(labels), device=labels.device)
        logits = model.logits(lam * z + (1 - lam) * z[perm], mix_batch(batch, perm))
        loss = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
        return loss, logits

    def loss(self, model, batch: dict) -> dict:
        z_adv = self.attack(model, batch)
        z = model.embed(batch)
        clean, _ = self._mixup(model, z, batch)
        adv, logits = self._mixup(model, z + (z_adv - z.detach()), batch)
        return {"loss": (clean + adv) / 2, "logits": logits, "clean_mix_loss": clean.detach(),
                "adv_mix_loss": adv.detach()}
