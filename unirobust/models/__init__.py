"""Model adapters: wrap a network and expose its continuous input space (see ``base.py``)."""

from .base import ModelAdapter, build_model, unwrap
from .text import TextAdapter
from .vision import VisionAdapter

__all__ = ["ModelAdapter", "TextAdapter", "VisionAdapter", "build_model", "unwrap"]
