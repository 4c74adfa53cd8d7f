"""Gradient-masking sanity checks: signs that a robust accuracy is an overestimate.

After AutoAttack's ``checks.py`` (Croce & Hein 2020) and the checklist of Carlini et al., "On
Evaluating Adversarial Robustness" (2019). Every check works on the adapter's continuous input
(pixels or token embeddings), runs the model in eval mode (restoring its mode), returns a list of
warnings — plain sentences that say what is wrong and what to do — and logs each one with
``logging`` (logger ``unirobust.checks``). An empty list means the check saw nothing wrong.

- :func:`check_randomness` — two eval-mode forward passes on the same input disagree;
- :func:`check_softmax_output` — the model returns probabilities (rows in [0, 1] summing to 1);
- :func:`check_zero_gradients` — many examples have an input gradient that is exactly 0;
- :func:`check_eps_monotonic` — robust accuracy rises, or does not fall, as eps grows
  (:func:`eps_sweep` measures it with PGD at eps/2, eps, 2 eps);
- :func:`check_black_box` — a black-box attack beats the white-box one (:class:`RandomSearch` is a
  cheap query attack to compare with);
- :func:`run_checks` — all of the above on one batch.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from .attacks.apgd import margin_loss
from .attacks.pgd import PGD, broadcast_mask, run_attack
from .models.base import eval_mode, normalize_step, unwrap

log = logging.getLogger(__name__)


def _report(warnings: list[str]) -> list[str]:
    for w in warnings:
        log.warning("%s", w)
    return warnings


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _correct(adapter, z: Tensor, batch: dict) -> Tensor:
    with torch.no_grad():
        return adapter.logits(z, batch).argmax(-1) == batch["labels"]


# ----------------------------------------------------------------------------- (a) randomness


def check_randomness(model, batch: dict, rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """Warn when two eval-mode forward passes on the same input give different logits."""
    adapter = unwrap(model)
    with eval_mode(adapter), torch.no_grad():
        z0 = adapter.embed(batch)
        a, b = adapter.logits(z0, batch), adapter.logits(z0, batch)
    if torch.allclose(a, b, rtol=rtol, atol=atol):
        return []
    differ = (~torch.isclose(a, b, rtol=rtol, atol=atol)).any(-1).sum().item()
    return _report([
        f"randomness: two forward passes on the same input in eval mode give different logits "
        f"({differ}/{len(a)} examples, max |difference| {(a - b).abs().max().item():.3g}). Gradient attacks "
        f"then follow a noisy loss and robust accuracy is overestimated. Make the eval-mode forward "
        f"deterministic (dropout / noise layers must respect model.eval()), or, for a deliberately "
        f"randomized defense, attack with Expectation over Transformation (average the gradient over "
        f"several passes) and report the accuracy of the randomized model over several passes."])


# ----------------------------------------------------------------------------- (b) softmax outputs


def check_softmax_output(model, batch: dict, atol: float = 1e-4) -> list[str]:
    """Warn when the model's outputs look like probabilities (rows in [0, 1] that sum to 1)."""
    adapter = unwrap(model)
    with eval_mode(adapter), torch.no_grad():
        out = adapter.logits(adapter.embed(batch), batch)
    in_range = bool(((out >= -atol) & (out <= 1 + atol)).all())
    sums_to_one = bool(((out.sum(-1) - 1).abs() <= atol).all())
    if not (in_range and sums_to_one):
        return []
    return _report([
        "softmax outputs: every output row lies in [0, 1] and sums to 1, so the model returns "
        "probabilities, not logits. Cross-entropy on probabilities has vanishing gradients and the "
        "margin / DLR losses lose their scale, so attacks underestimate the model's weakness. Return "
        "the pre-softmax scores from adapter.logits (remove the final softmax layer)."])


# ----------------------------------------------------------------------------- (c) zero gradients


def _input_grad(adapter, batch: dict, z0: Tensor, loss_fn) -> Tensor:
    z = z0.detach().requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(loss_fn(adapter.logits(z, batch), batch["labels"]).sum(), z)
    return grad * broadcast_mask(adapter.perturbable(batch), grad)


def check_zero_gradients(model, batch: dict, max_fraction: float = 0.0) -> list[str]:
    """Warn when more than ``max_fraction`` of the examples (default: any, as AutoAttack's check) have
    an exactly-zero input gradient: a model that masks its gradient on a few percent of the inputs
    overstates robust accuracy by about that much, and nothing else may show it.

    The gradient is the cross-entropy's at the clean point, over the perturbable entries (examples
    with none, e.g. an empty text, are not counted). When the
    margin loss still has a gradient there, the cause is softmax saturation (CE rounds to 0 in
    float); otherwise the model itself passes no gradient (thresholding, quantisation, argmax, ...).
    """
    adapter = unwrap(model)
    with eval_mode(adapter):
        with torch.no_grad():
            z0 = adapter.embed(batch).detach()
        ce = _input_grad(adapter, batch, z0, lambda lg, y: F.cross_entropy(lg, y, reduction="none"))
        movable = broadcast_mask(adapter.perturbable(batch), ce).flatten(1).any(1)  # an empty text has nothing to move
        zero = (ce.flatten(1).abs().sum(1) == 0) & movable
        n, k = int(movable.sum()), int(zero.sum())
        if n == 0 or k / n <= max_fraction:
            return []
        margin = _input_grad(adapter, batch, z0, margin_loss)
        dead = (margin.flatten(1).abs().sum(1) == 0) & zero
    if dead.sum() * 2 >= k:
        return _report([
            f"zero gradients: the input gradient is exactly 0 for {k}/{n} examples ({_pct(k / n)}), for "
            f"the margin loss too ({int(dead.sum())} of them). Gradient-based attacks cannot move these "
            f"examples, so robust accuracy is overestimated (gradient masking: a non-differentiable stage "
            f"such as thresholding, quantisation, rounding or argmax). Attack through a differentiable "
            f"approximation of that stage (BPDA), and add gradient-free attacks (unirobust.checks."
            f"RandomSearch, transfer from a surrogate) to the evaluation."])
    return _report([
        f"zero gradients: the cross-entropy's input gradient is exactly 0 for {k}/{n} examples "
        f"({_pct(k / n)}) while the margin loss still has one: the softmax saturates in floating point. "
        f"CE-based attacks (pgd, apgd-ce) stall on these examples; add apgd-dlr, alt-pgd or cw-l2 "
        f"(margin-based) to the evaluation."])


# ----------------------------------------------------------------------------- (d) eps monotonicity


def check_eps_monotonic(accuracies: Mapping[float, float], tol: float = 0.02) -> list[str]:
    """Warn when robust accuracy (``{eps: accuracy}``, eps 0 = clean) rises, or does not fall, with eps.

    ``tol`` absorbs sampling noise (absolute accuracy, 0.02 = 2 points).
    """
    pts = sorted((float(e), float(a)) for e, a in accuracies.items())
    warnings = []
    for (e1, a1), (e2, a2) in zip(pts, pts[1:]):
        if a2 > a1 + tol:
            warnings.append(
                f"eps monotonicity: robust accuracy rises with the budget ({_pct(a1)} at eps={e1:g}, "
                f"{_pct(a2)} at eps={e2:g}). A larger ball contains the smaller one, so a working attack can "
                f"only do better there: the attack is failing (gradient masking, too few steps, or a step "
                f"size that does not scale with eps). Use more steps / restarts, apgd-ce / apgd-dlr (step "
                f"sizes adapt to eps), and gradient-free attacks.")
    if len(pts) >= 2 and not warnings:  # a rise already says it
        (e1, a1), (e2, a2) = pts[0], pts[-1]
        if a1 > tol and a2 >= a1 - tol:
            warnings.append(
                f"eps monotonicity: robust accuracy hardly falls from eps={e1:g} ({_pct(a1)}) to "
                f"eps={e2:g} ({_pct(a2)}; less than the {_pct(tol)} allowed for noise). Growing the budget should "
                f"let the attack break more examples; "
                f"a flat curve suggests the attack makes no progress (masked or zero gradients). Check the "
                f"gradients, try larger budgets (accuracy should reach about 0 for an unbounded attack) and "
                f"gradient-free attacks.")
    return _report(warnings)


def _threat_attack(threat: Any, factor: float, random_start: bool = False) -> PGD:
    alpha = getattr(threat, "alpha", None)
    return PGD(eps=float(threat.eps) * factor, norm=threat.norm, steps=int(getattr(threat, "steps", 10) or 10),
               alpha=alpha * factor if alpha else None, random_start=random_start,
               relative=bool(getattr(threat, "relative", False)))


def large_factor(threat: Any) -> float:
    """A budget multiple at which a working attack breaks nearly every example, so that a flat accuracy
    curve up to it means the attack makes no progress: 8 x eps, and at least the whole pixel range
    (Linf 1.0) or a change as large as each unit itself (a relative ball of 1.0). Up to 2 eps alone, a
    model robust well beyond its budget (trained at a larger one) is flat too: a false alarm."""
    eps = float(threat.eps)
    if eps <= 0:
        return 8.0
    reach = 1.0 if (threat.norm == "linf" or getattr(threat, "relative", False)) else 0.0
    return max(8.0, reach / eps)


def eps_sweep(model, batch: dict, threat: Any, factors=(0.5, 1.0, 2.0)) -> dict[float, Tensor]:
    """Per-example correct flags under PGD (the threat's steps, no random start) at ``factor * eps``.

    Key 0.0 holds the clean flags. Deterministic, so monotonicity is not blurred by random starts.
    """
    adapter = unwrap(model)
    with eval_mode(adapter):
        flags = {0.0: _correct(adapter, adapter.embed(batch), batch)}
        for f in factors:
            eps = float(threat.eps) * f
            flags[eps] = _correct(adapter, _threat_attack(threat, f)(adapter, batch), batch)
    return flags


# ----------------------------------------------------------------------------- (e) black box


@dataclass(config=ConfigDict(extra="forbid"))
class RandomSearch:
    """Gradient-free random search in the threat ball, for the black-box check.

    After Square Attack (Andriushchenko et al., "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020), without its square-shaped updates so that it
    is written once for pixels and embeddings. Linf: start at a random vertex of each unit's ball,
    then each query resamples the sign of a random fraction ``p`` of the perturbable entries; L2:
    start on the sphere, each query adds Gaussian noise on a random fraction ``p`` and renormalises
    to the sphere. A proposal is kept per example when it raises the margin ``max_{i!=y} z_i - z_y``;
    examples stop once misclassified. ``p`` halves at 1/4, 1/2 and 3/4 of the budget.
    Queries: one forward of the batch each (``n_queries + 1`` in all); no gradients.
    """

    eps: float = Field(ge=0)
    norm: Literal["linf", "l2"] = "linf"
    n_queries: int = Field(default=100, ge=0)
    p_init: float = Field(default=0.1, gt=0, le=1)
    relative: bool = False

    def __call__(self, model, batch: dict) -> Tensor:
        with torch.no_grad():
            return run_attack(model, batch, self._run)

    def _propose(self, z: Tensor, z0: Tensor, radius: Tensor, mask: Tensor, p: float, dims) -> Tensor:
        pick = (torch.rand_like(z) < p).to(z.dtype) * mask
        if self.norm == "linf":
            signs = torch.randint_like(z, 0, 2) * 2 - 1
            return z + pick * (z0 + signs * radius - z)
        delta = z - z0 + normalize_step(torch.randn_like(z) * pick, "l2", dims) * radius
        return z0 + normalize_step(delta * mask, "l2", dims) * radius

    def _run(self, adapter, batch: dict, z0: Tensor) -> Tensor:
        if self.eps == 0:
            return z0
        labels, dims = batch["labels"], adapter.ball_dims
        mask = broadcast_mask(adapter.perturbable(batch), z0)
        radius = adapter.radius(z0, batch, self)
        z = self._propose(z0, z0, radius, mask, 1.0, dims)
        z = adapter.project(z, z0, batch, self)
        best = margin_loss(adapter.logits(z, batch), labels)
        for q in range(self.n_queries):
            todo = best <= 0
            if not todo.any():
                break
            p = self.p_init * 0.5 ** min(int(4 * q / max(self.n_queries, 1)), 3)
            cand = adapter.project(self._propose(z, z0, radius, mask, p, dims), z0, batch, self)
            margin = margin_loss(adapter.logits(cand, batch), labels)
            take = todo & (margin > best)
            z = torch.where(broadcast_mask(take, z).bool(), cand, z)
            best = torch.where(take, margin, best)
        return z


def check_black_box(white_box: float, black_box: float, tol: float = 0.02, n: int | None = None,
                    black_only: int | None = None, min_black_only: int = 2) -> list[str]:
    """Warn when a black-box attack leaves lower accuracy than the white-box one (more than ``tol``),
    or breaks at least ``min_black_only`` examples the white-box attack did not (a model masking its
    gradient on a few inputs leaves the accuracies close, example by example they differ; one such
    example also happens on a sound adversarially trained model, two did not in our trials).

    ``n`` / ``black_only`` (optional): examples compared, and how many only the black-box broke.
    """
    if not black_box < white_box - tol and not (black_only is not None and black_only >= min_black_only):
        return []
    detail = f" on {n} examples" if n else ""
    if black_only is not None:
        detail += f"; {black_only} examples were broken only by the black-box attack"
    if black_box < white_box - tol:
        what = (f"black box beats white box: a gradient-free attack leaves {_pct(black_box)} accuracy against "
                f"{_pct(white_box)} for the gradient attack{detail}. An attack that sees the gradients should be "
                f"at least as strong")
    else:
        what = (f"black box breaks what white box cannot: a gradient-free attack broke {black_only} examples "
                f"that the gradient attack left correct ({_pct(black_box)} against {_pct(white_box)} "
                f"accuracy{detail.split(';')[0]}). An attack that sees the gradients should break them too")
    return _report([
        f"{what}, so the gradients mislead it (gradient masking / obfuscation). Do not trust "
        f"the white-box number: report the minimum over attacks, add the black-box attack to the "
        f"evaluation, and attack through a differentiable approximation of the model (BPDA / EOT)."])


# ----------------------------------------------------------------------------- all on one batch


def run_checks(model, batch: dict, threat: Any, accuracies: Mapping | None = None, *, sweep: bool = True,
               black_box: bool = True, n_queries: int = 100, tol: float = 0.03,
               max_zero_grad_fraction: float = 0.0) -> list[str]:
    """Run every check on one batch; returns (and logs) the warnings, ``[]`` when all is well.

    ``threat``: the budget (``eps``, ``norm``, ``steps``, ``alpha``, ``relative``; a task's
    ``ThreatModel``). ``accuracies`` (optional) holds figures measured elsewhere, e.g. by the full
    evaluation: ``{"by_eps": {eps: acc, ...}, "white_box": acc, "black_box": acc}``, or a plain
    ``{eps: acc}`` mapping. The eps-monotonicity check runs on ``by_eps`` when given, else (``sweep``)
    on PGD at 0, eps/2, eps, 2 eps and a large budget (:func:`large_factor`) on this batch (4 PGD runs
    of ``threat.steps``), with a
    tolerance of at least 1.5 examples (one example's change is noise on a small batch); the black-box
    check compares given white/black-box figures (both needed), else (``black_box``) PGD at eps with
    :class:`RandomSearch` (``n_queries`` forwards) on this batch, example by example.
    """
    adapter = unwrap(model)
    with eval_mode(adapter):  # the model as it is evaluated: no dropout, no BatchNorm statistics updates
        acc = dict(accuracies or {})
        if acc and all(isinstance(k, (int, float)) for k in acc):
            acc = {"by_eps": acc}
        warnings = check_randomness(adapter, batch)
        warnings += check_softmax_output(adapter, batch)
        warnings += check_zero_gradients(adapter, batch, max_fraction=max_zero_grad_fraction)

        flags = None
        if acc.get("by_eps"):
            warnings += check_eps_monotonic(acc["by_eps"], tol=tol)
        elif sweep and threat.eps > 0:
            flags = eps_sweep(adapter, batch, threat, (0.5, 1.0, 2.0, large_factor(threat)))
            noise = 1.5 / max(len(batch["labels"]), 1)
            warnings += check_eps_monotonic({e: f.float().mean().item() for e, f in flags.items()},
                                            tol=max(tol, noise))

        if acc.get("white_box") is not None and acc.get("black_box") is not None:
            warnings += check_black_box(acc["white_box"], acc["black_box"], tol=tol)
        elif black_box and threat.eps > 0:
            eps = float(threat.eps)
            white = flags[eps] if flags is not None else eps_sweep(adapter, batch, threat, (1.0,))[eps]
            attack = RandomSearch(eps=eps, norm=threat.norm, n_queries=n_queries,
                                  relative=bool(getattr(threat, "relative", False)))
            black = _correct(adapter, attack(adapter, batch), batch)
            warnings += check_black_box(white.float().mean().item(), black.float().mean().item(), tol=tol,
                                        n=len(black), black_only=int((white & ~black).sum()))
        return warnings
