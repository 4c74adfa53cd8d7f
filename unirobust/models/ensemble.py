"""Ensemble adapter: N member adapters of one modality behind the ordinary adapter contract.

Every attack, defense and evaluation runs on an :class:`EnsembleAdapter` unchanged: ``logits``
combines the members (mean of logits, or mean of probabilities returned as log-probabilities, so
cross-entropy and argmax mean what they should), and the geometry (``embed``, ``project``,
``perturbable``, ``radius``, ``collate``) is the first member's.

The shared continuous input. Vision members all read the same pixels, so every member receives
``z`` itself. Text members may each have their own input-embedding matrix (fine-tuned copies drift
apart), so a point ``z`` in the first member's embedding space is passed on as a *perturbation*:
member i receives ``embed_i(batch) + (z - embed_0(batch))`` — its own embedding of the same tokens
plus the same per-token delta. With tied or identical embeddings this is ``z`` itself; the ball (and
its ``relative`` radius) is measured in the first member's embedding space. Members must therefore
tokenize identically (one tokenizer); the adapter checks the vocabularies.

Training with several member outputs at once. ``logits(zs, batch)`` with ``zs`` a list of N points
(one per member, same batch) returns the stacked member logits, N x B x K, from one call — so the
ensemble defenses (DVERGE, ADP, GAL, independent training) go through the training view's wrapped
model and stay correct under DDP. ``member_logits`` / ``member_features`` are the direct forms.

Related: the DVERGE release (Yang et al. 2020) keeps its members in a plain Python list and averages
logits; here members are an ``nn.ModuleList`` so ``.to()``, ``.eval()``, ``state_dict`` and
Accelerate's ``prepare`` see them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModelSpecError, eval_mode

#: attributes read from the first member (all members share them): what text attacks and collation use.
SHARED_ATTRIBUTES = ("tokenizer", "tokenize", "text_fields", "max_length", "special_ids", "pad_multiple")

log = logging.getLogger(__name__)


def check_one_text_layout(members: Sequence[nn.Module], names: Sequence[str] | None = None,
                          what: str = "text ensemble member") -> None:
    """Text models that read one token sequence (ensemble members, tokenized by member 0; a transfer
    attack's surrogates and targets) must share its tokenizer vocabulary and its layout (plain, or
    the same prompt templates): the perturbation is per token position."""
    names = list(names) if names is not None else [str(i) for i in range(len(members))]

    def layout(m):
        while isinstance(m, EnsembleAdapter):  # a nested ensemble (a ``runA+runB`` surrogate of ensembles)
            m = m.members[0]                    # has checked its own members already
        templates = getattr(m, "templates", None)
        return {"head": "prompt" if templates is not None else "plain", "templates": list(templates or []),
                "text_fields": list(m.text_fields)}

    first = members[0]
    vocab = sorted(first.tokenizer.get_vocab().items())
    for i, m in enumerate(members[1:], start=1):
        if layout(m) != layout(first):
            raise ModelSpecError(f"{what} {names[i]} lays out its input as {layout(m)}, {what} {names[0]} as "
                                 f"{layout(first)}: they must share one layout (head and templates)")
        if m.tokenizer is not first.tokenizer and sorted(m.tokenizer.get_vocab().items()) != vocab:
            raise ModelSpecError(f"{what} {names[i]}'s tokenizer vocabulary differs from {what} {names[0]}'s: "
                                 f"they must share one tokenizer (the input perturbation is per token)")


class EnsembleAdapter(nn.Module):
    """``members``: adapters of one modality and class count; ``combine``: ``logits`` (mean of
    logits) or ``probs`` (mean of softmax probabilities, returned as their log)."""

    def __init__(self, members: Sequence[nn.Module], combine: Literal["logits", "probs"] = "logits"):
        super().__init__()
        members = list(members)
        if len(members) < 1:
            raise ModelSpecError("an ensemble needs at least one member")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            if m.modality != first.modality:
                raise ModelSpecError(f"ensemble member {i} is {m.modality}, member 0 is {first.modality}: "
                                     "members must share one modality")
            if m.num_classes != first.num_classes:
                raise ModelSpecError(f"ensemble member {i} has {m.num_classes} classes, member 0 {first.num_classes}")
        if first.modality == "text":
            check_one_text_layout(members)
        if combine not in ("logits", "probs"):
            raise ModelSpecError(f"ensemble combine {combine!r}; valid: logits, probs")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.modality = first.modality
        self.num_classes = first.num_classes

    def __len__(self) -> int:
        return len(self.members)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in SHARED_ATTRIBUTES:
                return getattr(self._modules["members"][0], name)
            raise

    @property
    def ball_dims(self) -> tuple[int, ...]:
        return self.members[0].ball_dims

    # ------------------------------------------------------------------ the shared input space

    def embed(self, batch: dict) -> Tensor:
        return self.members[0].embed(batch)

    def check_inputs(self, z0: Tensor) -> None:
        check = getattr(self.members[0], "check_inputs", None)
        if check is not None:
            check(z0)

    def member_inputs(self, zs: Sequence[Tensor], batch: dict) -> list[Tensor]:
        """Member i's own input for the shared-space point ``zs[i]`` (see the module docstring)."""
        ref = None if batch is None else self.members[0].embed(batch)
        return [self._own_input(i, z, batch, ref) for i, z in enumerate(zs)]

    def member_input(self, i: int, z: Tensor, batch: dict) -> Tensor:
        """Member i's own input for the shared-space point ``z``."""
        return self._own_input(i, z, batch, self.members[0].embed(batch) if i and batch is not None else None)

    def _own_input(self, i: int, z: Tensor, batch: dict | None, ref: Tensor | None) -> Tensor:
        if i == 0 or batch is None:  # no batch (vision callers may omit it): every member reads z
            return z
        own = self.members[i].embed(batch)
        return z if own is ref else own + (z - ref)  # vision: every member reads the batch's pixel tensor itself

    # ------------------------------------------------------------------ outputs

    def combine_logits(self, member_logits: Tensor) -> Tensor:
        """N x B x K member logits -> B x K ensemble logits (``combine`` rule)."""
        if self.combine == "probs":
            return torch.logsumexp(F.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
        return member_logits.mean(0)

    def member_logits(self, z: Tensor | Sequence[Tensor], batch: dict | None = None) -> Tensor:
        """N x B x K: every member's logits at ``z`` (one point, or a list of one point per member)."""
        zs = list(z) if isinstance(z, (list, tuple)) else [z] * len(self.members)
        if len(zs) != len(self.members):
            raise ValueError(f"{len(zs)} inputs for an ensemble of {len(self.members)} members")
        return torch.stack([m.logits(x, batch) for m, x in zip(self.members, self.member_inputs(zs, batch))])

    def logits(self, z: Tensor | Sequence[Tensor], batch: dict | None = None) -> Tensor:
        """B x K combined logits at ``z``; with a list of N points, the N x B x K member logits."""
        if isinstance(z, (list, tuple)):
            return self.member_logits(z, batch)
        return self.combine_logits(self.member_logits(z, batch))

    forward = logits

    def member_features(self, i: int, z: Tensor, batch: dict, layer: int | None = None) -> Tensor:
        """Member i's features at the shared-space point ``z`` (its ``feature_layer``, or ``layer``)."""
        member = self.members[i]
        x = self.member_input(i, z, batch)
        return member.features(x, batch) if layer is None else member.features(x, batch, layer=layer)

    def member_logit(self, i: int, z: Tensor, batch: dict) -> Tensor:
        """Member i's logits (B x K) at the shared-space point ``z``."""
        return self.members[i].logits(self.member_input(i, z, batch), batch)

    def features(self, z: Tensor, batch: dict, layer: int | None = None) -> Tensor:
        """The members' features side by side, B x sum(D_i)."""
        return torch.cat([self.member_features(i, z, batch, layer).flatten(1) for i in range(len(self.members))], 1)

    # ------------------------------------------------------------------ geometry and data: the first member's

    def perturbable(self, batch: dict) -> Tensor:
        return self.members[0].perturbable(batch)

    def radius(self, z0: Tensor, batch: dict, threat) -> Tensor:
        return self.members[0].radius(z0, batch, threat)

    def project(self, z: Tensor, z0: Tensor, batch: dict, threat) -> Tensor:
        return self.members[0].project(z, z0, batch, threat)

    def collate(self, examples: list[dict]) -> dict:
        return self.members[0].collate(examples)

    @torch.no_grad()
    def predict(self, inputs, batch_size: int = 64) -> Tensor:
        """Predicted class of each input: texts (or pairs) for text members, N x C x H x W images for vision."""
        first = self.members[0]
        device = next(self.parameters()).device
        preds = []
        with eval_mode(self):
            for i in range(0, len(inputs), batch_size):
                chunk = inputs[i:i + batch_size]
                if hasattr(first, "tokenize"):
                    batch = {k: v.to(device) for k, v in first.tokenize(chunk).items()}
                else:
                    batch = {"pixel_values": torch.as_tensor(chunk, dtype=torch.float32).to(device)}
                preds.append(self.logits(self.embed(batch), batch).argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def is_ensemble(adapter: Any) -> bool:
    """True for an :class:`EnsembleAdapter` (also behind a training view)."""
    from .base import unwrap

    return isinstance(unwrap(adapter), EnsembleAdapter)


# ----------------------------------------------------------------------------- building


def ensemble_members(ensemble: Any) -> tuple[list[dict], str]:
    """Normalise a recipe's ``model.ensemble`` (int, list of members, ``{members, combine}`` mapping or
    its pydantic model) into ``([{spec?, options?, seed?}, ...], combine)``."""
    if hasattr(ensemble, "model_dump"):
        ensemble = ensemble.model_dump(exclude_none=True)
    combine = "logits"
    if isinstance(ensemble, dict):
        combine = ensemble.get("combine", combine)
        ensemble = ensemble.get("members")
    if isinstance(ensemble, bool) or not isinstance(ensemble, (int, list)):
        raise ModelSpecError(f"model.ensemble must be a member count or a list of members, got {ensemble!r}")
    if isinstance(ensemble, int):
        if ensemble < 1:
            raise ModelSpecError(f"model.ensemble must be >= 1, got {ensemble}")
        return [{} for _ in range(ensemble)], combine
    members = []
    for i, m in enumerate(ensemble):
        if hasattr(m, "model_dump"):
            m = m.model_dump(exclude_none=True)
        if isinstance(m, str):
            m = {"spec": m}
        if not isinstance(m, dict):
            raise ModelSpecError(f"model.ensemble[{i}] must be a mapping with spec / options, got {m!r}")
        members.append(m)
    if not members:
        raise ModelSpecError("model.ensemble is an empty list")
    return members, combine


def build_ensemble(spec: str, task, ensemble: Any, **options) -> EnsembleAdapter:
    """``model: {spec, options, ensemble}`` -> an :class:`EnsembleAdapter`.

    ``ensemble: 3``: three builds of ``spec`` / ``options``; ``ensemble: [{spec, options, seed}, ...]``:
    one member per entry, its ``spec`` defaulting to ``model.spec`` and its ``options`` merged over
    ``model.options``; ``ensemble: {members: 3 | [...], combine: logits | probs}`` also sets the rule.
    Members are built one after another from the global RNG (so copies start from different random
    weights, reproducibly under the run's seed); a member's ``seed`` pins its own initialisation.
    Members that start with identical weights are warned about: they would train alike.
    """
    from .base import build_model

    members, combine = ensemble_members(ensemble)
    built = []
    for m in members:
        mspec = m.get("spec") or spec
        mopts = {**options, **(m.get("options") or {})}
        if m.get("seed") is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(m["seed"]))
                built.append(build_model(mspec, task, **mopts))
        else:
            built.append(build_model(mspec, task, **mopts))
    for i, j in identical_members(built):
        log.warning("ensemble members %d and %d start with identical weights (a member seed equal to the run's "
                    "seed, or a checkpoint with nothing random in it): they will train alike and add no "
                    "diversity; give them different seeds", i, j)
    return EnsembleAdapter(built, combine=combine)


def identical_members(members: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of members whose state dicts are equal tensor for tensor."""
    states = [m.state_dict() for m in members]
    return [(i, j) for j in range(len(states)) for i in range(j)
            if states[i].keys() == states[j].keys()
            and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(states[i].values(), states[j].values()))]
