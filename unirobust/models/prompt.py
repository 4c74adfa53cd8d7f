"""Prompt heads: a template + verbalizer for text models, a learned input prompt for vision models.

Text — MVP: Raman et al., "Model-tuning Via Prompts Makes NLP Models Adversarially Robust", EMNLP 2023.
Instead of a randomly initialised classification head, each input is wrapped in one or more
templates (``"{sentence} It was [MASK]."``, pairs ``"{premise} ? [MASK] , {hypothesis}"``) and the
class score is read at the mask position from the verbalizer words of that class (``negative:
[terrible]``). With a masked-LM head the score of a word is its MLM logit; on an encoder without
one (e.g. all-MiniLM-L6-v2, a ``BertModel``) it is the dot product of the mask's last hidden state
with the word's (tied) input embedding, so no parameter is randomly initialised. Scores of several
words of a class are averaged, and so are the class scores of several templates. The full model is
tuned.

The continuous input ``z = embed(batch)`` is the token-embedding sequence of the *first* template
(B x T x D), exactly as for :class:`~unirobust.models.text.TextAdapter`; ``perturbable`` marks only
the real tokens of the inputs (never template, mask, special or padding tokens), so every attack and
defense works unchanged. Further templates take their input tokens from ``z`` (through
``batch["prompt_source"]``), so one perturbation of a word acts on all templates alike.

A sentence encoder (all-MiniLM-L6-v2) was trained to embed sentences, not to fill masks: its mask
state carries almost nothing. ``scorer: similarity`` reads it the way it was trained instead: the
score of a word is the cosine of the prompted input's mean-pooled embedding (mask included) with the
mean-pooled embedding of its label sentence, the template's own text with the word at the mask
(``"It was great."``), times a fixed scale (20, sentence-transformers' contrastive scale). Label
sentences go through the same encoder in every forward, so they are tuned with it and nothing is
randomly initialised.

Departures from MVP: the paper uses RoBERTa's MLM head (we fall back to the tied-embedding score
when the checkpoint has none); multi-word classes average the words' logits; with two inputs and no
explicit ``[SEP]`` in the template, the sequence is split into segments right before the second
input (so BERT-style token type ids stay 0 / 1 as in the plain pair encoding).

Vision — visual prompting: Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale
Models", 2022 (after Elsayed et al., "Adversarial Reprogramming of Neural Networks", ICLR 2019).
The image (pixels in [0, 1], the attack's space) is resized into a frame of learned prompt pixels
(``pad``: a border of width p around the image resized to S - 2p; ``patch``: a p x p square in the
corner of the image resized to S), and a fixed label mapping reads the task's classes from an
existing classifier's outputs. Departure: prompt pixels *replace* the frame (Bahng et al. add an
unconstrained prompt) and are ``sigmoid(theta)``, so no pixel ever leaves [0, 1].
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModelSpecError, mean_pool
from .text import TextAdapter
from .vision import VisionAdapter

log = logging.getLogger(__name__)

MASK = "[MASK]"
SEP = "[SEP]"
_PARTS = re.compile(r"\{(\w+)\}|\[MASK\]|\[SEP\]")

# roles of a token in a prompted sequence (input tokens are numbered 0, 1, ... instead)
TEMPLATE, SPECIAL = -1, -2
SCORERS = ("mlm", "embedding", "similarity")


# ----------------------------------------------------------------------------- templates


def parse_template(template: str, text_fields: Sequence[str], mask_token: str | None = None) -> list[list[tuple]]:
    """``"{premise} ? [MASK] , {hypothesis}"`` -> segments of parts ``("text", s)``, ``("field", i)``, ``("mask",)``.

    Every text field appears exactly once and ``[MASK]`` (or the tokenizer's own mask token)
    exactly once. ``[SEP]`` splits the template into two segments; without it, a two-field
    template is split right before the second field it names.
    """
    if mask_token and mask_token != MASK:
        template = template.replace(mask_token, MASK)
    parts: list[tuple] = []
    pos = 0
    for m in _PARTS.finditer(template):
        if m.start() > pos:
            parts.append(("text", template[pos:m.start()]))
        if m.group(1) is not None:
            if m.group(1) not in text_fields:
                raise ModelSpecError(f"template {template!r} names {{{m.group(1)}}}, which is not a text field "
                                     f"of the task ({', '.join(text_fields)})")
            parts.append(("field", list(text_fields).index(m.group(1))))
        else:
            parts.append(("mask",) if m.group(0) == MASK else ("sep",))
        pos = m.end()
    if pos < len(template):
        parts.append(("text", template[pos:]))
    fields = [p[1] for p in parts if p[0] == "field"]
    if sorted(fields) != list(range(len(text_fields))):
        raise ModelSpecError(f"template {template!r} must name each text field once: "
                             + ", ".join("{" + f + "}" for f in text_fields))
    if sum(p[0] == "mask" for p in parts) != 1:
        raise ModelSpecError(f"template {template!r} needs exactly one {MASK}")
    seps = [i for i, p in enumerate(parts) if p[0] == "sep"]
    if len(seps) > 1:
        raise ModelSpecError(f"template {template!r}: at most one {SEP} (two segments)")
    if not seps and len(text_fields) == 2:
        seps = [parts.index(("field", fields[1]))]
        parts.insert(seps[0], ("sep",))
    if not seps:
        return [parts]
    return [parts[:seps[0]], parts[seps[0] + 1:]]


class _Encoder:
    """Tokenizes pieces so that their concatenation matches how the whole text would tokenize:
    a piece after whitespace is encoded as it appears after a space (matters for BPE vocabularies)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._probe = tokenizer("x", add_special_tokens=False)["input_ids"]

    def many(self, texts: Sequence[str], after_space: bool, limit: int | None = None) -> list[list[int]]:
        """Token ids of each text (at most ``limit`` of them), without special tokens."""
        if not texts:
            return []
        cut = {"truncation": True, "max_length": limit} if limit else {}
        if not after_space:
            return self.tokenizer(list(texts), add_special_tokens=False, **cut)["input_ids"]
        n = len(self._probe)
        cut = {"truncation": True, "max_length": limit + n} if limit else {}
        out = self.tokenizer(["x " + t for t in texts], add_special_tokens=False, **cut)["input_ids"]
        plain = None
        result = []
        for i, ids in enumerate(out):
            if ids[:n] == self._probe:
                result.append(ids[n:])
            else:  # the probe merged with the text: fall back to plain encoding
                plain = plain or self.many(texts, False, limit)
                result.append(plain[i])
        return result

    def one(self, text: str, after_space: bool) -> list[int]:
        return self.many([text], after_space)[0]


def _truncate(lengths: list[int], budget: int) -> list[int]:
    """Longest-first truncation of the inputs' token counts to ``budget`` in total."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        second = max([n for j, n in enumerate(lengths) if j != i], default=0)
        lengths[i] -= min(sum(lengths) - budget, max(1, lengths[i] - second))
    return lengths


# ----------------------------------------------------------------------------- text adapter


class PromptAdapter(TextAdapter):
    """A masked-LM-style model read through templates and a verbalizer (``head: prompt``).

    ``model``: an ``AutoModelForMaskedLM`` (``scorer="mlm"``) or a bare encoder (``scorer="embedding"``:
    mask hidden state x tied input embedding; ``scorer="similarity"``: ``similarity_scale`` x cosine of
    the mean-pooled prompted input with the mean-pooled label sentence of each word, see
    :func:`label_sentence`). ``templates``: strings with ``{field}`` placeholders and one ``[MASK]``.
    ``verbalizer``: per class, a list of words (each one token, except for ``similarity``).

    Batch keys (besides ``input_ids`` / ``attention_mask`` / ``token_type_ids`` of the first template
    and ``labels``): ``input_token_mask`` (B x T, the real input tokens), ``mask_positions`` (B x K),
    and for K > 1 templates ``prompt_input_ids`` / ``prompt_attention_mask`` / ``prompt_token_type_ids``
    / ``prompt_source`` (B x (K-1) x T; ``prompt_source`` is the position in ``z`` an input token
    comes from, -1 for template tokens). Every tensor has the batch as its first dim, so rows can be
    selected (the evaluation cascade does).
    """

    def __init__(self, model: nn.Module, tokenizer, num_classes: int, text_fields: Sequence[str],
                 templates: Sequence[str], verbalizer: Sequence[Sequence[str]], scorer: str = "mlm",
                 max_length: int = 128, feature_layer: int = -1, similarity_scale: float = 20.0):
        super().__init__(model, tokenizer, num_classes, text_fields, max_length, feature_layer)
        if tokenizer.mask_token_id is None:
            raise ModelSpecError("head: prompt needs a tokenizer with a mask token")
        if scorer not in SCORERS:
            raise ModelSpecError(f"prompt scorer {scorer!r}; valid: auto, {', '.join(SCORERS)}")
        if not similarity_scale > 0:
            raise ModelSpecError(f"similarity_scale must be > 0, got {similarity_scale}")
        self.similarity_scale = float(similarity_scale)
        if scorer == "mlm" and model.get_output_embeddings() is None:
            raise ModelSpecError("scorer 'mlm' needs a model with a masked-LM head; use scorer: embedding")
        if not templates:
            raise ModelSpecError('head: prompt needs templates, e.g. ["{sentence} It was [MASK]."]')
        if len(verbalizer) != num_classes:
            raise ModelSpecError(f"the verbalizer has {len(verbalizer)} classes, the task {num_classes}")
        self.scorer = scorer
        self.templates = list(templates)
        self.verbalizer = [list(ws) for ws in verbalizer]
        for pair in (False, True):
            built = tokenizer.build_inputs_with_special_tokens([], [] if pair else None)
            if len(built) != tokenizer.num_special_tokens_to_add(pair=pair):
                raise ModelSpecError(f"{type(tokenizer).__name__} builds {len(built)} special tokens around "
                                     f"{'a pair' if pair else 'one text'} but reports "
                                     f"{tokenizer.num_special_tokens_to_add(pair=pair)}: head: prompt cannot lay out "
                                     f"its templates with it (load the model's own tokenizer class)")
        self._enc = _Encoder(tokenizer)
        self._uses_types = "token_type_ids" in tokenizer.model_input_names
        self._parsed = [self._compile(parse_template(t, self.text_fields, tokenizer.mask_token)) for t in self.templates]
        fixed = max(self._fixed_length(t) for t in self._parsed)
        self._input_budget = max_length - fixed  # tokens left for the inputs in every template
        if self._input_budget < len(self.text_fields):
            raise ModelSpecError(f"the templates take {fixed} of max_length={max_length} tokens, leaving less than "
                                 f"one per input field: raise max_length or shorten the templates")
        ids, owner, seen = [], [], set()
        for c, words in enumerate(self.verbalizer):
            if not words:
                raise ModelSpecError(f"verbalizer class {c} has no words")
            for w in words:
                if not w.strip():
                    raise ModelSpecError(f"verbalizer class {c} has an empty word")
                tok = self._enc.one(w.strip(), after_space=True)
                if not tok:
                    raise ModelSpecError(f"verbalizer word {w!r} is no token at all for this tokenizer")
                if scorer != "similarity" and (len(tok) != 1 or tok[0] == tokenizer.unk_token_id):
                    raise ModelSpecError(f"verbalizer word {w!r} is {tokenizer.convert_ids_to_tokens(tok)} for this "
                                         f"tokenizer; use words that are one known token")
                if tuple(tok) in seen:
                    raise ModelSpecError(f"verbalizer word {w!r} is given twice (a word reads one class)")
                seen.add(tuple(tok))
                ids.append(tok[0])
                owner.append(c)
        agg = torch.zeros(num_classes, len(ids))
        agg[owner, range(len(ids))] = 1.0
        self.register_buffer("verbalizer_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer("class_average", agg / agg.sum(1, keepdim=True), persistent=False)
        if scorer == "similarity":  # per template, per word: the template's own text with the word at the mask
            texts = [label_sentence(t, w.strip(), tokenizer.mask_token) for t in self.templates
                     for ws in self.verbalizer for w in ws]
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            self.register_buffer("label_input_ids", enc["input_ids"], persistent=False)
            self.register_buffer("label_attention_mask", enc["attention_mask"], persistent=False)

    # --------------------------------------------------------------- encoding

    def _compile(self, segments: list[list[tuple]]) -> list[list[tuple]]:
        """Pre-tokenize the literal text of a template; fields stay placeholders that remember whether
        they follow whitespace (``("field", i, after_space)``)."""
        out = []
        for seg in segments:
            parts, prev_space, at_start = [], False, True
            for p in seg:
                if p[0] == "text":
                    stripped = p[1].strip()
                    if stripped:
                        after = (p[1][:1].isspace() or prev_space) and not at_start
                        parts.append(("ids", self._enc.one(stripped, after)))
                        at_start = False
                    prev_space = p[1][-1:].isspace() or (prev_space and not stripped)
                    continue
                parts.append(p + ((prev_space and not at_start),) if p[0] == "field" else p)
                prev_space, at_start = False, False
            out.append(parts)
        return out

    def _fixed_length(self, template: list[list[tuple]]) -> int:
        n = sum(len(p[1]) for seg in template for p in seg if p[0] == "ids")
        n += 1  # the mask
        return n + self.tokenizer.num_special_tokens_to_add(pair=len(template) == 2)

    def _build(self, template, field_ids: list[list[int]]) -> tuple[list[int], list[int], list[int], int]:
        """ids, token types, roles (input-token number, TEMPLATE or SPECIAL) and the mask position."""
        offsets = [sum(len(f) for f in field_ids[:i]) for i in range(len(field_ids))]
        segs = []
        for seg in template:
            ids, roles = [], []
            for p in seg:
                if p[0] == "ids":
                    ids += p[1]
                    roles += [TEMPLATE] * len(p[1])
                elif p[0] == "mask":
                    ids.append(self.tokenizer.mask_token_id)
                    roles.append(TEMPLATE)
                    mask_at = (len(segs), len(ids) - 1)
                else:
                    f = field_ids[p[1]]
                    ids += f
                    roles += list(range(offsets[p[1]], offsets[p[1]] + len(f)))
            segs.append((ids, roles))
        flat_ids = [i for s in segs for i in s[0]]
        flat_roles = [r for s in segs for r in s[1]]
        sentinels = [[-(1 + sum(len(s[0]) for s in segs[:k]) + j) for j in range(len(s[0]))] for k, s in enumerate(segs)]
        built = self.tokenizer.build_inputs_with_special_tokens(*sentinels)
        ids = [flat_ids[-b - 1] if b < 0 else b for b in built]
        roles = [flat_roles[-b - 1] if b < 0 else SPECIAL for b in built]
        if self._uses_types:
            types = self.tokenizer.create_token_type_ids_from_sequences(*[s[0] for s in segs])
        else:
            types = [0] * len(ids)
        seg, j = mask_at
        target = -(1 + sum(len(s[0]) for s in segs[:seg]) + j)
        return ids, types, roles, built.index(target)

    def encode(self, inputs: Sequence[Sequence[str]]) -> dict:
        """The prompt batch of ``inputs`` (one tuple of texts per example, in ``text_fields`` order)."""
        n_fields = len(self.text_fields)
        field_ids = [[] for _ in inputs]
        for f in range(n_fields):
            texts = [str(x[f]) for x in inputs]
            # a field is encoded as it appears in the first template (after a space or not)
            after = next(p[2] for seg in self._parsed[0] for p in seg if p[0] == "field" and p[1] == f)
            for i, ids in enumerate(self._enc.many(texts, after, self.max_length)):
                field_ids[i].append(ids)
        rows = []  # per example, per template
        for fids in field_ids:
            keep = _truncate([len(f) for f in fids], self._input_budget)
            fids = [f[:k] for f, k in zip(fids, keep)]
            rows.append([self._build(t, fids) for t in self._parsed])
        longest = max(len(r[0]) for ex in rows for r in ex)
        T = min(-(-longest // 8) * 8, max(longest, self.max_length))
        B, K = len(rows), len(self._parsed)
        ids = torch.full((B, K, T), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        types = torch.zeros((B, K, T), dtype=torch.long)
        attn = torch.zeros((B, K, T), dtype=torch.long)
        source = torch.full((B, K, T), -1, dtype=torch.long)
        mask_pos = torch.zeros((B, K), dtype=torch.long)
        inputs_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, ex in enumerate(rows):
            where0 = {r: t for t, r in enumerate(ex[0][2]) if r >= 0}  # input token -> position in z
            for k, (i, ty, ro, mp) in enumerate(ex):
                n = len(i)
                ids[b, k, :n] = torch.tensor(i)
                types[b, k, :n] = torch.tensor(ty)
                attn[b, k, :n] = 1
                mask_pos[b, k] = mp
                source[b, k, :n] = torch.tensor([where0[r] if r >= 0 else -1 for r in ro])
            inputs_mask[b] = source[b, 0] >= 0
        batch = {"input_ids": ids[:, 0], "attention_mask": attn[:, 0], "input_token_mask": inputs_mask,
                 "mask_positions": mask_pos}
        if self._uses_types:
            batch["token_type_ids"] = types[:, 0]
        if K > 1:
            batch.update(prompt_input_ids=ids[:, 1:], prompt_attention_mask=attn[:, 1:], prompt_source=source[:, 1:])
            if self._uses_types:
                batch["prompt_token_type_ids"] = types[:, 1:]
        return batch

    def tokenize(self, texts) -> dict:
        """Prompt batch of single texts or (first, second) pairs (what ``predict`` feeds the model)."""
        inputs = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
        return self.encode(inputs)

    def collate(self, examples: list[dict]) -> dict:
        batch = self.encode([tuple(e[f] for f in self.text_fields) for e in examples])
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch

    # --------------------------------------------------------------- forward

    def perturbable(self, batch: dict) -> Tensor:
        """B x T bool: real tokens of the inputs only (no template, mask, special or padding token)."""
        return super().perturbable(batch) & batch["input_token_mask"].bool()

    def _all_templates(self, z: Tensor, batch: dict) -> tuple[Tensor, dict, Tensor]:
        """(B*K) x T x D embeddings of every template, their model inputs, and (B*K) mask positions."""
        B, T, D = z.shape
        embeds, masks, types = [z.unsqueeze(1)], [batch["attention_mask"].unsqueeze(1)], []
        if "token_type_ids" in batch:
            types.append(batch["token_type_ids"].unsqueeze(1))
        if "prompt_input_ids" in batch:
            src = batch["prompt_source"]
            K1 = src.shape[1]
            fixed = self.model.get_input_embeddings()(batch["prompt_input_ids"]).to(z.dtype)
            taken = torch.gather(z.unsqueeze(1).expand(B, K1, T, D), 2, src.clamp_min(0).unsqueeze(-1).expand(B, K1, T, D))
            embeds.append(torch.where((src >= 0).unsqueeze(-1), taken, fixed))
            masks.append(batch["prompt_attention_mask"])
            if types:
                types.append(batch["prompt_token_type_ids"])
        e = torch.cat(embeds, 1)
        K = e.shape[1]
        inputs = {"attention_mask": torch.cat(masks, 1).reshape(B * K, T)}
        if types:
            inputs["token_type_ids"] = torch.cat(types, 1).reshape(B * K, T)
        return e.reshape(B * K, T, D), inputs, batch["mask_positions"].reshape(B * K)

    @contextlib.contextmanager
    def _decode_only(self, positions: Tensor):
        """Run the MLM decoder on the mask positions only (B' x 1 x V instead of B' x T x V).

        Yields a list that holds ``True`` once the decoder ran through the hook (an architecture
        whose head bypasses its output-embedding module gives full B' x T x V logits instead)."""
        fired: list[bool] = []

        def pick(module, args):
            fired.append(True)
            h = args[0]
            return (h[torch.arange(h.shape[0], device=h.device), positions].unsqueeze(1),) + tuple(args[1:])

        handle = self.model.get_output_embeddings().register_forward_pre_hook(pick)
        try:
            yield fired
        finally:
            handle.remove()

    def word_scores(self, z: Tensor, batch: dict) -> Tensor:
        """B x K x W scores of every verbalizer word at each template's mask."""
        B = z.shape[0]
        e, inputs, pos = self._all_templates(z, batch)
        rows = torch.arange(e.shape[0], device=e.device)
        if self.scorer == "mlm":
            with self._decode_only(pos) as fired:
                out = self.model(inputs_embeds=e, **inputs).logits
            scores = (out[:, 0] if fired else out[rows, pos])[:, self.verbalizer_ids]
        elif self.scorer == "similarity":
            # pooling, norms and cosines in float32: with every score near 20 x cos, bf16 rounding ties classes
            h = F.normalize(mean_pool(self.model(inputs_embeds=e, **inputs).last_hidden_state.float(),
                                      inputs["attention_mask"]), dim=-1)
            out = self.model(input_ids=self.label_input_ids, attention_mask=self.label_attention_mask)
            labels = F.normalize(mean_pool(out.last_hidden_state.float(), self.label_attention_mask), dim=-1)
            K, W = e.shape[0] // B, self.verbalizer_ids.numel()
            # each template's sentence against the label sentences of the same template
            scores = torch.einsum("bkd,kwd->bkw", h.reshape(B, K, -1), labels.reshape(K, W, -1))
            return self.similarity_scale * scores
        else:
            h = self.model(inputs_embeds=e, **inputs).last_hidden_state[rows, pos]
            words = self.model.get_input_embeddings().weight[self.verbalizer_ids]
            scores = h @ words.T
        return scores.reshape(B, -1, scores.shape[-1])

    def logits(self, z: Tensor, batch: dict) -> Tensor:
        """B x C: class scores (mean over its words) averaged over templates."""
        scores = self.word_scores(z, batch)
        return (scores @ self.class_average.T.to(scores.dtype)).mean(1)

    forward = logits

    def features(self, z: Tensor, batch: dict, layer: int | None = None) -> Tensor:
        """Hidden state of layer ``feature_layer`` (or ``layer``) at the mask (scorer ``similarity``: mean
        over the sequence), averaged over templates (B x D)."""
        B = z.shape[0]
        e, inputs, pos = self._all_templates(z, batch)
        rows = torch.arange(e.shape[0], device=e.device)
        ctx = self._decode_only(pos) if self.scorer == "mlm" else contextlib.nullcontext()
        with ctx:
            out = self.model(inputs_embeds=e, output_hidden_states=True, **inputs)
        h = out.hidden_states[self.feature_layer if layer is None else layer]
        h = mean_pool(h, inputs["attention_mask"]) if self.scorer == "similarity" else h[rows, pos]
        return h.reshape(B, -1, h.shape[-1]).mean(1)


def label_sentence(template: str, word: str, mask_token: str | None = None) -> str:
    """``"{sentence} It was [MASK]."`` + ``great`` -> ``"It was great."``: the template's own text with
    the word at the mask and the input fields left out (what scorer ``similarity`` compares with)."""
    if mask_token and mask_token != MASK:
        template = template.replace(mask_token, MASK)
    text = re.sub(r"\{\w+\}|\[SEP\]", " ", template).replace(MASK, word)
    return " ".join(text.split())


def verbalizer_words(verbalizer: Mapping[str, Any] | Sequence | None, labels: Sequence[str]) -> list[list[str]]:
    """Per class, its words: from ``{label name: word or [words]}`` or a per-class list; default the label names."""
    if verbalizer is None:
        return [[str(name)] for name in labels]
    if isinstance(verbalizer, Mapping):
        by_name = {str(k): v for k, v in verbalizer.items()}  # YAML reads a label 0 as an int
        unknown = set(by_name) - set(map(str, labels))
        missing = [str(name) for name in labels if str(name) not in by_name]
        if unknown or missing:
            raise ModelSpecError(f"verbalizer keys must be the task's labels {list(labels)}"
                                 + (f"; unknown: {sorted(unknown)}" if unknown else "")
                                 + (f"; missing: {missing}" if missing else ""))
        items = [by_name[str(name)] for name in labels]
    else:
        items = list(verbalizer)
    words = [[w] if isinstance(w, str) else w for w in items]
    for c, ws in enumerate(words):
        if not isinstance(ws, (list, tuple)) or not all(isinstance(w, str) for w in ws):
            raise ModelSpecError(f"verbalizer words of {labels[c]!r} must be strings, got {ws!r} (YAML reads "
                                 f"unquoted yes / no / true / false / on / off as booleans: quote them, \"yes\")")
    return [list(ws) for ws in words]


def build_prompt_hf(path: str, task, tokenizer, templates: Sequence[str] | str | None = None,
                    verbalizer: Mapping | Sequence | None = None, scorer: str = "auto", pretrained: bool = True,
                    max_length: int = 128, feature_layer: int = -1, freeze_embeddings: bool = False,
                    similarity_scale: float = 20.0, **kwargs) -> PromptAdapter:
    """``head: prompt`` of ``hf:<model>``: ``AutoModelForMaskedLM`` read through templates + verbalizer.

    ``scorer``: ``mlm`` (the checkpoint's MLM head), ``embedding`` (mask hidden state x tied input
    embeddings, no head), ``similarity`` (cosine of the prompted input's mean-pooled embedding with
    each verbalizer word's label sentence, times ``similarity_scale``: the objective a sentence
    encoder was trained on) or ``auto`` (``mlm`` if the checkpoint has a complete MLM head, else
    ``embedding``: a head that would be randomly initialised is dropped). ``templates`` and
    ``verbalizer`` default to the task's fields of those names if it has them; the verbalizer
    defaults to the label names themselves. ``freeze_embeddings``: as for ``head: classifier``.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    templates = templates if templates is not None else getattr(task, "templates", None)
    if isinstance(templates, str):
        templates = [templates]
    words = verbalizer_words(verbalizer if verbalizer is not None else getattr(task, "verbalizer", None), task.labels)
    if scorer != "auto" and scorer not in SCORERS:
        raise ModelSpecError(f"prompt scorer {scorer!r}; valid: auto, {', '.join(SCORERS)}")
    head_missing = False
    if pretrained:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized weights": handled below
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        head_missing = bool(info["missing_keys"])
    else:
        model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(path, **kwargs))
    if scorer == "auto":
        scorer = "embedding" if head_missing else "mlm"
    if scorer in ("embedding", "similarity"):
        model = model.base_model  # the encoder; any MLM head is dropped (not trained, not saved)
    elif head_missing:
        log.warning("%s has no complete masked-LM head (%d weights newly initialised); scorer 'embedding' "
                    "avoids a random head", path, len(info["missing_keys"]))
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    log.info("prompt head: %d template(s), scorer %s", len(templates or []), scorer)
    return PromptAdapter(model, tokenizer, task.num_classes, task.text_fields, templates or [], words, scorer,
                         max_length, feature_layer, similarity_scale)


# ----------------------------------------------------------------------------- vision


class VisualPromptAdapter(VisionAdapter):
    """A classifier ``net`` adapted by a learned input prompt and a fixed label mapping (``head: prompt``).

    ``embed`` is still the task's pixels in [0, 1] (B x C x H x W); ``logits`` resizes them into
    the prompt frame (``image_size`` square, ``prompt`` ``pad`` or ``patch`` of width
    ``prompt_size``), normalises with the backbone's ``mean`` / ``std`` and reads the task's classes
    from the backbone's outputs through ``label_map`` (one or more source classes per task class,
    averaged). With ``freeze_backbone`` only the prompt is trained and the backbone stays in eval mode.
    """

    def __init__(self, net: nn.Module, num_classes: int, image_size: int, prompt_size: int, prompt: str = "pad",
                 label_map: Sequence | None = None, in_chans: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, freeze_backbone: bool = True,
                 feature_layer: int | None = None):
        super().__init__(net, num_classes, mean if mean is not None else [0.5] * in_chans,
                         std if std is not None else [0.5] * in_chans, feature_layer)
        if prompt not in ("pad", "patch"):
            raise ModelSpecError(f"visual prompt {prompt!r}; valid: pad, patch")
        limit = image_size // 2 if prompt == "pad" else image_size
        if not 0 < prompt_size < limit:
            raise ModelSpecError(f"prompt_size {prompt_size} must be in 1..{limit - 1} for a {prompt} "
                                 f"prompt on a {image_size}-pixel image")
        self.prompt_kind, self.image_size, self.prompt_size, self.in_chans = prompt, image_size, prompt_size, in_chans
        S, p = image_size, prompt_size
        frame = torch.zeros(1, 1, S, S)
        if prompt == "pad":
            frame[..., :p, :] = frame[..., -p:, :] = frame[..., :, :p] = frame[..., :, -p:] = 1
        else:
            frame[..., :p, :p] = 1
        self.register_buffer("frame", frame, persistent=False)
        self.prompt = nn.Parameter(torch.zeros(1, in_chans, S, S))  # sigmoid(0) = mid grey
        label_map = list(range(num_classes)) if label_map is None else list(label_map)
        if len(label_map) != num_classes:
            raise ModelSpecError(f"label_map has {len(label_map)} entries, the task {num_classes} classes")
        groups = [[m] if isinstance(m, int) else list(m) for m in label_map]
        if any(not g or min(g) < 0 for g in groups):
            raise ModelSpecError(f"label_map entries are backbone class indices >= 0 (one or a list per task class); "
                                 f"got {label_map}")
        width = max(max(g) for g in groups) + 1
        read = torch.zeros(num_classes, width)
        for c, g in enumerate(groups):
            read[c, g] = 1.0 / len(g)
        self.register_buffer("label_read", read, persistent=False)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.net.requires_grad_(False)
            self.net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.net.eval()  # frozen: batch-norm statistics and dropout stay as they are
        return self

    def apply_prompt(self, z: Tensor) -> Tensor:
        """Pixels in [0, 1] (task shape) -> the prompted backbone input in [0, 1] (B x in_chans x S x S)."""
        if z.shape[1] != self.in_chans:
            if z.shape[1] != 1:
                raise ModelSpecError(f"{z.shape[1]}-channel images cannot feed a {self.in_chans}-channel backbone")
            z = z.expand(-1, self.in_chans, -1, -1)
        S, p = self.image_size, self.prompt_size
        inner = S - 2 * p if self.prompt_kind == "pad" else S
        x = F.interpolate(z, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
        if self.prompt_kind == "pad":
            x = F.pad(x, (p, p, p, p))
        return x * (1 - self.frame) + torch.sigmoid(self.prompt) * self.frame

    def logits(self, z: Tensor, batch: dict | None = None) -> Tensor:
        out = self.net(self._normalise(self.apply_prompt(z)))
        if out.shape[-1] < self.label_read.shape[1]:
            raise ModelSpecError(f"label_map reads class {self.label_read.shape[1] - 1}, the backbone has "
                                 f"{out.shape[-1]} outputs")
        return out[:, :self.label_read.shape[1]] @ self.label_read.T

    forward = logits

    def features(self, z: Tensor, batch: dict | None = None, layer: int | None = None) -> Tensor:
        return super().features(self.apply_prompt(z), batch, layer)


def _cfg_value(arch: str, key: str):
    """A value of timm's registered pretrained config of ``arch`` (None for names timm has not
    registered, e.g. ``hf-hub:...``)."""
    import timm

    try:
        return timm.models.get_pretrained_cfg_value(arch, key)
    except (RuntimeError, KeyError, ValueError):
        return None


def build_visual_prompt(arch: str, task, pretrained: bool = False, prompt: str = "pad", prompt_size: int = 4,
                        image_size: int | None = None, label_map: Sequence | None = None,
                        source_classes: int | None = None, freeze_backbone: bool = True,
                        in_chans: int | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, feature_layer: int | None = None,
                        **kwargs) -> VisualPromptAdapter:
    """``head: prompt`` of ``timm:<arch>``: visual prompting onto an existing classifier.

    ``source_classes``: outputs of the backbone (default: the pretrained head's, or the
    ``checkpoint_path`` head's, else the task's); ``image_size``: the backbone's input side (default:
    the task's image side + 2 x ``prompt_size`` for ``pad``); ``in_chans``: backbone channels (default:
    a pretrained backbone's own, else the task's; a 1-channel task feeds a 3-channel backbone by
    repetition); ``mean`` / ``std``: the backbone's normalisation (default its pretrained config, else
    the task's); ``feature_layer``: as for ``head: classifier``. ``checkpoint_path``: the backbone's
    weights (a timm / PyTorch file, or a unirobust run's ``model.safetensors``). Other options go to
    ``timm.create_model``. ``num_classes`` is not an option here: the backbone's outputs are
    ``source_classes``, the task's classes come from ``label_map``.
    """
    import timm

    from .vision import NUMPY_CHECKPOINTS, create_with_checkpoint, read_checkpoint

    if "num_classes" in kwargs:
        raise ModelSpecError("model.options.num_classes: with head: prompt the backbone's outputs are "
                             "source_classes, and the task's classes are read from them through label_map")
    channels = task.image_shape[0]
    checkpoint = kwargs.pop("checkpoint_path", None)
    path = Path(str(checkpoint)).expanduser() if checkpoint is not None else None
    state = read_checkpoint(path) if path is not None and path.suffix not in NUMPY_CHECKPOINTS else None
    if source_classes is None and state is not None:  # the checkpoint's head says how many outputs
        head = _cfg_value(arch, "classifier")
        weight = state.get(f"{head}.weight") if isinstance(head, str) else None
        source_classes = int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None
    if source_classes is not None:
        kwargs["num_classes"] = source_classes
    elif not pretrained:
        kwargs["num_classes"] = task.num_classes
    pretrained_channels = in_chans is None and pretrained  # the first layer as it is, not re-summed for others
    create = kwargs if pretrained_channels else {**kwargs, "in_chans": in_chans or channels}
    net = (create_with_checkpoint(arch, path, pretrained, create, state) if path is not None
           else timm.create_model(arch, pretrained=pretrained, **create))
    if pretrained_channels:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        in_chans = int(cfg.get("input_size", (3,))[0])
    in_chans = in_chans or channels
    if not pretrained and path is None and freeze_backbone:
        log.warning("visual prompting onto a randomly initialised timm:%s: the frozen backbone has learned "
                    "nothing, so only the prompt is trained to read a random network's outputs; give it "
                    "weights (model.options.pretrained: true, or checkpoint_path)", arch)
    if image_size is None:
        side = max(task.image_shape[1:])
        image_size = side + 2 * prompt_size if prompt == "pad" else side
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if mean is None:
        mean = cfg.get("mean") if pretrained and cfg.get("mean") else (task.mean if in_chans == channels else None)
    if std is None:
        std = cfg.get("std") if pretrained and cfg.get("std") else (task.std if in_chans == channels else None)
    adapter = VisualPromptAdapter(net, task.num_classes, image_size, prompt_size, prompt, label_map, in_chans,
                                  list(mean) if mean is not None else None, list(std) if std is not None else None,
                                  freeze_backbone, feature_layer)
    outputs = getattr(net, "num_classes", None)
    if isinstance(outputs, int) and outputs > 0 and adapter.label_read.shape[1] > outputs:
        raise ModelSpecError(f"label_map reads backbone class {adapter.label_read.shape[1] - 1}, and timm:{arch} "
                             f"has {outputs} outputs (source_classes); give label_map entries below {outputs}, "
                             f"or source_classes")
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    log.info("visual prompt: %s of %d px on a %d px input to timm:%s (%d outputs, %s), %s trainable parameters; "
             "task class -> backbone classes %s", prompt, prompt_size, image_size, arch, outputs or -1,
             "frozen" if freeze_backbone else "trained too", f"{trainable:,}",
             label_map if label_map is not None else f"0..{task.num_classes - 1} (identity)")
    return adapter
