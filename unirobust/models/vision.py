"""Vision adapter: pixels in [0, 1] are the continuous input; normalisation lives inside the model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .base import clip_to_ball, eval_mode


class VisionAdapter(nn.Module):
    """Wraps any image classifier ``net`` (expects normalised B x C x H x W, returns B x K logits).

    ``mean`` / ``std``: the normalisation ``net`` was trained with, applied inside ``logits``
    (default none: mean 0, std 1; the ``timm:`` builder passes the task's, or 0.5 per channel).

    ``embed`` returns ``batch["pixel_values"]`` (B x C x H x W in [0, 1]); ``project`` keeps the
    per-image Linf / L2 ball intersected with [0, 1]. ``features`` is the pre-logit representation
    of timm models (``forward_head(..., pre_logits=True)``), or the logits for other networks.

    ``feature_layer`` (recipe option, default None = pre-logits) picks an inner layer instead: for timm
    models the index of a ``forward_intermediates`` stage (0 = stem, 1..4 = ResNet stages; negative
    counts from the last), for an ``nn.Sequential`` net the output of its first ``feature_layer``
    children. ``features(z, batch, layer=...)`` overrides it per call (DVERGE draws a layer per step).
    Inner-layer features are flattened to B x (C * H * W).
    """

    modality = "vision"
    ball_dims = (1, 2, 3)

    def __init__(self, net: nn.Module, num_classes: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, feature_layer: int | None = None):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.feature_layer = feature_layer
        channels = len(mean) if mean is not None else 1
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * channels).view(1, -1, 1, 1))

    def _normalise(self, z: Tensor) -> Tensor:
        return (z - self.mean) / self.std

    def embed(self, batch: dict) -> Tensor:
        return batch["pixel_values"]

    @staticmethod
    def check_inputs(z0: Tensor) -> None:
        """Attacks search a ball of pixels in [0, 1] (and clamp to it): normalised or 0-255 inputs would
        be clamped first, far outside any ball. Pass raw [0, 1] pixels; the adapter normalises them."""
        lo, hi = (float(v) for v in torch.aminmax(z0.detach().float()))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"pixel_values must lie in [0, 1], found {lo:.3g}..{hi:.3g}: attacks perturb and clamp "
                             f"[0, 1] pixels, and the adapter normalises them itself; pass unnormalised pixels and "
                             f"give the normalisation as VisionAdapter(net, num_classes, mean=[...], std=[...])")

    def logits(self, z: Tensor, batch: dict | None = None) -> Tensor:
        return self.net(self._normalise(z))

    forward = logits

    def features(self, z: Tensor, batch: dict | None = None, layer: int | None = None) -> Tensor:
        x = self._normalise(z)
        layer = self.feature_layer if layer is None else layer
        if layer is not None:
            return self._inner_features(x, int(layer)).flatten(1)
        if hasattr(self.net, "forward_features") and hasattr(self.net, "forward_head"):
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net(x)

    def _inner_features(self, x: Tensor, layer: int) -> Tensor:
        """Output of stage ``layer`` (timm ``forward_intermediates``) or of the first ``layer`` children."""
        if hasattr(self.net, "forward_intermediates"):
            return self.net.forward_intermediates(x, indices=[layer], intermediates_only=True)[0]
        if isinstance(self.net, nn.Sequential):
            return self.net[:layer](x)
        from .base import ModelSpecError

        raise ModelSpecError(f"feature_layer={layer}: {type(self.net).__name__} has neither timm's "
                             "forward_intermediates nor nn.Sequential children to cut at")

    def perturbable(self, batch: dict) -> Tensor:
        return torch.ones_like(batch["pixel_values"], dtype=torch.bool)

    def radius(self, z0: Tensor, batch: dict, threat) -> Tensor:
        if getattr(threat, "relative", False):
            raise ValueError("relative budgets (eps x each token's embedding norm) are for text models; "
                             "a pixel budget is absolute")
        return torch.full((z0.shape[0], 1, 1, 1), float(threat.eps), device=z0.device, dtype=z0.dtype)

    def project(self, z: Tensor, z0: Tensor, batch: dict, threat) -> Tensor:
        delta = clip_to_ball(z - z0, threat.norm, self.radius(z0, batch, threat), self.ball_dims)
        return (z0 + delta).clamp(0.0, 1.0)

    def collate(self, examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.from_numpy(np.stack([np.asarray(e["image"], dtype=np.float32) for e in examples])),
            "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),
        }

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> Tensor:
        """Predicted class of each image (N x C x H x W array or tensor in [0, 1])."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        device = self.mean.device
        with eval_mode(self):
            preds = [self.logits(x[i:i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def build_timm(arch: str, task, pretrained: bool = False, head: str = "classifier", **kwargs) -> VisionAdapter:
    """``timm:<arch>``: ``timm.create_model`` sized for the task (classes, input channels).

    ``pretrained=True`` downloads weights from the hub (needs network); the default builds the
    architecture with random weights. Extra recipe options (``drop_rate``, ``img_size`` for ViTs, ...)
    go to ``create_model``. ``head: prompt`` is visual prompting onto the classifier's own outputs
    (options ``prompt``, ``prompt_size``, ``image_size``, ``label_map``, ``source_classes``,
    ``freeze_backbone``; see :func:`unirobust.models.prompt.build_visual_prompt`).
    """
    from ..compat import ensure_torchvision

    ensure_torchvision()
    import timm

    if arch not in timm.list_models(pretrained=False) and not timm.is_model(arch):
        from ..models.base import ModelSpecError

        hint = (f"see timm.list_models('*{arch[:4]}*')" if "/" not in arch and not Path(arch).expanduser().exists()
                else "a timm model is named by its architecture; load your own weights with "
                     "timm:<arch> model.options.checkpoint_path=<file .pth / .safetensors>")
        raise ModelSpecError(f"timm has no model {arch!r}; {hint}")
    from .text import _head_builder

    return _head_builder(VISION_HEADS, head)(arch, task, pretrained=pretrained, **kwargs)


def _build_classifier(arch: str, task, pretrained: bool = False, feature_layer: int | None = None,
                      **kwargs) -> VisionAdapter:
    """``head: classifier``: the timm model with a new head for the task's classes.

    ``feature_layer``: the stage ``features`` returns (default None: pre-logits; see :class:`VisionAdapter`).
    """
    import timm

    taken = sorted({"num_classes", "in_chans"} & set(kwargs))
    if taken:
        from ..models.base import ModelSpecError

        raise ModelSpecError(f"model option(s) {', '.join(taken)} come from the task (its classes and image "
                             f"channels); remove them from model.options")
    channels = task.image_shape[0]
    checkpoint = kwargs.get("checkpoint_path")
    if checkpoint is None:
        net = timm.create_model(arch, pretrained=pretrained, num_classes=task.num_classes, in_chans=channels, **kwargs)
    else:
        net = _create_from_checkpoint(arch, task, Path(str(checkpoint)).expanduser(), pretrained, kwargs)
    return VisionAdapter(net, task.num_classes, task.mean or [0.5] * channels, task.std or [0.5] * channels,
                         feature_layer=feature_layer)


def _create_from_checkpoint(arch: str, task, path: Path, pretrained: bool, kwargs: dict):
    """``timm.create_model`` sized for the task, then ``checkpoint_path``'s weights (see
    :func:`create_with_checkpoint`)."""
    return create_with_checkpoint(arch, path, pretrained, {**kwargs, "num_classes": task.num_classes,
                                                           "in_chans": task.image_shape[0]})


def read_checkpoint(path: Path) -> dict:
    """The weights in ``path`` by timm's reader (safetensors, or ``torch.load(weights_only=True)``;
    ``state_dict`` / EMA keys and a ``module.`` prefix handled). A unirobust run's ``model.safetensors``
    (the adapter's state: ``net.*`` plus its ``mean`` / ``std``, and a visual prompt's ``prompt``)
    gives its network's weights. A missing file, or one of pickled objects, is a :class:`ModelSpecError`."""
    import pickle

    from timm.models import load_state_dict

    from ..models.base import ModelSpecError

    if not path.is_file():
        raise ModelSpecError(f"model.options.checkpoint_path: no file {path}")
    try:
        state = load_state_dict(str(path))
    except (pickle.UnpicklingError, RuntimeError) as err:
        if not isinstance(err, pickle.UnpicklingError) and "weights_only" not in str(err):
            raise
        raise ModelSpecError(f"model.options.checkpoint_path {path} holds pickled objects, not weights alone: a "
                             f"whole pickled model is not loaded, for safety (torch.load weights_only); where "
                             f"you trust it, load it and save its state_dict(), or save safetensors") from None
    if any(k.startswith("net.") for k in state) and all(k.startswith("net.") or k in ADAPTER_STATE for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}  # a unirobust run's weights
    return state


#: Entries of a unirobust vision adapter's state besides its network's (``net.*``).
ADAPTER_STATE = {"mean", "std", "prompt"}


def create_with_checkpoint(arch: str, path: Path, pretrained: bool, create: dict, state: dict | None = None):
    """``timm.create_model(arch, **create)`` loaded with the weights of ``checkpoint_path`` (``state``
    if already read). Weights of another shape are a :class:`ModelSpecError` naming the file, the
    classes and the channels (timm raises bare errors)."""
    import timm

    from ..models.base import ModelSpecError

    create = {k: v for k, v in create.items() if k != "checkpoint_path"}
    try:
        if path.suffix in NUMPY_CHECKPOINTS:  # big_vision / JAX weights: timm's own loader (model.load_pretrained)
            if not path.is_file():
                raise ModelSpecError(f"model.options.checkpoint_path: no file {path}")
            return timm.create_model(arch, pretrained=pretrained, checkpoint_path=str(path), **create)
        state = read_checkpoint(path) if state is None else state
        net = timm.create_model(arch, pretrained=pretrained, **create)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = "; ".join(line.strip() for line in str(err).splitlines()[:3])  # missing keys, other shapes
        raise ModelSpecError(f"model.options.checkpoint_path {path} does not fit timm:{arch} with "
                             f"{create.get('num_classes')} classes and {create.get('in_chans', 3)} input channels: "
                             f"{first[:400]}") from None
    return net


#: Checkpoint files timm reads itself (JAX / big_vision ``.npz`` weights of ViTs and relatives).
NUMPY_CHECKPOINTS = (".npz", ".npy")


#: ``head`` option of ``timm:`` models -> builder (lazy "module:attr").
VISION_HEADS = {
    "classifier": "unirobust.models.vision:_build_classifier",
    "prompt": "unirobust.models.prompt:build_visual_prompt",
}
