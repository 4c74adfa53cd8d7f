"""Empirical risk minimisation: cross-entropy on clean inputs (the baseline every defense is compared to)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass


@dataclass(config=ConfigDict(extra="forbid"))
class ERM:
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    def loss(self, model, batch: dict) -> dict:
        logits = model.logits(model.embed(batch), batch)
        return {"loss": F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing),
                "logits": logits}
