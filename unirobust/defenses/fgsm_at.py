"""Single-step (FGSM) adversarial training with random start and a catastrophic-overfitting guard.

Base method: FGSM-RS, Wong et al., "Fast is better than free: Revisiting adversarial training",
ICLR 2020: start uniformly in the ball, one step of size ``alpha`` x eps (default 1.25) along the
signed (Linf) / normalised (L2) input gradient, project, minimise CE there.

Guards (``guard``), against catastrophic overfitting (CO: FGSM-AT suddenly losing all multi-step
robustness; ``monitor.py`` detects it):

- ``"gradalign"``: Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial
  Training", NeurIPS 2020. Adds ``lambda_gradalign * (1 - mean_i cos(g_i(z), g_i(z + eta)))`` with
  ``g`` the input gradient of CE, ``eta`` uniform in the ball, gradients through ``g(z + eta)``
  (double backpropagation), examples with a zero gradient left out as in the reference code.
  Default lambda 0.2 (their CIFAR-10 eps = 8/255 value; they grow it with eps).
  Departure: ``z + eta`` *is* FGSM-RS's random start (same distribution), so its gradient serves
  both the FGSM step and the regulariser (the paper pairs GradAlign with zero-init FGSM, alpha = eps;
  set ``random_start: false, alpha: 1.0`` for that; ``eta`` is then still drawn for the regulariser).
- ``"aaer"``: Lin et al., "Eliminating Catastrophic Overfitting Via Abnormal Adversarial Examples
  Regularization", NeurIPS 2023. An abnormal adversarial example (AAE) is one whose loss is *lower*
  after the FGSM step than at its random start: ``CE(z_adv) < CE(z_start)``. With m AAEs among n
  (and at least one normal example) the loss adds
  ``lambda_aae * (m / n) * (lambda_aae_loss * mean_AAE(CE(z_start) - CE(z_adv))
                            + lambda_aae_variation * relu(mean_AAE ||Δlogits||² - mean_normal ||Δlogits||²))``
  with ``Δlogits = f(z_adv) - f(z_start)``. As in the reference code (``tmllab/2023_NeurIPS_AAER``,
  which detaches both losses), the loss-drop term is a constant: it adds to the loss value, not to
  its gradient, so the guard trains through the variation term alone (with a gradient through
  ``CE(z_adv)`` the term would push the AAEs' adversarial loss up). The start logits
  and the normal examples' variation are constants too. Defaults 1.0 / 4.0 / 1.5 (the reference
  code's lamda1-3).
  Departures (our simplification): the paper's start is uniform in 2 x eps without projection and
  its step is warmed up over the first 5 epochs; here the start and step are FGSM-RS's
  (uniform in the ball, projected), with no warm-up. ``||Δlogits||²`` is a per-example squared L2
  norm, averaged over the group.
- ``"none"``: plain FGSM-RS.

AAEs are counted with every guard: ``stats`` has ``aae_count`` and ``n_examples`` (the loop sums
them per epoch: a rising AAE rate is an early sign of CO, as the AAER paper observes).

Mode: the FGSM gradient is taken in the model's *current* mode (training mode in the loop), as in
Wong et al. and the AAER code, so that the start loss and the adversarial loss are comparable when
counting AAEs (with dropout active the two losses see different dropout masks, as in the AAER
code, so on text models some AAEs are dropout noise). It runs on the unwrapped adapter; with
``guard: gradalign`` the start forward goes through the training view, because its gradient is
part of the loss (double backward; the math attention kernel is forced for it). Budget: ``eps``,
``norm``, ``relative`` from ``attack`` (recipe ``defense.attack`` + task threat); its ``steps`` /
``alpha`` are not used (the step is this defense's ``alpha`` x eps).

Shapes: ``z`` is B x C x H x W (vision) or B x T x D (text); logits B x K.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import normalize_step, random_in_ball, unwrap


def input_grad(net, z: Tensor, batch: dict, create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad, per_example_ce, logits)`` at ``z`` (a fresh leaf), with or without a graph.

    With ``create_graph`` the forward uses the math attention kernel: the fused CPU attention
    kernels have no double-backward (transformers' SDPA attention would fail under GradAlign).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    z = z.detach().requires_grad_(True)
    kernels = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), kernels:
        logits = net.logits(z, batch)
        ce = F.cross_entropy(logits, batch["labels"], reduction="none")
        grad, = torch.autograd.grad(ce.sum(), z, create_graph=create_graph)
    return grad, ce, logits


def grad_cosine(g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example cosine of two input gradients (B) and the mask of examples where both are nonzero."""
    a, b = g1.flatten(1), g2.flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-12)
    return cos, keep


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class FGSMAT:
    attack: Any
    alpha: float = Field(default=1.25, gt=0)
    random_start: bool = True
    guard: Literal["none", "gradalign", "aaer"] = "none"
    lambda_gradalign: float = Field(default=0.2, ge=0)
    lambda_aae: float = Field(default=1.0, ge=0)
    lambda_aae_loss: float = Field(default=4.0, ge=0)
    lambda_aae_variation: float = Field(default=1.5, ge=0)

    def loss(self, model, batch: dict) -> dict:
        adapter = unwrap(model)
        ball, labels = self.attack, batch["labels"]
        z = model.embed(batch)
        z0 = z.detach()
        radius = adapter.radius(z0, batch, ball)
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        noise = random_in_ball(z0, ball.norm, radius, adapter.ball_dims) * mask
        start = adapter.project(z0 + noise if self.random_start else z0, z0, batch, ball).detach()
        align = self.guard == "gradalign"
        if align and self.random_start:  # the FGSM start is GradAlign's noisy point: one gradient serves both
            grad_noisy, start_ce, start_logits = input_grad(model, start, batch, create_graph=True)
            grad = grad_noisy.detach()
        else:
            grad, start_ce, start_logits = input_grad(adapter, start, batch)
            if align:
                noisy = adapter.project(z0 + noise, z0, batch, ball)
                grad_noisy, _, _ = input_grad(model, noisy, batch, create_graph=True)
        move = normalize_step(grad.detach(), ball.norm, adapter.ball_dims) * self.alpha * radius * mask
        z_adv = adapter.project(start + move, z0, batch, ball).detach()

        logits = model.logits(z + (z_adv - z0), batch)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = ce.mean()
        start_ce, start_logits = start_ce.detach(), start_logits.detach()
        aae = ce.detach() < start_ce
        n_aae = int(aae.sum())
        stats = {"aae_count": float(n_aae), "n_examples": float(len(labels))}
        out = {"adv_loss": loss.detach()}

        if align:
            clean_grad, _, _ = input_grad(adapter, z0, batch)
            cos, keep = grad_cosine(clean_grad * mask, grad_noisy * mask)
            if keep.any():
                reg = self.lambda_gradalign * (1.0 - cos[keep].mean())
                loss = loss + reg
                out["gradalign"] = reg.detach()
                stats["gradalign_cos_sum"] = float(cos[keep].detach().sum())
        elif self.guard == "aaer" and 0 < n_aae < len(labels):
            variation = (logits - start_logits).pow(2).sum(-1)
            drop = (start_ce - ce.detach())[aae].mean()  # a constant, as in the reference code
            excess = F.relu(variation[aae].mean() - variation[~aae].mean().detach())
            reg = self.lambda_aae * (n_aae / len(labels)) * (self.lambda_aae_loss * drop
                                                              + self.lambda_aae_variation * excess)
            loss = loss + reg
            out["aaer"] = reg.detach()
        out.update(loss=loss, logits=logits, stats=stats)
        return out
