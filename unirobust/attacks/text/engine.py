"""The batched word-attack engine: many examples advance together, every model call is a full batch.

Each example's search (:mod:`search`) is a generator that *yields what it needs* — ``Need("probs",
texts)``, ``Need("candidates", items)``, ``Need("encode", texts)``, ``Need("grad", texts)`` — and
is sent the answer. The engine keeps ``concurrency`` examples in flight, collects the needs of all of
them, answers each kind with one batched call (victim forwards sorted by length and padded to the
longest, multiple of 8; one masked-LM forward; one sentence-encoder forward), and sends the answers
back. Victim outputs and encoder embeddings are memoised, so a text is never scored twice; an
example's ``queries`` counts the distinct texts the victim scored for it.

Searches stay sequential code, yet the victim sees batches of ``batch_size`` texts drawn from up to
``concurrency`` examples. Random choices are seeded per example, so results do not depend on which
examples share a batch, on ``concurrency``, or on the number of processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...models.base import mean_pool
from .words import WordText

log = logging.getLogger(__name__)


class Need(NamedTuple):
    """A request from a search to the engine: ``kind`` names the batched handler."""

    kind: str
    items: list


# ----------------------------------------------------------------------------- the victim


def model_device(adapter) -> torch.device:
    return next(adapter.parameters()).device


class Victim:
    """Batched, length-bucketed, timed access to a text adapter's class probabilities and gradients."""

    def __init__(self, adapter, batch_size: int = 32):
        self.adapter, self.batch_size = adapter, batch_size
        self.forward_seconds = 0.0
        self.forwards = 0

    def probs(self, inputs: Sequence) -> torch.Tensor:
        """N x C softmax probabilities of ``inputs`` (texts, or tuples of texts for pairs)."""
        adapter = self.adapter
        out = torch.empty(len(inputs), adapter.num_classes)
        order = sorted(range(len(inputs)), key=lambda k: text_length(inputs[k]))
        device = model_device(adapter)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = {k: v.to(device) for k, v in adapter.tokenize([inputs[k] for k in rows]).items()}
            began = time.perf_counter()
            with torch.inference_mode():
                logits = adapter.logits(adapter.embed(batch), batch)
            self.forward_seconds += time.perf_counter() - began
            self.forwards += len(rows)
            out[rows] = F.softmax(logits.float(), dim=-1).cpu()
        return out

    def word_saliency(self, requests: list[tuple[Any, int, tuple, int]]) -> list[torch.Tensor]:
        """Per word, the L1 norm of the mean loss gradient over its sub-tokens (A2T / TextAttack's
        gradient ordering). ``requests``: (model input, attacked field position, word spans, label)."""
        from ...models.text import TextAdapter
        from .sources import plain_member

        adapter = self.adapter
        if type(plain_member(adapter)).tokenize is not TextAdapter.tokenize:
            raise ValueError("gradient word importance needs a plain classifier head (this model rewrites its "
                             "input, e.g. a prompt template); use wir: delete or unk")
        out = []
        device = model_device(adapter)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            inputs = [r[0] for r in chunk]
            columns = list(zip(*inputs)) if not isinstance(inputs[0], str) else [inputs]
            enc = adapter.tokenizer(*[list(c) for c in columns], padding=True, truncation=True,
                                    max_length=adapter.max_length, pad_to_multiple_of=adapter.pad_multiple, return_tensors="pt",
                                    return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            sequence_ids = [enc.sequence_ids(r) for r in range(len(chunk))]
            batch = {k: v.to(device) for k, v in enc.items()}
            labels = torch.tensor([r[3] for r in chunk], device=device)
            began = time.perf_counter()
            with torch.enable_grad():
                z = adapter.embed(batch).detach().requires_grad_(True)
                loss = F.cross_entropy(adapter.logits(z, batch), labels, reduction="sum")
                grad = torch.autograd.grad(loss, z)[0].cpu()
            self.forward_seconds += time.perf_counter() - began
            for row, (_, field_pos, spans, _) in enumerate(chunk):
                scores = torch.zeros(len(spans))
                seq, offs = sequence_ids[row], offsets[row].tolist()
                for w, (a, b) in enumerate(spans):
                    toks = [t for t, (s, e) in enumerate(offs) if seq[t] == field_pos and e > s and s < b and e > a]
                    if toks:
                        scores[w] = grad[row, toks].mean(0).abs().sum()
                out.append(scores)
        return out


def text_length(x) -> int:
    return len(x) if isinstance(x, str) else sum(len(t) for t in x)


class SentenceEncoder:
    """Mean-pooled, unit-normalised sentence embeddings from a Hugging Face encoder; the packaged
    all-MiniLM-L6-v2 is the offline stand-in for the Universal Sentence Encoder."""

    def __init__(self, name: str = "sentence-transformers/all-MiniLM-L6-v2", batch_size: int = 64):
        from ...compat import ensure_torchvision
        from ...offline import resolve_hf_model

        ensure_torchvision()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_hf_model(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.seconds = 0.0

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        began = time.perf_counter()
        order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
        result = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[k] for k in rows], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            e = mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])
            result[rows] = F.normalize(e, dim=-1)
        self.seconds += time.perf_counter() - began
        return result


_ENCODERS: dict[str, SentenceEncoder] = {}


def sentence_encoder(name: str) -> SentenceEncoder:
    """One shared encoder per name (loading it costs seconds)."""
    if name not in _ENCODERS:
        _ENCODERS[name] = SentenceEncoder(name)
    return _ENCODERS[name]


# ----------------------------------------------------------------------------- one example


@dataclass
class Example:
    """The state of one example under attack; searches read and extend it."""

    index: int
    example: dict
    field: str
    fields: list[str]
    label: int
    target: int | None
    start: WordText
    budget: int | None
    cache: dict = field(default_factory=dict)
    queries: int = 0
    seconds: float = 0.0
    exhausted: bool = False
    message: str = ""

    def compose(self, text: str):
        """The model input with the attacked field set to ``text``."""
        if len(self.fields) == 1:
            return text
        return tuple(text if f == self.field else str(self.example[f]) for f in self.fields)

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        """Goal score to maximise: 1 - p(label) (untargeted) or p(target); none for no probabilities
        (a spent query budget)."""
        if not len(probs):
            return torch.empty(0)
        return probs[..., self.target] if self.target is not None else 1 - probs[..., self.label]

    def success(self, probs: torch.Tensor) -> torch.Tensor:
        pred = probs.argmax(-1)
        return pred == self.target if self.target is not None else pred != self.label

    def query(self, texts: Sequence[str]) -> Iterator[Need]:
        """Probabilities of the attacked field set to each text (N x C); respects the query budget:
        once it is spent, only the texts that fit are scored and ``exhausted`` is set."""
        texts = list(texts)
        if self.budget is not None:
            left = self.budget - self.queries
            fresh = [t for t in dict.fromkeys(texts) if self.compose(t) not in self.cache]
            if len(fresh) > left:
                keep = set(fresh[:max(left, 0)])
                texts = [t for t in texts if self.compose(t) in self.cache or t in keep]
                self.exhausted = True
        if not texts:
            return torch.empty(0, 1)
        return (yield Need("probs", [(self, self.compose(t)) for t in texts]))


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Runs one search generator per example, answering their needs in batches (module docstring)."""

    def __init__(self, victim: Victim, handlers: dict[str, Callable[[list], list]], concurrency: int = 64):
        self.victim, self.handlers, self.concurrency = victim, dict(handlers), concurrency
        self.handlers["probs"] = self._probs

    def _probs(self, items: list[tuple[Example, Any]]) -> list[torch.Tensor]:
        missing = list(dict.fromkeys(x for ex, x in items if x not in ex.cache))
        if missing:
            probs = self.victim.probs(missing)
            fresh = dict(zip(missing, probs))
            for ex, x in items:
                if x not in ex.cache and x in fresh:
                    ex.cache[x] = fresh[x]
                    ex.queries += 1
        return [ex.cache[x] for ex, x in items]

    def run(self, examples: Iterator[Example], search: Callable[[Example], Iterator], finish: Callable,
            total: int, progress: bool = True) -> None:
        """Attack every example; ``finish(example, outcome)`` is called as each one ends."""
        active: dict[int, tuple[Example, Iterator, Need]] = {}
        todo = iter(examples)
        bar = tqdm(total=total, desc="word attack", disable=not progress, dynamic_ncols=True)
        more = True
        while True:
            step_began = time.perf_counter()
            while more and len(active) < self.concurrency:
                ex = next(todo, None)
                if ex is None:
                    more = False
                    break
                gen = search(ex)
                self._advance(active, ex, gen, None, finish, bar, first=True)
            if not active:
                break
            by_kind: dict[str, list[tuple[int, int, int]]] = {}
            flat: dict[str, list] = {}
            for key, (_, _, need) in active.items():
                items = flat.setdefault(need.kind, [])
                by_kind.setdefault(need.kind, []).append((key, len(items), len(items) + len(need.items)))
                items.extend(need.items)
            answers: dict[int, list] = {}
            for kind, items in flat.items():
                if kind not in self.handlers:
                    raise ValueError(f"a search asked for {kind!r}, which this attack has no handler for")
                results = self.handlers[kind](items) if items else []
                for key, a, b in by_kind[kind]:
                    answers[key] = results[a:b]
            share = (time.perf_counter() - step_began) / max(len(active), 1)
            for key in list(active):
                ex, gen, need = active[key]
                ex.seconds += share
                answer = answers[key]
                if need.kind == "probs":
                    answer = torch.stack(answer)
                self._advance(active, ex, gen, answer, finish, bar)
        bar.close()

    @staticmethod
    def _advance(active, ex, gen, answer, finish, bar, first: bool = False) -> None:
        try:
            need = next(gen) if first else gen.send(answer)
        except StopIteration as stop:
            active.pop(ex.index, None)
            finish(ex, stop.value)
            bar.update(1)
            return
        active[ex.index] = (ex, gen, need)
