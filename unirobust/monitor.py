"""Training monitors: robust accuracy on a fixed held-out batch after every epoch, and detection of
catastrophic overfitting (Wong et al., "Fast is better than free", ICLR 2020: single-step AT can
suddenly lose all multi-step robustness within an epoch while its FGSM accuracy keeps rising)."""

from __future__ import annotations

import logging

import torch

from .attacks.pgd import FGSM, PGD
from .models.base import eval_mode, forked_rng

log = logging.getLogger(__name__)


def catastrophic_overfitting(pgd_history: list[float], fgsm_history: list[float] | None = None,
                             drop: float = 0.2) -> bool:
    """True when the latest PGD robust accuracy fell more than ``drop`` (absolute) below its best
    so far, and FGSM accuracy (if given) did not fall with it: the signature of gradient masking
    rather than of a harder training phase."""
    if len(pgd_history) < 2:
        return False
    fell = max(pgd_history[:-1]) - pgd_history[-1] > drop
    if fgsm_history is not None and len(fgsm_history) == len(pgd_history):
        fell = fell and fgsm_history[-1] >= max(fgsm_history[:-1]) - drop / 2
    return fell


class RobustMonitor:
    """PGD (task threat model, 10 steps) and FGSM accuracy on the first ``n`` held-out examples."""

    def __init__(self, dataset, collate, n: int, threat, device):
        n = min(n, len(dataset))
        self.batch = {k: v.to(device) if torch.is_tensor(v) else v
                      for k, v in collate([dataset[i] for i in range(n)]).items()}
        budget = dict(eps=threat.eps, norm=threat.norm, relative=threat.relative)
        self.pgd = PGD(**budget, steps=10, alpha=threat.alpha)
        self.fgsm = FGSM(**budget)
        self.pgd_history: list[float] = []
        self.fgsm_history: list[float] = []
        self.overfit_epochs: list[int] = []

    def accuracy(self, adapter, attack) -> float:
        z = attack(adapter, self.batch)
        with torch.no_grad():
            return (adapter.logits(z, self.batch).argmax(-1) == self.batch["labels"]).float().mean().item()

    def check(self, adapter, epoch: int) -> dict:
        device = self.batch["labels"].device
        # measure like evaluation: no dropout, no BatchNorm statistics updates; and on a forked RNG, so
        # that PGD's random starts do not shift training's random stream (switching the monitor on
        # must not change the model)
        with eval_mode(adapter), forked_rng(device):
            pgd, fgsm = self.accuracy(adapter, self.pgd), self.accuracy(adapter, self.fgsm)
        self.pgd_history.append(pgd)
        self.fgsm_history.append(fgsm)
        out = {"monitor_pgd_accuracy": pgd, "monitor_fgsm_accuracy": fgsm}
        if catastrophic_overfitting(self.pgd_history, self.fgsm_history):
            self.overfit_epochs.append(epoch)
            out["catastrophic_overfitting"] = True
            log.warning("epoch %d: catastrophic overfitting — held-out PGD accuracy fell from %.3f to %.3f while "
                        "FGSM accuracy is %.3f. Use random init + smaller step (fgsm-at alpha 1.25 eps), a "
                        "regulariser (GradAlign / AAER), or multi-step PGD-AT.", epoch, max(self.pgd_history[:-1]),
                        pgd, fgsm)
        return out
