"""Model adapters: wrap a network and expose its continuous input space (see ``base.py``)."""

from .base import ModelAdapter, build_model, unwrap

__all__ = ["ModelAdapter", "build_model", "unwrap"]
