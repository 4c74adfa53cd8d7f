"""Feature distillation: DVERGE's inner attack (Yang et al., "DVERGE: Diversifying Vulnerabilities for
Enhanced Robust Generation of Ensembles", NeurIPS 2020).

    z' = argmin_{z in ball(z_s)} || f^l(z) - f^l(z_t) ||^2

moves a *source* input ``z_s`` inside its threat ball until the model's layer-``l`` features match
those of a *target* input ``z_t``: the result still looks like the source (and keeps its label) but
carries the target's non-robust features. As in the reference code: mean-squared feature error,
signed steps with MI-FGSM-style momentum (gradient divided by its per-example L1 norm, decay ``momentum``;
0 = plain sign steps), no random start by default, step ``eps / steps`` (the paper's 0.007 for eps
0.07 and 10 steps) unless ``alpha`` is set.

Both modalities: ``features`` is the adapter's (vision: a timm stage / pre-logits; text: hidden
states of a layer, mean-pooled over each sequence's real tokens). Source and target need no length
alignment for text: pooled features are B x D whatever the sequence lengths; only the source's
perturbable tokens move, each inside its per-token ball.

Departures: runs in eval mode (the reference code distils in train mode, which also updates
BatchNorm statistics with the intermediate points); L2 budgets use per-unit normalised steps; the
layer index is the adapter's (timm stage output, after its activation; the paper cuts ResNet-20
before a ReLU); relative text budgets scale steps by ``radius / eps`` like PGD.

Shapes: ``z`` B x C x H x W (vision) or B x T x D (text); returns the distilled point, detached.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..models.base import away_from_zero, normalize_step
from .pgd import run_attack, start_in_ball


def l1_normalize(grad: Tensor) -> Tensor:
    """``grad`` divided by its per-example L1 norm (MI-FGSM's normalisation)."""
    norm = away_from_zero(grad.abs().flatten(1).sum(1))
    return grad / norm.view(-1, *([1] * (grad.dim() - 1)))


def feature_fn(adapter, member: int | None, layer: int | None):
    """``f(z, batch)``: the adapter's features, or member ``member``'s for an ensemble, at ``layer``."""
    if member is not None:
        return lambda z, batch: adapter.member_features(member, z, batch, layer)
    if layer is None:
        return adapter.features
    return lambda z, batch: adapter.features(z, batch, layer=layer)


def feature_distance(f_z: Tensor, f_t: Tensor) -> Tensor:
    """Per-example mean squared feature error (B)."""
    return (f_z - f_t).pow(2).flatten(1).mean(1)


@dataclass(config=ConfigDict(extra="forbid"))
class IterativeBudget:
    """The budget fields of the iterative transfer-style attacks (feature distillation, MI-FGSM, CWA):
    ``eps`` ball of ``norm`` (``relative``: in units of each token's embedding norm), ``steps`` steps
    of ``alpha`` (default eps / steps, I-FGSM's: the attack just reaches the boundary), no random
    start unless asked."""

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    alpha: float | None = Field(default=None, gt=0)
    steps: int = Field(default=10, ge=0)
    random_start: bool = False
    relative: bool = False

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / max(self.steps, 1)


@dataclass(config=ConfigDict(extra="forbid"))
class FeatureDistillation(IterativeBudget):
    momentum: float = Field(default=1.0, ge=0)
    layer: int | None = None

    def __call__(self, model, batch: dict, target_batch: dict, member: int | None = None) -> Tensor:
        """Distil ``batch`` (sources) toward ``target_batch`` (targets, same size); ``member`` picks an
        ensemble member's features (its input is the ensemble's shared point, see ``models/ensemble.py``)."""
        return run_attack(model, batch, self._run, target_batch, member)

    def _run(self, adapter, batch: dict, z0: Tensor, target_batch: dict, member: int | None) -> Tensor:
        f = feature_fn(adapter, member, self.layer)
        with torch.no_grad():
            f_t = f(adapter.embed(target_batch), target_batch).detach()
        if self.eps == 0 or self.steps == 0:
            return z0
        mask, radius, z = start_in_ball(adapter, z0, batch, self, self.random_start)
        step = self.step_size * radius / self.eps
        g = torch.zeros_like(z0)
        for _ in range(self.steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                loss = feature_distance(f(z, batch), f_t).sum()
                grad, = torch.autograd.grad(loss, z)
            grad = grad * mask
            g = self.momentum * g + l1_normalize(grad) if self.momentum else grad
            move = normalize_step(g, self.norm, adapter.ball_dims) * step * mask
            z = adapter.project(z.detach() - move, z0, batch, self).detach()  # descend the feature error
        return z
