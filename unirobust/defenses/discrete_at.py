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


def _runs(positions: list[int]) -> list[list[int]]:
    """Consecutive stretches of sorted positions: [1, 2, 3, 6, 7] -> [[1, 2, 3], [6, 7]]."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def decode_examples(adapter, batch: dict, rows: list[int]) -> list[dict]:
    """The example dicts (text fields + label) behind ``rows`` of a tokenized text batch.

    A field is a stretch of the adapter's input tokens (``perturbable``: no special token, and no
    template token of a prompt head); fields are told apart by what separates them ([SEP], template
    words), so pairs decode with or without token type ids. A row whose stretches cannot be matched
    to its fields one to one (a field truncated away, a pair template with nothing between its
    fields) is left out.
    """
    tok = adapter.tokenizer
    fields = adapter.text_fields
    inputs = adapter.perturbable(batch)
    out = []
    for r in rows:
        runs = _runs(inputs[r].nonzero().flatten().tolist())
        if len(fields) == 1:
            runs = [[p for run in runs for p in run]]
        if len(runs) != len(fields):
            continue
        ids = batch["input_ids"][r]
        texts = [tok.decode(ids[run], clean_up_tokenization_spaces=False) for run in runs]
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
        examples = decode_examples(adapter, batch, rows)  # rows it cannot decode are not attacked
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
                "stats": {"attacked": float(len(examples)), "adversarial_examples": float(len(adversarial))}}
