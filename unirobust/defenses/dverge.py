"""DVERGE (Yang et al., "DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation of
Ensembles", NeurIPS 2020): train an ensemble whose members are vulnerable in different directions.

Per batch (sources x_s, y_s) and targets x_t (another example of the batch for each source):

    for each member i:  x'_i = argmin_{x in ball(x_s)} || f_i^l(x) - f_i^l(x_t) ||^2     (feature distillation)
    loss = sum_i [ sum_{j != i} CE(f_i(x'_j), y_s)  +  clean_weight * CE(f_i(x_s), y_s) ]

x'_j looks like x_s but carries x_t's non-robust features *for member j*; training every other member
to keep y_s on it removes the vulnerability member j has from the rest (the paper's round-robin:
every member distils, every other member learns from it). Summing the members' losses with one
optimizer equals the paper's one optimizer per member for AdamW (per-parameter, members share no
weights); with SGD it is the same too, since each member's gradient is that of its own term (global
gradient clipping, ``train.grad_clip``, is the one thing that couples them).

Options: ``layer``: the distillation layer — None: each member's own ``feature_layer`` (recipe
``model.options.feature_layer``, or per member in ``model.ensemble``); an int: that layer of every
member; a list: one drawn at random per step (the paper draws one of ResNet-20's 20 layers per
epoch). ``steps`` (10), ``alpha`` (eps / steps), ``momentum`` (1.0) and ``random_start`` (off) are the
distillation attack's (paper defaults); its budget (eps, norm, relative) comes from ``attack``
(recipe ``defense.attack``, missing keys from the task's threat model). ``clean_weight``: optional CE
on the clean sources (0 = the objective above as in the release).

Text: distillation runs in embedding space on the ensemble's shared point (see
``models/ensemble.py``); features are the chosen layer's hidden states mean-pooled over each
sequence's own real tokens, so a source and its target need no length alignment (both sit in the
same padded batch, each pooled under its own attention mask). Only the source's perturbable tokens move.

Departures: targets are a random derangement of the same batch (the release draws them from a
second, independently shuffled loader); the layer is drawn per step, not per epoch; distillation
runs in eval mode (see ``attacks/distill.py``); each member's N - 1 distilled batches and the clean
batch go through it in one forward (one call through the wrapped model, DDP-safe), so BatchNorm
batch statistics mix them (the release runs one forward per distilled batch, no clean pass). The
clean pass is always made (it gives the training accuracy); ``clean_weight`` only sets its loss weight.
The release's ``--plus-adv`` variant (adding PGD-AT per member) is not built. The release starts
DVERGE from a trained baseline ensemble (``--start-from baseline``: 200 epochs of independent
training); here the members start from whatever their specs load (from scratch for a timm
architecture without weights). The release's ensemble output, which its white-box and transfer
evaluations attack, is the mean of the members' probabilities: recipe ``model.ensemble: {members: 3,
combine: probs}``; the default ``combine: logits`` averages logits.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.distill import FeatureDistillation
from .diversity import ensemble_of, repeat_batch, take_rows

log = logging.getLogger(__name__)


def derangement(n: int, device=None) -> Tensor:
    """A random permutation with no fixed point (n > 1): a random cycle through all n indices."""
    order = torch.randperm(n).to(device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return perm


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class DVERGE:
    attack: Any
    layer: int | list[int] | None = None
    steps: int = Field(default=10, ge=1)
    alpha: float | None = Field(default=None, gt=0)
    momentum: float = Field(default=1.0, ge=0)
    random_start: bool = False
    clean_weight: float = Field(default=0.0, ge=0)
    _warned_single: ClassVar[bool] = False

    def _layer(self) -> int | None:
        if isinstance(self.layer, list):
            return int(self.layer[int(torch.randint(len(self.layer), ()))])
        return self.layer

    def distiller(self, layer: int | None) -> FeatureDistillation:
        a = self.attack
        return FeatureDistillation(eps=float(a.eps), norm=a.norm, relative=bool(getattr(a, "relative", False)),
                                   steps=self.steps, alpha=self.alpha, momentum=self.momentum,
                                   random_start=self.random_start, layer=layer)

    def loss(self, model, batch: dict) -> dict:
        ens = ensemble_of(model, "dverge", minimum=2)
        n, labels = len(ens), batch["labels"]
        b = len(labels)
        if b < 2 and not self._warned_single:
            self._warned_single = True
            log.warning("dverge: a batch of one example (an epoch's last batch, or one example per process) "
                        "has no other example to distil toward; it trains on its clean example only")
        targets = take_rows(batch, derangement(b, labels.device))
        distil = self.distiller(self._layer())
        distilled = [distil(ens, batch, targets, member=i) for i in range(n)]
        big = repeat_batch(batch, n)  # rows: n - 1 distilled copies, then the clean batch
        z = model.embed(big)
        inputs = []
        for i in range(n):
            moved = torch.cat([distilled[j] for j in range(n) if j != i] + [z[:b].detach()])
            inputs.append(z + (moved - z.detach()))  # re-attached: text embeddings get gradients
        out = model.logits(inputs, big)  # n x (n * b) x K, one call through the wrapped model
        y = big["labels"]
        split = (n - 1) * b
        distill_ce = torch.stack([F.cross_entropy(out[i, :split], y[:split]) for i in range(n)])
        clean_ce = torch.stack([F.cross_entropy(out[i, split:], labels) for i in range(n)])
        loss = ((n - 1) * distill_ce + self.clean_weight * clean_ce).sum()
        clean_logits = ens.combine_logits(out[:, split:]).detach()
        hit = out[:, :split].argmax(-1) == y[:split]  # every member on the others' distilled copies
        return {"loss": loss, "logits": clean_logits, "distill_loss": distill_ce.mean().detach(),
                "clean_loss": clean_ce.mean().detach(),
                "stats": {"distilled_correct": float(hit.sum()), "distilled_seen": float(hit.numel())}}
