"""Attack-augmented training with discrete word substitutions (A2T: Yoo & Qi, "Towards Improving
Adversarial Training of NLP Models", Findings of EMNLP 2021).

Per batch, the first ``fraction`` of the examples are attacked with a cheap word attack (default
the ``a2t`` recipe: gradient word order, counter-fitted neighbours, at most 10% of words); the
successful adversarial texts join the batch with their original labels:

    loss = (sum_clean CE + adv_weight * sum_adv CE) / (B + adv_weight * n_adv)

Departures: A2T attacks a sample of the training set once per epoch after clean warm-up epochs;
here the attack runs per batch on the current model (fresher examples, no separate pass), while
its word vectors (neighbours, cosine constraint) are those of the model at the first batch, fixed for
the run as A2T's counter-fitted GloVe vectors are. The
batch's texts are recovered by decoding its token ids (lower-cased for uncased tokenizers, exactly
what the model saw). The attack runs on the unwrapped model in eval mode; text models only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from ..models.base import eval_mode, unwrap


def decode_examples(adapter, batch: dict, rows: list[int]) -> list[dict]:
    """The example dicts (text fields + label) behind ``rows`` of a tokenized text batch."""
    tok = adapter.tokenizer
    out = []
    for r in rows:
        ids = batch["input_ids"][r][batch["attention_mask"][r].bool()]
        segments = batch.get("token_type_ids")
        fields = adapter.text_fields
        if len(fields) == 1 or segments is None:
            texts = [tok.decode(ids, skip_special_tokens=True)]
        else:
            seg = segments[r][batch["attention_mask"][r].bool()]
            texts = [tok.decode(ids[seg == s], skip_special_tokens=True) for s in range(len(fields))]
        out.append({**dict(zip(fields, texts)), "label": int(batch["labels"][r])})
    return out


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class DiscreteAT:
    attack: Any
    fraction: float = Field(default=0.5, gt=0, le=1, description="share of each batch that is attacked")
    adv_weight: float = Field(default=1.0, ge=0)

    attack_kind: ClassVar[str] = "word"
    default_attack: ClassVar[dict] = {"name": "a2t"}

    def loss(self, model, batch: dict) -> dict:
        from ..attacks.text.attack import attack_examples

        adapter = unwrap(model)
        z = model.embed(batch)
        logits = model.logits(z, batch)
        per = F.cross_entropy(logits, batch["labels"], reduction="none")
        rows = list(range(max(1, round(self.fraction * len(per)))))
        examples = decode_examples(adapter, batch, rows)
        self.attack.pin_vectors(adapter)  # word vectors of the first batch's model, kept for the run
        with eval_mode(adapter):
            records, _ = attack_examples(adapter, examples, self.attack, progress=False)
        adversarial = [{**examples[r.index], r.field: r.adversarial} for r in records if r.status == "success"]
        total, count = per.sum(), float(len(per))
        if adversarial and self.adv_weight:
            device = batch["input_ids"].device
            adv = {k: v.to(device) for k, v in adapter.collate(adversarial).items()}
            adv_per = F.cross_entropy(model.logits(model.embed(adv), adv), adv["labels"], reduction="none")
            total = total + self.adv_weight * adv_per.sum()
            count += self.adv_weight * len(adv_per)
        return {"loss": total / count, "logits": logits,
                "stats": {"attacked": float(len(rows)), "adversarial_examples": float(len(adversarial))}}
