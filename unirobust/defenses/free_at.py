"""Free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019).

Each minibatch is replayed ``replays`` = m times (the loop reads the ``replays`` attribute and makes
m optimizer updates per batch). One perturbation ``delta`` persists from replay to replay *and* from
batch to batch; every replay does a single forward/backward at ``z + delta`` whose backward gives
both the parameter gradients (used by the optimizer) and the input gradient ``g``, which moves the
perturbation: ``delta <- clip_eps(delta + step * sign(g))`` (normalised gradient for L2). So
adversarial training costs no more than m clean steps on the same batch.

How the input gradient is obtained: ``loss`` registers a tensor hook on the perturbed input
(``z_adv.register_hook``); the loop's ``backward`` fires it and the hook stores ``g``; the next
``loss`` call applies the update before building its input. The stored gradient is the one of the
*same* backward pass that produced the parameter gradients, as in the paper (no extra pass).

Recipes: an epoch costs m times a clean epoch and makes m times the updates, so divide the epoch
count by m to compare with other defenses at equal cost (the paper trains for epochs / m).

Defaults: m = 4 (the paper uses m = 8 for its CIFAR-10 headline and m = 4 on ImageNet); step = eps
(``alpha`` = 1.0, in units of eps, as the paper). Budget (``eps``, ``norm``, ``relative``) from
``attack`` (recipe ``defense.attack`` + task threat); the attack object is not called.

Departures: the perturbation is reset to zero when the batch shape changes (the paper slices a
fixed-size buffer; text batches change length with padding, and a carried delta would not fit);
the perturbation is applied through ``project`` (valid set, and zero on padding / special tokens);
a pending gradient from the previous batch is applied with that batch's radius and mask.

Shapes: ``delta`` like ``z``: B x C x H x W (vision) or B x T x D (text).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..attacks.pgd import broadcast_mask
from ..models.base import clip_to_ball, normalize_step, unwrap


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class FreeAT:
    attack: Any
    replays: int = Field(default=4, ge=1)
    alpha: float = Field(default=1.0, gt=0)

    def __post_init__(self):
        self._delta: Tensor | None = None
        self._grad: Tensor | None = None
        self._radius: Tensor | None = None
        self._mask: Tensor | None = None
        self._ball_dims: tuple[int, ...] = ()

    @property
    def delta(self) -> Tensor | None:
        """The persistent perturbation (after the last applied update), or None before the first call."""
        return self._delta

    def reset(self) -> None:
        self._delta = self._grad = self._radius = self._mask = None

    def _catch(self, grad: Tensor) -> None:
        self._grad = grad.detach().clone()

    def _apply_pending(self) -> None:
        if self._grad is None or self._delta is None:
            return
        norm, dims = self.attack.norm, self._ball_dims
        move = normalize_step(self._grad, norm, dims) * self.alpha * self._radius * self._mask
        self._delta = clip_to_ball(self._delta + move, norm, self._radius, dims).detach()
        self._grad = None

    def loss(self, model, batch: dict) -> dict:
        adapter = unwrap(model)
        self._ball_dims = adapter.ball_dims
        z = model.embed(batch)
        z0 = z.detach()
        if self._delta is None or self._delta.shape != z0.shape:
            self.reset()
            self._delta = torch.zeros_like(z0)
        else:
            self._apply_pending()
        self._radius = adapter.radius(z0, batch, self.attack).detach()
        self._mask = broadcast_mask(adapter.perturbable(batch), z0)
        z_adv = adapter.project(z0 + self._delta, z0, batch, self.attack).detach()
        z_in = z + (z_adv - z0)
        if not z_in.requires_grad:  # vision: pixels are not a graph leaf of the model
            z_in = z_in.detach().requires_grad_(True)
        if torch.is_grad_enabled():
            z_in.register_hook(self._catch)
        logits = model.logits(z_in, batch)
        loss = F.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "logits": logits}
