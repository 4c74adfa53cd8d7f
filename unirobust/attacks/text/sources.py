"""Candidate sources: the replacement words an attack may try for word ``i`` of a text. All offline.

Every source answers ``propose(items) -> list[list[str]]`` for a batch of ``(text, i, key)`` items
(``key`` seeds random sources per example and word, so results never depend on batch composition),
and the engine calls it once for all examples in flight; the masked LM uses that to run one batched
forward. Candidates are single words (:func:`words.is_word`), never the original word itself.

- :class:`WordNetSynonyms` — PWWS (Ren et al. 2019): lemmas of every WordNet synset of the word.
- :class:`EmbeddingNeighbours` — TextFooler (Jin et al. 2020): nearest whole words by cosine in a
  model's input-embedding space (optionally counter-fitted, :mod:`counterfit`), WordNet antonyms
  optionally removed.
- :class:`MaskedLMProposals` — BAE (Garg & Ramakrishnan 2020, mask the word) and BERT-Attack
  (Li et al. 2020, read the unmasked position): a masked LM's top predictions.
- :class:`CharEdits` — DeepWordBug (Gao et al. 2018): one random adjacent swap, substitution,
  deletion and insertion per word.
"""

from __future__ import annotations

import functools
import logging
import random
import zlib
from typing import Sequence

import torch

from .words import WordText, is_word

log = logging.getLogger(__name__)

Item = tuple[WordText, int, int]  # (text, word index, example key)


def match_case(word: str, like: str) -> str:
    """``word`` with the capitalisation pattern of ``like`` (all caps, title or lower)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def dedupe(words: Sequence[str], original: str, limit: int | None) -> list[str]:
    out, seen = [], {original.lower()}
    for w in words:
        if is_word(w) and w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out[:limit] if limit else out


@functools.lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNet reader on the offline WordNet 3.0 (built from the ``wn`` package if missing)."""
    from ...offline import ensure_nltk_data

    ensure_nltk_data(need_wordnet=True)
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


@functools.lru_cache(maxsize=200_000)
def wordnet_pos(word: str) -> frozenset[str]:
    """WordNet parts of speech of ``word`` (n, v, a, r; satellites count as a); empty if unknown."""
    return frozenset("a" if s.pos() == "s" else s.pos() for s in wordnet().synsets(word.lower()))


@functools.lru_cache(maxsize=200_000)
def wordnet_antonyms(word: str) -> frozenset[str]:
    return frozenset(a.name().lower() for s in wordnet().synsets(word.lower()) for lemma in s.lemmas()
                     for a in lemma.antonyms())


class WordNetSynonyms:
    """Synonyms from every WordNet synset of the word (multi-word lemmas skipped), in WordNet order.

    English only: other languages need the Open Multilingual Wordnet, which is not bundled offline."""

    def __init__(self, max_candidates: int | None = None):
        self.max_candidates = max_candidates

    @functools.lru_cache(maxsize=100_000)
    def synonyms(self, word: str) -> tuple[str, ...]:
        lemmas = (lemma.name() for s in wordnet().synsets(word.lower()) for lemma in s.lemmas())
        return tuple(dedupe([match_case(w, word) for w in lemmas if "_" not in w], word, self.max_candidates))

    def propose(self, items: list[Item]) -> list[list[str]]:
        return [list(self.synonyms(text.word(i))) for text, i, _ in items]


def plain_member(adapter):
    """The adapter itself, or an ensemble's first member (members share the tokenizer and the input
    space; each has its own word embeddings, and word neighbours are read from the first's)."""
    return adapter.members[0] if hasattr(adapter, "members") else adapter


def input_embedding_weight(adapter) -> torch.Tensor:
    """The word-embedding matrix (V x D) of a text adapter (see :func:`plain_member`)."""
    return plain_member(adapter).model.get_input_embeddings().weight


class WordVectors:
    """Unit-normalised vectors of a tokenizer's whole-word vocabulary (alphabetic entries that are
    not ``##`` continuations or special tokens), taken from a model's input-embedding matrix."""

    def __init__(self, tokenizer, embeddings: torch.Tensor):
        special = set(tokenizer.all_special_tokens)
        vocab = tokenizer.get_vocab()
        words = sorted((w for w in vocab if w.isalpha() and not w.startswith("##") and w not in special),
                       key=vocab.get)
        self.words = words
        self.index = {w: k for k, w in enumerate(words)}
        rows = torch.tensor([vocab[w] for w in words], dtype=torch.long)
        vectors = embeddings.detach().float().cpu()[rows]
        self.vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def with_vectors(self, vectors: torch.Tensor) -> "WordVectors":
        """The same vocabulary with other (unit) vectors, row for row (counter-fitted ones)."""
        out = object.__new__(WordVectors)
        out.words, out.index, out.vectors = self.words, self.index, vectors
        return out

    @classmethod
    def of_adapter(cls, adapter) -> "WordVectors":
        return cls(adapter.tokenizer, input_embedding_weight(adapter))

    def cos(self, a: str, b: str) -> float | None:
        """Cosine of two words, or None when either is outside the vocabulary."""
        ia, ib = self.index.get(a.lower()), self.index.get(b.lower())
        if ia is None or ib is None:
            return None
        return float(self.vectors[ia] @ self.vectors[ib])

    @functools.lru_cache(maxsize=100_000)
    def neighbours(self, word: str, k: int, min_cos: float) -> tuple[tuple[str, float], ...]:
        """The ``k`` nearest other words with cosine >= ``min_cos``, nearest first."""
        row = self.index.get(word.lower())
        if row is None:
            return ()
        sims = self.vectors @ self.vectors[row]
        sims[row] = -2.0
        top = torch.topk(sims, min(k, len(sims))).indices.tolist()
        return tuple((self.words[j], float(sims[j])) for j in top if sims[j] >= min_cos)


class EmbeddingNeighbours:
    """Nearest whole words in embedding space: top ``max_candidates``, cosine >= ``min_cos``;
    ``antonyms=False`` removes WordNet antonyms (raw embeddings put good and bad at cos 0.53)."""

    def __init__(self, vectors: WordVectors, max_candidates: int = 50, min_cos: float = 0.5, antonyms: bool = True):
        self.vectors, self.max_candidates, self.min_cos, self.antonyms = vectors, max_candidates, min_cos, antonyms

    def propose(self, items: list[Item]) -> list[list[str]]:
        out = []
        for text, i, _ in items:
            word = text.word(i)
            near = [w for w, _ in self.vectors.neighbours(word, self.max_candidates, self.min_cos)]
            if not self.antonyms:
                banned = wordnet_antonyms(word)
                near = [w for w in near if w not in banned]
            out.append(dedupe([match_case(w, word) for w in near], word, None))
        return out


class CharEdits:
    """DeepWordBug's four edits, one random instance each: swap two adjacent inner letters,
    substitute, delete or insert a letter. Random letters come from the word's own alphabet
    (a-z for ASCII words, otherwise the letters of the word), so non-Latin scripts stay in-script."""

    def __init__(self, seed: int = 0, skip_first_last: bool = True):
        self.seed, self.skip_first_last = seed, skip_first_last

    def edits(self, word: str, key: int) -> list[str]:
        rng = random.Random(zlib.crc32(f"{self.seed}|{key}|{word}".encode()))
        letters = "abcdefghijklmnopqrstuvwxyz" if word.isascii() else "".join(sorted(set(word)))
        lo, hi = (1, len(word) - 1) if self.skip_first_last and len(word) > 2 else (0, len(word))
        out = []
        if hi - lo >= 2:
            j = rng.randrange(lo, hi - 1)
            out.append(word[:j] + word[j + 1] + word[j] + word[j + 2:])
        if hi > lo:
            j = rng.randrange(lo, hi)
            out.append(word[:j] + rng.choice(letters) + word[j + 1:])
            if len(word) > 1:
                j = rng.randrange(lo, hi)
                out.append(word[:j] + word[j + 1:])
        j = rng.randrange(lo, hi + 1) if hi >= lo else 0
        out.append(word[:j] + rng.choice(letters) + word[j:])
        return dedupe(out, word, None)

    def propose(self, items: list[Item]) -> list[list[str]]:
        return [self.edits(text.word(i), key * 100_003 + i) for text, i, key in items]


class MissingMaskedLM(ValueError):
    """An attack that needs a masked language model was given none (or one that cannot load)."""


class MaskedLMProposals:
    """A masked LM's top predictions at word ``i``, whole words only, one batched forward per call.

    ``mode="mask"`` (BAE-R): the word is replaced by the mask token. ``mode="unmasked"``
    (BERT-Attack): the sentence is fed unchanged and the predictions at the word's first sub-token
    are read. ``mlm`` is a hub id or local folder of any ``AutoModelForMaskedLM`` (an Arabic model
    gives Arabic candidates). Departure: BERT-Attack's sub-word combination for multi-piece words
    is not done; such words get the predictions of their first piece."""

    def __init__(self, mlm: str | None, max_candidates: int = 50, mode: str = "mask", batch_size: int = 32,
                 model=None, tokenizer=None):
        if model is None:
            model, tokenizer = load_masked_lm(mlm)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_candidates, self.mode, self.batch_size = max_candidates, mode, batch_size
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens)
        whole = [i for w, i in vocab.items() if w.isalpha() and not w.startswith("##") and w not in special]
        self.allowed = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
        self.allowed[whole] = True

    @torch.inference_mode()
    def propose(self, items: list[Item]) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            if self.mode == "mask":
                texts = [t.raw_replace(i, self.tokenizer.mask_token) for t, i, _ in chunk]
            else:
                texts = [t.text for t, _, _ in chunk]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt",
                                 return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            logits = self.model(**enc).logits
            for row, (t, i, _) in enumerate(chunk):
                a, _ = t.spans[i]
                pos = self._position(enc["input_ids"][row], offsets[row], a)
                if pos is None:
                    out.append([])
                    continue
                scores = logits[row, pos, : len(self.allowed)].masked_fill(~self.allowed[: logits.shape[-1]], -1e9)
                top = torch.topk(scores, min(self.max_candidates * 2, len(scores))).indices.tolist()
                words = [match_case(self.tokenizer.convert_ids_to_tokens(j), t.word(i)) for j in top]
                out.append(dedupe(words, t.word(i), self.max_candidates))
        return out

    def _position(self, ids, offsets, char_start: int) -> int | None:
        if self.mode == "mask":
            hits = (ids == self.tokenizer.mask_token_id).nonzero()
            return int(hits[0]) if len(hits) else None
        for pos, (a, b) in enumerate(offsets.tolist()):
            if b > a and a <= char_start < b:
                return pos
        return None


NO_MASKED_LM = ("this attack proposes words with a masked language model, and none is set: give one with "
                "mlm=<hub id or local folder> (e.g. mlm=bert-base-uncased, or a local copy). The packaged "
                "all-MiniLM-L6-v2 has no masked-LM head, so it cannot serve.")


def load_masked_lm(name: str | None):
    """(model, tokenizer) of a masked LM, or :class:`MissingMaskedLM` saying what to set."""
    if not name:
        raise MissingMaskedLM(NO_MASKED_LM)
    from ...compat import ensure_torchvision
    from ...offline import resolve_hf_model

    ensure_torchvision()
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        path = resolve_hf_model(name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise MissingMaskedLM(f"cannot load the masked language model {name!r} ({err}); it must be a local folder "
                              f"or a hub id already in the cache when offline") from None
    if info.get("missing_keys"):  # e.g. a sentence encoder: the LM head would be random, its words garbage
        raise MissingMaskedLM(f"{name!r} has no trained masked-LM head (missing {', '.join(info['missing_keys'][:3])}"
                              f", ...); give a masked language model with mlm=<hub id or folder>")
    return model, tokenizer
