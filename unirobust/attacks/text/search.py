"""Searches over word substitutions, written as generators the engine batches (see :mod:`engine`).

- ``greedy`` — greedy swap by word importance (TextFooler, Jin et al. 2020; DeepWordBug; A2T):
  rank words (``wir``: delete / unk / gradient / random / none), then at each word take the
  candidate that raises the goal score most, stopping at the first success (among successful
  candidates, the most similar to the reference text wins, as in TextAttack).
- ``pwws`` — Probability Weighted Word Saliency (Ren et al. 2019): order = softmax(unk saliency)
  x best-candidate score, then the same greedy swap.
- ``beam`` — beam search over (word, candidate) swaps, ``beam_width`` texts kept per step.

Constraints (:class:`Constraints`) filter candidates before the victim sees them: stop words, no
repeat modification, a maximum fraction of changed words, embedding cosine, WordNet part-of-speech
agreement, character edit distance, and windowed sentence-encoder similarity.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .engine import Example, Need
from .sources import WordVectors, wordnet_pos
from .words import WordText, levenshtein

NOUN_VERB = frozenset("nv")


@dataclass
class Constraints:
    """What a candidate must satisfy. ``stopwords`` is a set of lower-case words never modified;
    ``vectors`` (with ``min_cos``) bounds the cosine between the original and the new word."""

    stopwords: frozenset[str] = frozenset()
    max_change: float = 1.0
    min_change_words: int = 1
    vectors: WordVectors | None = None
    min_cos: float | None = None
    pos: bool = False
    max_edit_distance: int | None = None
    sentence_sim: float | None = None
    sentence_window: int | None = None
    sentence_metric: str = "angular"
    sentence_compare: str = "previous"

    def change_limit(self, n_words: int) -> int:
        return max(math.ceil(self.max_change * n_words), self.min_change_words)

    def modifiable(self, start: WordText, cur: WordText, i: int) -> bool:
        """Pre-transformation checks: not a stop word, not already changed, change budget left."""
        if start.word(i).lower() in self.stopwords:
            return False
        changed = start.changed(cur)
        return i not in changed and len(changed) < self.change_limit(len(start))

    def word_ok(self, original: str, new: str) -> bool:
        if self.min_cos is not None and self.vectors is not None:
            cos = self.vectors.cos(original, new)
            if cos is not None and cos < self.min_cos:
                return False
        if self.pos:
            a, b = wordnet_pos(original), wordnet_pos(new)
            if a and b and not (a & b) and not (a & NOUN_VERB and b & NOUN_VERB):
                return False
        return True

    def similarity(self, cos: torch.Tensor) -> torch.Tensor:
        if self.sentence_metric == "angular":
            return 1 - torch.arccos(cos.clamp(-1, 1)) / math.pi
        return cos


def edit_distance(start: WordText, text: WordText) -> int:
    """Character edits from ``start`` to ``text``, counted word by word (words stay aligned, so this
    equals the whole-text Levenshtein distance or bounds it from above, and costs microseconds)."""
    return sum(levenshtein(start.word(j), text.word(j)) for j in start.changed(text))


class Search:
    """The search procedures of one attack, sharing its candidate source and constraints."""

    def __init__(self, method: str, wir: str, constraints: Constraints, unk_token: str = "[UNK]",
                 beam_width: int = 4, seed: int = 0, early_exit: bool = True, chunk: int = 1):
        self.method, self.wir, self.c = method, wir, constraints
        self.unk_token, self.beam_width, self.seed = unk_token, beam_width, seed
        self.early_exit, self.chunk = early_exit, chunk

    def __call__(self, ex: Example) -> Iterator[Need]:
        """The search generator of one example; returns (final text, its probabilities, probs before)."""
        p0 = (yield from ex.query([ex.start.text]))[0]
        if bool(ex.success(p0)):  # already misclassified: nothing to attack
            return ex.start, p0, p0, "skipped"
        if self.method == "beam":
            text, p = yield from self.beam(ex, p0)
        else:
            order, found = yield from (self.pwws_order(ex) if self.method == "pwws" else self.importance(ex))
            text, p = found if found is not None else (yield from self.greedy(ex, order, p0))
        return text, p, p0, "success" if bool(ex.success(p)) else "failed"

    # ------------------------------------------------------------------ candidates

    def raw_candidates(self, cur: WordText, indices: list[int], ex: Example) -> Iterator[Need]:
        """Source proposals for each index (no constraints beyond the source's own)."""
        if not indices:
            return []
        return (yield Need("candidates", [(cur, i, ex.index) for i in indices]))

    def candidates(self, ex: Example, cur: WordText, indices: list[int]) -> Iterator[Need]:
        """Per index, the constrained candidate texts and their sentence similarities (or None)."""
        words = yield from self.raw_candidates(cur, indices, ex)
        out = []
        for i, proposals in zip(indices, words):
            original = ex.start.word(i)
            texts = [cur.replace(i, w) for w in proposals if self.c.word_ok(original, w)]
            if self.c.max_edit_distance is not None:
                texts = [t for t in texts if edit_distance(ex.start, t) <= self.c.max_edit_distance]
            out.append(texts)
        if self.c.sentence_sim is None:
            return [(t, None) for t in out]
        return (yield from self._sentence_filter(ex, cur, indices, out))

    def _sentence_filter(self, ex: Example, cur: WordText, indices, per_index) -> Iterator[Need]:
        """TextFooler's windowed check: the window of ``sentence_window`` words around the swapped
        word must stay similar to the same window of the reference (previous or original text);
        texts shorter than the window pass, as in TextAttack."""
        ref = cur if self.c.sentence_compare == "previous" else ex.start
        w = self.c.sentence_window
        pairs = []
        for i, texts in zip(indices, per_index):
            for t in texts:
                if w is None:
                    pairs.append((ref.text, t.text))
                elif len(t) >= w:
                    pairs.append((ref.window(i, w), t.window(i, w)))
        sentences = list(dict.fromkeys(s for pair in pairs for s in pair))
        emb = dict(zip(sentences, (yield Need("encode", sentences)) if sentences else []))
        out = []
        for i, texts in zip(indices, per_index):
            keep, sims = [], []
            for t in texts:
                if w is not None and len(t) < w:
                    sim = 1.0
                else:
                    a, b = (ref.text, t.text) if w is None else (ref.window(i, w), t.window(i, w))
                    sim = float(self.c.similarity(emb[a] @ emb[b]))
                if sim >= self.c.sentence_sim:
                    keep.append(t)
                    sims.append(sim)
            out.append((keep, sims))
        return out

    # ------------------------------------------------------------------ word order

    def modifiable(self, ex: Example, cur: WordText) -> list[int]:
        return [i for i in range(len(cur)) if self.c.modifiable(ex.start, cur, i)]

    def attackable(self, ex: Example) -> Iterator[Need]:
        """Modifiable indices of the original text for which the source proposes something."""
        indices = self.modifiable(ex, ex.start)
        proposals = yield from self.raw_candidates(ex.start, indices, ex)
        return [i for i, p in zip(indices, proposals) if p]

    def saliency(self, ex: Example, indices: list[int], token: str) -> Iterator[Need]:
        """Per index (non-empty), how much the goal hinges on the word: the loss-gradient norm
        (``wir="gradient"``, one backward pass) or the goal score with the word replaced by
        ``token`` (one query per word; fewer scores than indices once the budget is spent)."""
        if self.wir == "gradient":
            start = ex.start
            grads = yield Need("grad", [(ex.compose(start.text), ex.fields.index(ex.field), start.spans, ex.label)])
            return grads[0][indices]
        return ex.score((yield from ex.query([ex.start.raw_replace(i, token) for i in indices])))

    def scored(self, ex: Example, texts: list[WordText]) -> Iterator[Need]:
        """(texts, probabilities, goal scores) of candidate texts; only the texts the query budget
        allowed are kept."""
        probs = yield from ex.query([t.text for t in texts])
        return texts[: len(probs)], probs, ex.score(probs)

    def importance(self, ex: Example) -> Iterator[Need]:
        """(indices that have candidates, most important first, None), or (None, (text, probs)) when
        a ``wir="candidate"`` probe already met the goal."""
        indices = yield from self.attackable(ex)
        if self.wir == "none" or len(indices) < 2:
            return indices, None
        if self.wir == "random":
            rng = random.Random(zlib.crc32(f"{self.seed}|{ex.index}".encode()))
            rng.shuffle(indices)
            return indices, None
        if self.wir == "candidate":
            scores, found = yield from self.probe(ex, indices)
            if found is not None:
                return None, found
        else:
            scores = yield from self.saliency(ex, indices, self.unk_token if self.wir == "unk" else "")
        indices = indices[: len(scores)]
        order = torch.argsort(-scores[: len(indices)], stable=True).tolist()
        return [indices[k] for k in order], None

    def probe(self, ex: Example, indices: list[int]) -> Iterator[Need]:
        """``wir="candidate"``: score each word by its own first constrained candidate instead of an
        [UNK] or a deletion, so every importance query is also a real attempt. Returns (scores,
        None), or (None, (text, probs)) for the best probe that met the goal; the greedy search
        later finds the probes in the query memo, so they are not paid for twice."""
        cands = yield from self.candidates(ex, ex.start, indices)
        texts = [ts[0] if ts else None for ts, _ in cands]
        tried = [t for t in texts if t is not None]
        tried, probs, scores = yield from self.scored(ex, tried)
        wins = [k for k in range(len(tried)) if bool(ex.success(probs[k]))]
        if wins:
            k = max(wins, key=lambda j: float(scores[j]))
            return None, (tried[k], probs[k])
        by_text = {t.text: float(v) for t, v in zip(tried, scores)}
        return torch.tensor([by_text.get(t.text, -1.0) if t is not None else -1.0 for t in texts]), None

    def pwws_order(self, ex: Example) -> Iterator[Need]:
        """PWWS: softmax of the unk-replacement saliency (or, with ``wir="gradient"``, of the
        gradient saliency) times the best candidate's goal score.

        Returns (order, None), or (None, (text, probs)) when ``early_exit`` is on and a single swap
        met the goal while scoring candidates: words are scored most salient first, ``chunk``
        words per step, so a one-word success stops the ranking (the rest of the PWWS order can
        only add swaps to a text that already fools the model)."""
        indices = yield from self.attackable(ex)
        if not indices:
            return [], None
        saliency = yield from self.saliency(ex, indices, self.unk_token)
        if len(saliency) < len(indices):
            return indices, None
        by_saliency = torch.argsort(-saliency, stable=True).tolist()
        chunk = self.chunk if self.early_exit else len(indices)
        best = torch.zeros(len(indices))
        for lo in range(0, len(indices), chunk):
            picked = by_saliency[lo:lo + chunk]
            cands = yield from self.candidates(ex, ex.start, [indices[k] for k in picked])
            texts = [t for ts, _ in cands for t in ts]
            if not texts:
                continue
            texts, probs, scores = yield from self.scored(ex, texts)
            k = 0
            for j, (ts, sims) in zip(picked, cands):
                part = scores[k:k + len(ts)]
                if len(part):
                    best[j] = part.max()
                k += len(ts)
            if self.early_exit:
                wins = [n for n in range(len(probs)) if bool(ex.success(probs[n]))]
                if wins:
                    n = max(wins, key=lambda w: float(scores[w]))
                    return None, (texts[n], probs[n])
            if ex.exhausted:
                break
        weight = torch.softmax(saliency, 0) * best
        return [indices[j] for j in torch.argsort(-weight, stable=True).tolist()], None

    # ------------------------------------------------------------------ swapping

    def greedy(self, ex: Example, order: list[int], p0: torch.Tensor) -> Iterator[Need]:
        cur, cur_p = ex.start, p0
        for i in order:
            if ex.exhausted:
                break
            if not self.c.modifiable(ex.start, cur, i):
                continue
            (texts, sims), = yield from self.candidates(ex, cur, [i])
            if not texts:
                continue
            texts, probs, scores = yield from self.scored(ex, texts)
            if not texts:
                break
            best = int(torch.argmax(scores))
            if scores[best] <= ex.score(cur_p):
                continue
            cur, cur_p = texts[best], probs[best]
            if bool(ex.success(cur_p)):
                wins = [k for k in range(len(texts)) if bool(ex.success(probs[k]))]
                if sims is not None:
                    k = max(wins, key=lambda j: sims[j])
                    cur, cur_p = texts[k], probs[k]
                return cur, cur_p
        return cur, cur_p

    def beam(self, ex: Example, p0: torch.Tensor) -> Iterator[Need]:
        """Beam search (TextAttack's BeamSearch): expand every beam at every modifiable word, keep
        the ``beam_width`` best texts, stop at the first success or when no expansion improves."""
        beams = [(ex.start, p0)]
        best_text, best_p = ex.start, p0
        while not ex.exhausted:
            expansions = []
            for text, _ in beams:
                indices = self.modifiable(ex, text)
                for texts, _ in (yield from self.candidates(ex, text, indices)):
                    expansions.extend(texts)
            expansions = list({t.text: t for t in expansions}.values())
            if not expansions:
                break
            expansions, probs, scores = yield from self.scored(ex, expansions)
            if not expansions:
                break
            top = torch.argsort(-scores, stable=True)[: self.beam_width].tolist()
            if scores[top[0]] <= ex.score(best_p):
                break
            best_text, best_p = expansions[top[0]], probs[top[0]]
            if bool(ex.success(best_p)):
                break
            beams = [(expansions[k], probs[k]) for k in top]
        return best_text, best_p
