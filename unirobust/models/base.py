"""The adapter contract every attack, defense and evaluation is written against.

``z = embed(batch)`` is the clean point in the model's continuous input space (pixels B x C x H x W
in [0, 1], or token embeddings B x T x D); ``logits(z, batch)`` runs the rest of the model, and
``logits(embed(b), b)`` equals the plain model output. ``project`` keeps a moved point inside the
threat model's ball (and the valid set); ``perturbable`` says which entries may move.

Geometry is shared: a *ball unit* is one example for vision (norm over C, H, W) and one token for
text (norm over D). ``ball_dims`` names the dims of a unit; ``radius`` gives each unit's eps.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class ModelAdapter(Protocol):
    modality: Literal["vision", "text"]
    num_classes: int
    ball_dims: tuple[int, ...]

    def embed(self, batch: dict) -> Tensor: ...
    def logits(self, z: Tensor, batch: dict) -> Tensor: ...
    def features(self, z: Tensor, batch: dict) -> Tensor: ...
    def project(self, z: Tensor, z0: Tensor, batch: dict, threat: Any) -> Tensor: ...
    def perturbable(self, batch: dict) -> Tensor: ...
    def radius(self, z0: Tensor, batch: dict, threat: Any) -> Tensor: ...
    def collate(self, examples: list[dict]) -> dict: ...
    def predict(self, inputs: Any, batch_size: int = 64) -> Tensor: ...


@contextmanager
def eval_mode(module):
    """Run the block with ``module`` in eval mode, then restore every submodule's own previous mode
    (attacks, evaluation and ``predict`` use this). Restoring with ``module.train(was)`` would set
    all submodules alike: a user's model in eval mode (as ``from_pretrained`` returns it), or a
    frozen BatchNorm kept in eval while fine-tuning, would come back in train mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def forked_rng(device: torch.device):
    """``torch.random.fork_rng`` for work on ``device``: the CPU generator always, an accelerator's
    (cuda, mps, xpu) when used; the caller's random stream is as it was after the block."""
    on_device = device.type != "cpu"
    return torch.random.fork_rng(devices=[device] if on_device else [],
                                 device_type=device.type if on_device else "cuda")


def device_of(module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def batch_to(batch: dict, device) -> dict:
    """A batch dict with its tensors moved to ``device`` (other entries as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def unwrap(model: Any) -> Any:
    """The plain adapter behind a training view (attacks must not run through DDP)."""
    return getattr(model, "unwrapped", model)


# ----------------------------------------------------------------------------- lp geometry


def unit_norm(x: Tensor, norm: str, dims: tuple[int, ...]) -> Tensor:
    """Per-unit norm of ``x``, kept as broadcastable dims."""
    if norm == "linf":
        return x.abs().amax(dim=dims, keepdim=True)
    return x.pow(2).sum(dim=dims, keepdim=True).sqrt()


def away_from_zero(norm: Tensor) -> Tensor:
    """``norm`` clamped to at least 1e-12, or to the dtype's smallest normal number where 1e-12 rounds
    to 0 (float16): a zero norm divides to 0, never to NaN (0 / 0)."""
    return norm.clamp_min(max(1e-12, torch.finfo(norm.dtype).tiny))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """N x T x D -> N x D: mean over the attended tokens (sentence-transformers' pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def normalize_step(grad: Tensor, norm: str, dims: tuple[int, ...]) -> Tensor:
    """Steepest-ascent direction of unit size: sign for Linf, grad / ||grad||_2 per unit for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / away_from_zero(unit_norm(grad, "l2", dims))


def clip_to_ball(delta: Tensor, norm: str, radius: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Project ``delta`` onto the per-unit ball of ``radius`` (broadcastable to delta)."""
    if norm == "linf":
        return delta.clamp(min=-radius, max=radius)
    scale = (radius / away_from_zero(unit_norm(delta, "l2", dims))).clamp(max=1.0)
    return delta * scale


def random_in_ball(shape_like: Tensor, norm: str, radius: Tensor, dims: tuple[int, ...]) -> Tensor:
    """A random point inside each unit's ball: uniform for Linf, random direction x U(0,1) radius for L2."""
    if norm == "linf":
        return (torch.rand_like(shape_like) * 2 - 1) * radius
    direction = normalize_step(torch.randn_like(shape_like), "l2", dims)
    size = torch.rand_like(unit_norm(shape_like, "l2", dims))
    return direction * size * radius


# ----------------------------------------------------------------------------- building


class ModelSpecError(ValueError):
    """A model spec that cannot be parsed or built."""


def build_model(spec: str, task, ensemble: Any = None, **options) -> nn.Module:
    """Build an adapter from ``"<source>:<name>"`` (``timm:resnet18``, ``hf:roberta-base``).

    A bare existing directory is treated as a Hugging Face model folder. ``ensemble`` (a recipe's
    ``model.ensemble``: a member count, a list of members, or ``{members, combine}``) builds an
    :class:`~unirobust.models.ensemble.EnsembleAdapter` of such models instead.
    """
    from pathlib import Path

    from ..registry import MODELS

    if not isinstance(spec, str):
        raise ModelSpecError(f"a model spec is a string such as 'timm:resnet18' or 'hf:<name or folder>', got "
                             f"{type(spec).__name__}; wrap a model object of your own in an adapter instead: "
                             f"VisionAdapter(net, num_classes, mean, std) or TextAdapter(model, tokenizer, "
                             f"num_classes, text_fields) from unirobust.models")
    if ensemble is not None:
        from .ensemble import build_ensemble

        return build_ensemble(spec, task, ensemble, **options)

    source, sep, name = spec.partition(":")
    if not sep:
        if Path(spec).is_dir():
            source, name = "hf", spec
        else:
            raise ModelSpecError(f"model spec {spec!r} needs a source prefix; valid: "
                                 + ", ".join(f"{s}:<name>" for s in MODELS.names()))
    modality = {"timm": "vision", "hf": "text"}.get(source)
    if modality and getattr(task, "modality", modality) != modality:
        raise ModelSpecError(f"model {spec!r} is a {modality} model and task {task.name!r} is a {task.modality} "
                             f"task; use a {'timm:' if task.modality == 'vision' else 'hf:'} model for it")
    try:
        return MODELS.build(source, name, task, **options)
    except TypeError as err:  # a misspelt or foreign model.options key reaches a constructor
        if "unexpected keyword argument" not in str(err):
            raise
        raise ModelSpecError(f"model {spec!r} does not take an option given in model.options: {err}") from None


def build_from_config(model, task) -> nn.Module:
    """The adapter a recipe's ``model`` section describes (``spec``, ``options``, ``ensemble``)."""
    return build_model(model.spec, task, ensemble=getattr(model, "ensemble", None), **model.options)
