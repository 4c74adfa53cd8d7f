"""Counter-fitting a model's own word vectors with WordNet, offline (Mrksic et al. 2016, NAACL,
"Counter-fitting Word Vectors to Linguistic Constraints").

TextFooler's synonym space is counter-fitted GloVe: synonym pairs pulled together, antonym pairs
pushed apart, everything else kept where it was. Those vectors are a download. Raw input embeddings
of a transformer are a poor synonym space (antonyms sit close: good/bad at cosine 0.53), so we
counter-fit the victim's own whole-word embeddings with WordNet's synonym and antonym pairs:

    loss = sum_A relu(delta - d(u, w)) + sum_S relu(d(u, w) - gamma)
           + sum_{i, j in N(i)} relu(d(v_i, v_j) - d(v0_i, v0_j)),   d = 1 - cos

(antonym repel, synonym attract, vector-space preservation over original neighbours within
``rho``), with the paper's delta = 1 and rho = 0.2. Departures: gamma = 0.3 instead of 0 (see
:func:`counterfit`); full-batch Adam for a fixed number of steps instead of SGD epochs; synonyms are lemma pairs sharing a WordNet synset (no PPDB).
The result is cached per embedding matrix under the unirobust cache folder (safetensors, atomic).
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F

from .sources import WordVectors, wordnet

log = logging.getLogger(__name__)


def wordnet_pairs(words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(synonym pairs, antonym pairs) among ``words`` as K x 2 index tensors (i < j)."""
    wn = wordnet()
    index = {w: k for k, w in enumerate(words)}
    synonyms, antonyms = set(), set()
    for synset in wn.all_synsets():
        lemmas = synset.lemmas()
        names = [index.get(lemma.name().lower()) for lemma in lemmas]
        ids = sorted({k for k in names if k is not None})
        synonyms.update((a, b) for n, a in enumerate(ids) for b in ids[n + 1:])
        for lemma, k in zip(lemmas, names):
            if k is None:
                continue
            for ant in lemma.antonyms():
                j = index.get(ant.name().lower())
                if j is not None and j != k:
                    antonyms.add((min(k, j), max(k, j)))
    synonyms -= antonyms

    def tensor(pairs):
        return torch.tensor(sorted(pairs), dtype=torch.long).reshape(-1, 2)

    return tensor(synonyms), tensor(antonyms)


def close_pairs(vectors: torch.Tensor, rho: float, block: int = 2048, max_per_word: int = 20) -> torch.Tensor:
    """Pairs (i, j), i < j, whose original distance 1 - cos is below ``rho`` (at most ``max_per_word``
    nearest per word)."""
    pairs = []
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        rows = torch.arange(start, min(start + block, len(vectors)))
        sims[torch.arange(len(rows)), rows] = -2.0
        top = torch.topk(sims, min(max_per_word, sims.shape[1] - 1), dim=1)
        keep = top.values >= 1 - rho
        i = rows.unsqueeze(1).expand_as(top.indices)[keep]
        j = top.indices[keep]
        pairs.append(torch.stack([torch.minimum(i, j), torch.maximum(i, j)], 1))
    return torch.unique(torch.cat(pairs), dim=0) if pairs else torch.empty(0, 2, dtype=torch.long)


def counterfit(vectors: torch.Tensor, synonyms: torch.Tensor, antonyms: torch.Tensor, steps: int = 100,
               lr: float = 0.01, delta: float = 1.0, gamma: float = 0.3, rho: float = 0.2) -> torch.Tensor:
    """Counter-fitted unit vectors (N x D) from unit ``vectors`` and K x 2 pair tensors.

    Only words in some pair move (the rest keep their vectors), which makes a 22k-word vocabulary
    take seconds. ``gamma`` = 0.3 stops attraction at cosine 0.7 (the paper's 0 collapses whole
    chains of WordNet senses, e.g. good - goods - commodity, onto one point)."""
    v0 = F.normalize(vectors.float(), dim=-1)
    neighbours = close_pairs(v0, rho)
    if len(antonyms):  # an antonym pair that starts close must be free to move apart
        n = len(v0)
        keep = ~torch.isin(neighbours[:, 0] * n + neighbours[:, 1], antonyms.min(1).values * n + antonyms.max(1).values)
        neighbours = neighbours[keep]
    moving = torch.unique(torch.cat([synonyms.flatten(), antonyms.flatten(), neighbours.flatten()]))
    local = torch.full((len(v0),), -1, dtype=torch.long)
    local[moving] = torch.arange(len(moving))
    syn, ant, near = local[synonyms], local[antonyms], local[neighbours]
    start = v0[moving]
    base = 1 - (start[near[:, 0]] * start[near[:, 1]]).sum(-1)
    v = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)

    def dist(x, pairs):
        return 1 - (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(-1)

    for _ in range(steps):
        x = F.normalize(v, dim=-1)
        loss = (F.relu(delta - dist(x, ant)).sum() + F.relu(dist(x, syn) - gamma).sum()
                + F.relu(dist(x, near) - base).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = v0.clone()
    out[moving] = F.normalize(v.detach(), dim=-1)
    return out


def counterfit_vectors(vectors: WordVectors, steps: int = 100) -> WordVectors:
    """``vectors`` counter-fitted with WordNet (cached on disk per embedding matrix and vocabulary)."""
    from safetensors.torch import load_file, save_file

    from ...offline import cache_dir

    digest = hashlib.sha1(vectors.vectors.numpy().tobytes())
    digest.update("\n".join(vectors.words).encode())
    digest.update(f"steps={steps}".encode())
    path = cache_dir() / "counterfit" / f"{digest.hexdigest()[:20]}.safetensors"
    if path.exists():
        fitted = load_file(str(path))["vectors"]
    else:
        log.info("counter-fitting %d word vectors with WordNet (once per model; cached in %s)",
                 len(vectors.words), path.parent)
        synonyms, antonyms = wordnet_pairs(vectors.words)
        fitted = counterfit(vectors.vectors, synonyms, antonyms, steps=steps)
        from ...report import atomic_path

        with atomic_path(path) as tmp:
            save_file({"vectors": fitted.contiguous()}, tmp)
    return vectors.with_vectors(fitted)
