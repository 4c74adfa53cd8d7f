"""Re-weighting of adversarial training losses: per instance (KL-regularised DRO) and per class.

Both return *detached* weights with mean 1, so a weighted mean of per-example losses keeps the scale
of the unweighted mean (learning rates need not change when weighting is switched on).

- ``dro_instance_weights(losses, kl_coef)``: the closed form of the inner maximisation
  ``max_{w in simplex} sum_i w_i l_i - kl_coef * KL(w || uniform)``, i.e. ``softmax(l / kl_coef) * n``.
  Xu et al., "Doubly Robust Instance-Reweighted Adversarial Training" (arXiv 2308.00311, 2023)
  derive instance weights of this KL-regularised DRO form for the per-example adversarial losses.
  Departure: the paper embeds them in a bilevel (compositional) optimisation with its own solver;
  here the closed form is applied to the current batch and the weights are constants (no gradient
  flows through them).
  Small ``kl_coef`` -> focus on the worst examples; large -> uniform weights.
- ``class_weights(confusion, strength)``: hard-class-pair up-weighting from a running matrix of
  *adversarial* confusions (rows: true class, columns: predicted class, row-normalised). Class pairs
  that the adversary confuses most (Tian et al., "Analysis and Applications of Class-wise
  Robustness in Adversarial Training", KDD 2021, show robust error concentrates on a few
  confusable pairs) get larger weights: ``h_c = max_j (C[c, j] + C[j, c])`` over ``j != c``,
  ``w_c = 1 + strength * h_c``, normalised to mean 1 over classes. This exact form is ours (a simple,
  bounded heuristic), not a published algorithm; WAT (Li & Liu, AAAI 2023) and CFA (Wei et al.,
  CVPR 2023) are published alternatives that also re-weight classes by their robust error.
- ``ClassConfusion``: the running (exponential moving average) adversarial confusion matrix a
  defense keeps between batches. It is per process (not synchronised under DDP).

Shapes: ``losses`` B; ``confusion`` K x K; ``labels`` / ``preds`` B (long). Weights: B or K.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import unwrap


def dro_instance_weights(losses: Tensor, kl_coef: float) -> Tensor:
    """``softmax(losses / kl_coef) * n``: KL-regularised DRO weights over the batch (B, mean 1, detached)."""
    if kl_coef <= 0:
        raise ValueError(f"kl_coef must be > 0 (got {kl_coef}); smaller means harder focus on the worst examples")
    losses = losses.detach().float()
    return (torch.softmax(losses / kl_coef, dim=0) * losses.numel()).to(losses.dtype)


def class_weights(confusion: Tensor, strength: float = 1.0) -> Tensor:
    """Per-class weights (K, mean 1) up-weighting classes in the most confused (true, predicted) pairs.

    ``confusion[i, j]``: rate (or count) of adversarial examples of class i predicted as j; rows are
    normalised here, so counts work too. A class whose hardest pair has confusion ``h`` (sum of the
    two directions, in [0, 2]) gets weight proportional to ``1 + strength * h``.
    """
    c = confusion.detach().float()
    c = c / c.sum(dim=1, keepdim=True).clamp_min(1e-12)
    pair = c + c.T
    pair.fill_diagonal_(0.0)
    hardness = pair.amax(dim=1)
    w = 1.0 + strength * hardness
    return w / w.mean()


class ClassConfusion:
    """Running adversarial confusion matrix (EMA of per-batch row-normalised counts, K x K).

    Rows not seen yet stay at the identity (no confusion), so early weights are uniform.
    """

    def __init__(self, num_classes: int, momentum: float = 0.9):
        self.num_classes = num_classes
        self.momentum = momentum
        self.matrix = torch.eye(num_classes)

    @torch.no_grad()
    def update(self, labels: Tensor, preds: Tensor) -> None:
        k = self.num_classes
        counts = torch.bincount(labels.cpu() * k + preds.cpu(), minlength=k * k).view(k, k).float()
        seen = counts.sum(1) > 0
        rates = counts[seen] / counts[seen].sum(1, keepdim=True)
        self.matrix[seen] = self.momentum * self.matrix[seen] + (1 - self.momentum) * rates

    def weights(self, labels: Tensor, strength: float = 1.0) -> Tensor:
        """Weights of the examples (B), from their classes' weights (which have mean 1 over classes)."""
        return class_weights(self.matrix, strength).to(labels.device)[labels]


def weighted_mean(per_example: Tensor, *, labels: Tensor, adv_logits: Tensor, instance_reweight: float | None,
                  class_reweight: bool, confusion: ClassConfusion | None, robust_losses: Tensor | None = None,
                  class_strength: float = 1.0) -> Tensor:
    """Weighted mean of ``per_example`` losses (B) with the options shared by TRADES, MART and FAT.

    ``robust_losses`` (default: ``per_example``) drive the DRO weights; ``adv_logits`` update the
    class confusion before its weights are read (the current batch counts). The product of the two
    weightings is re-normalised to mean 1; with neither option this is the plain mean.
    """
    if not class_reweight and instance_reweight is None:
        return per_example.mean()
    weights = torch.ones_like(per_example.detach())
    if class_reweight:
        if confusion is None:
            raise ValueError("class_reweight needs a ClassConfusion")
        confusion.update(labels, adv_logits.detach().argmax(-1))
        weights = weights * confusion.weights(labels, class_strength).to(weights.dtype)
    if instance_reweight is not None:
        source = per_example if robust_losses is None else robust_losses
        weights = weights * dro_instance_weights(source, instance_reweight).to(weights.dtype)
    weights = weights / weights.mean().clamp_min(1e-12)
    return (weights * per_example).mean()


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True), kw_only=True)
class Reweighting:
    """The re-weighting options a defense gets by deriving from this (PGD-AT, TRADES, MART, FAT):
    ``instance_reweight`` (KL coefficient of DRO instance weights) and ``class_reweight`` (hard-class
    pair weights of strength ``class_strength``); keyword-only, so a defense's own fields keep their order."""

    instance_reweight: float | None = Field(default=None, gt=0, description="KL coefficient of DRO instance weights")
    class_reweight: bool = False
    class_strength: float = Field(default=1.0, ge=0)

    def __post_init__(self):
        self._confusion: ClassConfusion | None = None

    def reweighted_mean(self, model, per_example: Tensor, labels: Tensor, adv_logits: Tensor) -> Tensor:
        """:func:`weighted_mean` with this defense's options (the class confusion is made on first use)."""
        if self.class_reweight and self._confusion is None:
            self._confusion = ClassConfusion(unwrap(model).num_classes)
        return weighted_mean(per_example, labels=labels, adv_logits=adv_logits, instance_reweight=self.instance_reweight,
                             class_reweight=self.class_reweight, confusion=self._confusion,
                             class_strength=self.class_strength)
