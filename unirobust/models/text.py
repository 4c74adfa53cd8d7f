"""Text adapter: input token embeddings (B x T x D) are the continuous input.

``logits(embed(b), b)`` feeds ``inputs_embeds`` to the Hugging Face model, which adds position and
segment embeddings itself, so it equals ``model(input_ids)``. The threat model is a per-token ball
(L2 or Linf, optionally scaled by the token's embedding norm); padding and special tokens never move.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import clip_to_ball, eval_mode, mean_pool, unit_norm

log = logging.getLogger(__name__)


class TextAdapter(nn.Module):
    """Wraps a sequence classifier (``AutoModelForSequenceClassification``-like) and its tokenizer.

    ``text_fields`` are the example keys fed to the tokenizer (one, or two for sentence pairs);
    every batch is padded to its longest member, rounded up to a multiple of 8.
    """

    modality = "text"
    ball_dims = (-1,)

    def __init__(self, model: nn.Module, tokenizer, num_classes: int, text_fields: Sequence[str] = ("sentence",),
                 max_length: int = 128, feature_layer: int = -1):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.text_fields = list(text_fields)
        self.max_length = max_length
        self.feature_layer = feature_layer
        # [UNK] stands for a real input word (one the vocabulary lacks): it moves like any other word,
        # unless the same token is also another special token (GPT-2's <|endoftext|> is unk, bos and eos)
        others = {tokenizer.convert_tokens_to_ids(t) for name, t in tokenizer.special_tokens_map.items()
                  if name != "unk_token" and isinstance(t, str)}
        special = set(tokenizer.all_special_ids) - ({tokenizer.unk_token_id} - others)
        self.register_buffer("special_ids", torch.tensor(sorted(special), dtype=torch.long), persistent=False)

    def _model_inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}

    def embed(self, batch: dict) -> Tensor:
        return self.model.get_input_embeddings()(batch["input_ids"])

    def logits(self, z: Tensor, batch: dict) -> Tensor:
        return self.model(inputs_embeds=z, **self._model_inputs(batch)).logits

    forward = logits

    def features(self, z: Tensor, batch: dict, layer: int | None = None) -> Tensor:
        """Mean-pooled hidden states of layer ``feature_layer`` (or ``layer``, if given) over real tokens (B x D).

        Hidden state 0 is the embedding output, ``i`` the output of encoder layer ``i``, -1 the last.
        """
        out = self.model(inputs_embeds=z, output_hidden_states=True, **self._model_inputs(batch))
        index = self.feature_layer if layer is None else layer
        if not -len(out.hidden_states) <= index < len(out.hidden_states):
            raise ValueError(f"feature layer {index}: the model has hidden states 0..{len(out.hidden_states) - 1} "
                             "(0 = embeddings)")
        return mean_pool(out.hidden_states[index], batch["attention_mask"])

    def perturbable(self, batch: dict) -> Tensor:
        """B x T bool: real tokens that are not special tokens ([CLS], [SEP], ...; [UNK] is a real word)."""
        ids = batch["input_ids"]
        return batch["attention_mask"].bool() & ~torch.isin(ids, self.special_ids.to(ids.device))

    def radius(self, z0: Tensor, batch: dict, threat) -> Tensor:
        if getattr(threat, "relative", False):
            return float(threat.eps) * unit_norm(z0, "l2", self.ball_dims).detach()
        return torch.full_like(z0[..., :1], float(threat.eps))

    def project(self, z: Tensor, z0: Tensor, batch: dict, threat) -> Tensor:
        delta = clip_to_ball(z - z0, threat.norm, self.radius(z0, batch, threat), self.ball_dims)
        return z0 + delta * self.perturbable(batch).unsqueeze(-1).to(delta.dtype)

    def tokenize(self, texts: Sequence[str] | Sequence[Sequence[str]]) -> dict:
        """Tokenize single texts or (first, second) pairs, padded to the longest."""
        columns = list(zip(*texts)) if texts and not isinstance(texts[0], str) else [list(texts)]
        return dict(self.tokenizer(*[list(c) for c in columns], padding=True, truncation=True,
                                   max_length=self.max_length, pad_to_multiple_of=self.pad_multiple,
                                   return_tensors="pt"))

    @property
    def pad_multiple(self) -> int | None:
        """8 on accelerators (tensor-core friendly shapes); none on CPU, where the extra padding
        only costs time (MiniLM on SST-2 dev, batch 32, 2 threads: 170 vs 141 sentences/s)."""
        return None if self.special_ids.device.type == "cpu" else 8

    def collate(self, examples: list[dict]) -> dict:
        if len(self.text_fields) == 1:
            texts = [e[self.text_fields[0]] for e in examples]
        else:
            texts = [tuple(e[f] for f in self.text_fields) for e in examples]
        batch = self.tokenize(texts)
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch

    @torch.no_grad()
    def predict(self, texts, batch_size: int = 64) -> Tensor:
        """Predicted class of each text (or (first, second) pair)."""
        device = self.special_ids.device
        preds = []
        with eval_mode(self):
            for i in range(0, len(texts), batch_size):
                batch = {k: v.to(device) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
                preds.append(self.logits(self.embed(batch), batch).argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def build_hf(name: str, task, max_length: int = 128, pretrained: bool = True, feature_layer: int = -1,
             head: str = "classifier", **kwargs) -> TextAdapter:
    """``hf:<hub id or local folder>``: tokenizer + a model with the chosen ``head``.

    Hub ids with an offline copy shipped in a package (``sentence-transformers/all-MiniLM-L6-v2``)
    resolve to that copy; others load from the hub cache or download. ``pretrained=False`` keeps the
    architecture and tokenizer but initialises every weight at random.

    ``head``: ``classifier`` (default): ``AutoModelForSequenceClassification``; the classification
    head is new (random) unless the checkpoint has one for this many labels, whose outputs are put
    in the task's label order by name (see :func:`_align_label_order`). ``prompt``: templates +
    verbalizer read at the mask (MVP; options ``templates``, ``verbalizer``, ``scorer``; see
    :func:`unirobust.models.prompt.build_prompt_hf`). Other options go to ``from_pretrained``.
    """
    from ..compat import ensure_torchvision
    from ..offline import resolve_hf_model

    ensure_torchvision()  # transformers imports torchvision, whose PyPI build breaks next to CPU torch
    build = _head_builder(TEXT_HEADS, head)
    path = resolve_hf_model(name)
    tokenizer = _tokenizer_of(path, name)
    special = tokenizer.num_special_tokens_to_add(pair=len(task.text_fields) == 2)
    if max_length <= special + len(task.text_fields):
        from .base import ModelSpecError

        raise ModelSpecError(f"model.options.max_length {max_length} leaves no token for the text: the tokenizer "
                             f"adds {special} special tokens to each input of task {task.name!r}")
    return build(path, task, tokenizer, pretrained=pretrained, max_length=max_length, feature_layer=feature_layer,
                 **kwargs)


def _tokenizer_of(path: str, name: str):
    """The model's tokenizer; a local folder saved without one (only ``config.json`` and weights, as
    ``model.save_pretrained`` alone writes) is a :class:`ModelSpecError` that says how to add it."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
             "sentencepiece.bpe.model")
    if local.is_dir() and not any((local / f).exists() for f in names):
        from .base import ModelSpecError

        raise ModelSpecError(f"hf:{name}: the folder {local} has no tokenizer files ({', '.join(names[:3])}, ...); "
                             f"save the tokenizer beside the model: tokenizer.save_pretrained('{local}')")
    return AutoTokenizer.from_pretrained(path)


def _build_classifier(path: str, task, tokenizer, pretrained: bool = True, max_length: int = 128,
                      feature_layer: int = -1, freeze_embeddings: bool = False, **kwargs) -> TextAdapter:
    """``head: classifier``: ``AutoModelForSequenceClassification`` sized for the task's labels.

    ``freeze_embeddings``: keep the input word-embedding matrix fixed (no gradient, no optimizer
    state: most of a small model's parameters; text ensemble members then share it exactly).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = {"num_labels": task.num_classes, "id2label": dict(enumerate(task.labels)),
              "label2id": {n: i for i, n in enumerate(task.labels)}}
    if pretrained:
        own = checkpoint_label_names(AutoConfig.from_pretrained(path))
        if own is not None and len(own) == task.num_classes:  # a fine-tuned head: keep it, then reorder
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            _align_label_order(model, own, list(task.labels))
            model.config.update(labels)
        else:  # no head, or one for another number of labels: a new head
            if own is not None:
                log.warning("%s has a head for %d labels %s; the task has %d: the head is new (random)",
                            path, len(own), own, task.num_classes)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, **labels, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
            if own is None and not info["missing_keys"] and not info["mismatched_keys"]:  # a trained head, unnamed
                log.warning("%s names its outputs LABEL_0, LABEL_1, ...: its head is kept and output i is read as "
                            "the task's label i %s; if it was trained with another order, give the checkpoint "
                            "config.id2label (or the task its labels in the checkpoint's order)", path, task.labels)
    else:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, **labels, **kwargs))
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return TextAdapter(model, tokenizer, task.num_classes, task.text_fields, max_length, feature_layer)


def checkpoint_label_names(config) -> list[str] | None:
    """The label names a checkpoint's config gives its outputs, or None when it names none
    (``LABEL_0``, ``LABEL_1``, ...: transformers' defaults, no fine-tuned head to speak of)."""
    names = [str(config.id2label[i]) for i in sorted(config.id2label)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def _align_label_order(model, own: list[str], wanted: list[str]) -> None:
    """Permute the output rows of ``model``'s classification layer from the checkpoint's label order
    ``own`` to the task's ``wanted`` order, matching names case-insensitively (``roberta-large-mnli``
    says CONTRADICTION, NEUTRAL, ENTAILMENT; the ``mnli`` task entailment, neutral, contradiction).

    Names that do not match keep the checkpoint's order, with a warning naming both lists.
    """
    from .base import ModelSpecError

    key = [n.lower() for n in own]
    if sorted(key) != sorted(n.lower() for n in wanted):
        log.warning("the checkpoint's labels %s are not the task's %s: its outputs keep their order "
                    "(output i is read as the task's label i). If they name the same classes in another "
                    "order, give the task the checkpoint's names in the task's order (task.labels=[...], when "
                    "the data's labels are indices) or the checkpoint the task's names (config.json "
                    "id2label, when the data's labels are names) so that the outputs are reordered", own, wanted)
        return
    order = [key.index(n.lower()) for n in wanted]
    if order == list(range(len(order))):
        return
    prefix = getattr(model, "base_model_prefix", "")
    heads = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == len(order)
             and not (prefix and name.startswith(prefix + "."))]
    if not heads:
        raise ModelSpecError(f"cannot find the output layer of {type(model).__name__} to put its labels {own} "
                             f"in the task's order {wanted}")
    out = heads[-1]
    with torch.no_grad():
        out.weight.copy_(out.weight[order])
        if out.bias is not None:
            out.bias.copy_(out.bias[order])
    log.info("checkpoint labels %s reordered to the task's %s", own, wanted)


#: ``head`` option of ``hf:`` models -> builder (lazy "module:attr", so prompt code loads only when used).
TEXT_HEADS = {
    "classifier": "unirobust.models.text:_build_classifier",
    "prompt": "unirobust.models.prompt:build_prompt_hf",
}


def _head_builder(heads: dict, head: str):
    """The builder of ``head`` from a table of lazy ``"module:attr"`` paths; unknown heads list the valid ones."""
    import importlib

    from .base import ModelSpecError

    if head not in heads:
        raise ModelSpecError(f"unknown model head {head!r}; valid: {', '.join(sorted(heads))}")
    module, _, attr = heads[head].partition(":")
    return getattr(importlib.import_module(module), attr)
