"""Import-time compatibility shims.

``ensure_torchvision()``: the PyPI torchvision wheel is a CUDA build. Next to a CPU-only torch its
compiled extension (``torchvision/_C.so``, linked against ``libc10_cuda.so``) cannot load, and
``import torchvision`` (hence ``import timm`` / ``import textattack``) dies with
``RuntimeError: operator torchvision::nms does not exist``: ``torchvision/_meta_registrations.py``
calls ``torch.library.register_fake`` on ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, while every other fake/autograd/autocast registration is guarded by
``torchvision.extension._has_ops()``. Defining just those two schemas (with a CPU kernel that
raises ``NotImplementedError``) before torchvision is imported makes the import succeed; the
public ``torchvision.ops`` functions still raise torchvision's own "Couldn't load custom C++ ops"
error. When the extension loads (a matching torchvision build) this function changes nothing.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# Exactly the ops torchvision registers fake kernels for without checking _has_ops().
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keep the torch.library.Library alive: registrations vanish when it is collected


def _extension_loads(pkg_dir: str) -> bool:
    """Try to load torchvision's ``_C`` the way ``torchvision.extension`` does."""
    import torch

    if os.name == "nt":
        os.add_dll_directory(pkg_dir)
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    try:  # AttributeError: no _C file at all
        torch.ops.load_library(importlib.machinery.FileFinder(pkg_dir, loader).find_spec("_C").origin)
        return True
    except (AttributeError, ImportError, OSError) as e:
        log.debug("torchvision extension does not load: %s", e)
        return False


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work with a CPU torch and a CUDA torchvision wheel. Idempotent."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    if hasattr(torch.ops.torchvision, "nms") or _extension_loads(spec.submodule_search_locations[0]):
        return

    def _missing(*args, **kwargs):
        raise NotImplementedError("torchvision's compiled ops did not load (CUDA torchvision wheel "
                                  "with a CPU torch?); install a torchvision build matching torch")

    _LIB = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        _LIB.define(schema)
        _LIB.impl(name, _missing, "CPU")
    log.info("torchvision extension unavailable; registered placeholder ops %s", sorted(_SCHEMAS))
