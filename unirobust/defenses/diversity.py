"""Ensemble training baselines for DVERGE (``dverge.py``): independent members, ADP and GAL.

All three need an ensemble model (recipe ``model.ensemble``) and get every member's logits from one
call through the training view (``model.logits([z] * N, batch)`` -> N x B x K), so they stay correct
under DDP. ``logits`` in their output is the ensemble's combined clean prediction.

- ``ensemble-erm`` — independently trained members: sum over members of each one's own CE. With
  one optimizer over all members this equals one optimizer per member (members share no weights;
  text members keep their own embedding matrices). Members differ by initialisation only (the
  batches are shared), as the DVERGE paper's baseline ensemble.
- ``adp`` — Pang et al., "Improving Adversarial Robustness via Promoting Ensemble Diversity", ICML 2019:
      loss = sum_i CE_i - alpha * H(mean_i p_i) - beta * log det(M^T M + det_offset I)
  where M's columns are each member's non-true-class probabilities, L2-normalised. Defaults alpha 2,
  beta 0.5 (the paper's ADP_{2,0.5}), as in the DVERGE release's re-implementation.
- ``gal`` — Kariyappa & Qureshi, "Improving Adversarial Robustness of Ensembles with Diversity
  Training" (GAL), 2019: misalign the members' input gradients,
      loss = mean_i CE_i + coeff * log sum_{i<j} exp(cos(grad_z CE_i, grad_z CE_j))
  per example, averaged (coeff 0.5, the DVERGE release's default). Double backpropagation through
  the input gradients; for text the gradients are taken in embedding space and compared over the
  perturbable tokens only, and the forward runs under PyTorch's math attention kernel (the fused
  scaled-dot-product kernels have no double backward).

Departures: ADP's and GAL's optional adversarial-training terms are not built; GAL's paper uses
leaky-ReLU members (here the recipe's architecture is used as is), and the DVERGE release trains GAL
on images with Gaussian noise (std 0.045, half the time) added, which is not done here. The papers'
ensembles predict (and are attacked through) the mean of the members' probabilities: recipe
``model.ensemble: {members: 3, combine: probs}``; the default ``combine: logits`` averages logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attacks.pgd import broadcast_mask
from ..models.base import unwrap


def ensemble_of(model, defense: str, minimum: int = 1):
    """The :class:`EnsembleAdapter` behind ``model``, or a ValueError that says how to get one."""
    from ..models.ensemble import EnsembleAdapter

    adapter = unwrap(model)
    if not isinstance(adapter, EnsembleAdapter):
        raise ValueError(f"defense {defense!r} trains an ensemble: set model.ensemble (e.g. model.ensemble=3)")
    if len(adapter) < minimum:
        raise ValueError(f"defense {defense!r} needs an ensemble of at least {minimum} members, got {len(adapter)}")
    return adapter


def take_rows(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of every batched tensor."""
    return {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def repeat_batch(batch: dict, times: int) -> dict:
    """The batch stacked ``times`` times along the batch dimension."""
    return {k: torch.cat([v] * times) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def _members_at_clean(model, batch: dict, n: int):
    z = model.embed(batch)
    return model.logits([z] * n, batch)


@dataclass(config=ConfigDict(extra="forbid"))
class EnsembleERM:
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    def loss(self, model, batch: dict) -> dict:
        ens = ensemble_of(model, "ensemble-erm")
        out = _members_at_clean(model, batch, len(ens))
        ce = torch.stack([F.cross_entropy(o, batch["labels"], label_smoothing=self.label_smoothing) for o in out])
        return {"loss": ce.sum(), "logits": ens.combine_logits(out).detach(), "member_loss": ce.mean().detach()}


@dataclass(config=ConfigDict(extra="forbid"))
class ADP:
    alpha: float = Field(default=2.0, ge=0)
    beta: float = Field(default=0.5, ge=0)
    log_offset: float = Field(default=1e-20, gt=0)
    det_offset: float = Field(default=1e-6, gt=0)

    def check_task(self, task) -> None:
        """With 2 classes there is one non-true class: every member's normalised non-maximal prediction
        is [1], the Gram matrix is all ones and its log-det a constant with no gradient."""
        if self.beta > 0 and task.num_classes < 3:
            raise ValueError(f"adp: the diversity term (beta={self.beta}) is constant with {task.num_classes} "
                             f"classes; set beta: 0 (ADP is then CE - alpha x ensemble entropy)")

    def loss(self, model, batch: dict) -> dict:
        ens = ensemble_of(model, "adp", minimum=2)
        self.check_task(ens)
        n, labels = len(ens), batch["labels"]
        out = _members_at_clean(model, batch, n)  # n x B x K
        ce = torch.stack([F.cross_entropy(o, labels) for o in out]).sum()
        p = F.softmax(out, dim=-1)
        mean = p.mean(0)
        entropy = -(mean * torch.log(mean + self.log_offset)).sum(-1).mean()
        keep = ~F.one_hot(labels, p.shape[-1]).bool()  # B x K: the non-true classes
        nonmax = p.permute(1, 0, 2)[keep.unsqueeze(1).expand(-1, n, -1)].view(len(labels), n, -1)
        nonmax = nonmax / nonmax.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gram = nonmax @ nonmax.transpose(1, 2)
        log_det = torch.logdet(gram + self.det_offset * torch.eye(n, device=gram.device, dtype=gram.dtype)).mean()
        loss = ce - self.alpha * entropy - self.beta * log_det
        return {"loss": loss, "logits": ens.combine_logits(out).detach(), "ce": ce.detach() / n,
                "ensemble_entropy": entropy.detach(), "log_det": log_det.detach()}


@dataclass(config=ConfigDict(extra="forbid"))
class GAL:
    coeff: float = Field(default=0.5, ge=0)
    log_offset: float = Field(default=1e-20, gt=0)

    def loss(self, model, batch: dict) -> dict:
        ens = ensemble_of(model, "gal", minimum=2)
        n, labels = len(ens), batch["labels"]
        z = model.embed(batch)
        zin = z.detach().requires_grad_(True)
        x = zin + (z - z.detach())  # value z; gradients to the embedding matrix (text) still flow
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            out = model.logits([x] * n, batch)
        mask = broadcast_mask(ens.perturbable(batch), zin)
        grads = []
        for o in out:
            g, = torch.autograd.grad(F.cross_entropy(o, labels, reduction="sum"), zin, create_graph=True)
            grads.append((g * mask).flatten(1))
        cos = torch.stack([F.cosine_similarity(grads[i], grads[j], dim=-1, eps=1e-12)
                           for i in range(n) for j in range(i + 1, n)], dim=-1)
        coherence = torch.log(cos.exp().sum(-1) + self.log_offset).mean()
        ce = torch.stack([F.cross_entropy(o, labels) for o in out]).mean()
        return {"loss": ce + self.coeff * coherence, "logits": ens.combine_logits(out).detach(),
                "ce": ce.detach(), "coherence": coherence.detach(), "mean_cosine": cos.mean().detach()}
