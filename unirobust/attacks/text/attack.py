"""Word-substitution attacks as recipe-configurable objects, and the function that runs them.

A :class:`WordAttack` is a transformation (``source``), constraints and a search, like a TextAttack
``Attack``, but run by the batched :mod:`engine`. Named recipes (:mod:`recipes`) are presets of it.
``attack_examples(adapter, examples, attack)`` attacks a list of example dicts (the task's text
fields and ``label``) and returns one :class:`AttackRecord` per example plus run statistics.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from .results import AttackRecord, ResultStore, int_or_none, result_key, summarise

log = logging.getLogger(__name__)


@dataclass(config=ConfigDict(extra="forbid"))
class WordAttack:
    """A word-substitution attack. Sources: ``wordnet`` | ``embedding`` (the victim's own input
    embeddings, counter-fitted with WordNet when ``counterfit``) | ``mlm`` (needs ``mlm``) |
    ``chars``. Searches: ``greedy`` (with ``wir``) | ``pwws`` | ``beam``. Word importance ``wir``:
    ``delete`` / ``unk`` (one query per word), ``gradient`` (one backward pass), ``candidate`` (one
    query per word with its own first candidate, so ranking is also attacking and the probes are
    reused), ``random``, ``none``. ``n`` limits how many
    examples an evaluation attacks; ``field`` is the attacked text field (default: the last one).
    ``batch_size`` is the number of texts per victim forward (32 is fastest for MiniLM on CPU; raise it
    on accelerators), ``concurrency`` the number of examples advanced together."""

    kind: ClassVar[str] = "word"

    source: Literal["wordnet", "embedding", "mlm", "chars"] = "wordnet"
    max_candidates: int = Field(default=50, ge=1)
    min_cos: float | None = Field(default=None, ge=-1, le=1)
    counterfit: bool = False
    antonyms: bool = True
    mlm: str | None = None
    mlm_mode: Literal["mask", "unmasked"] = "mask"
    search: Literal["greedy", "pwws", "beam"] = "greedy"
    wir: Literal["delete", "unk", "gradient", "candidate", "random", "none"] = "delete"
    beam_width: int = Field(default=4, ge=1)
    early_exit: bool = True
    stopwords: bool = True
    max_change: float = Field(default=1.0, gt=0, le=1, description=(
        "share of the attacked field's words that may change; counted over the whole text, as "
        "TextAttack's MaxWordsPerturbed does, so words past the model's max_length count too"))
    min_change_words: int = Field(default=1, ge=1)
    max_edit_distance: int | None = Field(default=None, ge=1)
    pos: bool = False
    sentence_sim: float | None = Field(default=None, ge=-1, le=1)
    sentence_window: int | None = Field(default=15, ge=1)
    sentence_metric: Literal["angular", "cosine"] = "angular"
    sentence_compare: Literal["previous", "original"] = "previous"
    sentence_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    targeted: bool = False
    query_budget: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    field: str | None = None
    batch_size: int = Field(default=32, ge=1)
    concurrency: int = Field(default=64, ge=1)
    seed: int = 0

    def __post_init__(self):
        if self.source == "mlm" and not self.mlm:
            from .sources import NO_MASKED_LM

            raise ValueError(NO_MASKED_LM)
        self._pinned_vectors = None

    def pin_vectors(self, adapter) -> None:
        """On the first call, freeze the word vectors (neighbours and cosine constraint) at
        ``adapter``'s current input embeddings for every later use, even after the model trains on;
        later calls change nothing. Attack-augmented training calls it every batch: A2T's candidate
        space is a fixed set of counter-fitted vectors, and rebuilding it after every optimizer step
        (counter-fitting takes ~30 s) would dominate the step."""
        if self._pinned_vectors is None and (self.source == "embedding" or self.min_cos is not None):
            self._pinned_vectors = self.vectors(adapter)

    # ------------------------------------------------------------------ building the parts

    def build_source(self, adapter):
        from . import sources

        if self.source == "wordnet":
            return sources.WordNetSynonyms(self.max_candidates)
        if self.source == "chars":
            return sources.CharEdits(self.seed)
        if self.source == "mlm":
            return sources.MaskedLMProposals(self.mlm, self.max_candidates, self.mlm_mode)
        return sources.EmbeddingNeighbours(self.vectors(adapter), self.max_candidates,
                                           self.min_cos if self.min_cos is not None else -1.0, self.antonyms)

    def vectors(self, adapter):
        """Whole-word vectors of the victim's input embeddings (counter-fitted if asked), cached per
        embedding version; the pinned ones after :meth:`pin_vectors`."""
        from .sources import WordVectors

        if self._pinned_vectors is not None:
            return self._pinned_vectors

        from .sources import input_embedding_weight

        weight = input_embedding_weight(adapter)
        key = (id(weight), weight._version, self.counterfit)
        if key not in _VECTORS:
            vectors = WordVectors(adapter.tokenizer, weight)
            if self.counterfit:
                from .counterfit import counterfit_vectors

                vectors = counterfit_vectors(vectors)
            _VECTORS.clear()  # one model at a time: keep memory flat
            _VECTORS[key] = vectors
        return _VECTORS[key]

    def build_search(self, adapter):
        from .search import Constraints, Search

        needs_vectors = self.min_cos is not None
        constraints = Constraints(
            stopwords=stopword_set() if self.stopwords else frozenset(),
            max_change=self.max_change, min_change_words=self.min_change_words,
            vectors=self.vectors(adapter) if needs_vectors else None, min_cos=self.min_cos, pos=self.pos,
            max_edit_distance=self.max_edit_distance, sentence_sim=self.sentence_sim,
            sentence_window=self.sentence_window, sentence_metric=self.sentence_metric,
            sentence_compare=self.sentence_compare)
        unk = getattr(adapter.tokenizer, "unk_token", None) or "[UNK]"
        return Search(self.search, self.wir, constraints, unk, self.beam_width, self.seed, self.early_exit)


_VECTORS: dict = {}


@functools.lru_cache(maxsize=1)
def stopword_set() -> frozenset[str]:
    """NLTK's English stop words (bundled copy)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "data" / "stopwords_english.txt"
    return frozenset(path.read_text(encoding="utf8").split())


# ----------------------------------------------------------------------------- running


def check_example(example: dict, fields: list[str], field: str, num_classes: int) -> str:
    """Why an example cannot be attacked ('' when it can)."""
    from .words import WordText

    missing = [f for f in fields if f not in example]
    if missing:
        return f"missing text field(s) {', '.join(missing)}"
    if not isinstance(example.get(field), str) or not example[field].strip():
        return f"empty text in field {field!r}"
    try:
        label = int(example["label"])
    except (KeyError, TypeError, ValueError):
        return "missing or non-integer label"
    if not 0 <= label < num_classes:
        return f"label {label} is outside the model's classes 0..{num_classes - 1}"
    if not len(WordText.of(example[field])):
        return f"no words in field {field!r}"
    return ""


def attack_examples(adapter, examples: list[dict], attack: WordAttack, store: ResultStore | None = None,
                    progress: bool = True, indices: list[int] | None = None) -> tuple[list[AttackRecord], dict]:
    """Attack ``examples`` with ``attack`` on ``adapter`` (any text adapter).

    With a ``store``, examples it already holds are skipped and each new record is appended as it
    finishes; ``indices`` restricts the run to those positions (a process's shard). Returns the new
    records (in index order) and statistics: ``seconds`` (wall), ``forward_seconds`` (victim
    forwards and gradients), ``encoder_seconds``, ``forward_fraction`` and the summary metrics.
    The model is attacked in eval mode (no dropout), whatever mode it is in; its mode is restored.
    """
    from ...models.base import eval_mode
    from .engine import Engine, Example, Victim, sentence_encoder
    from .words import WordText

    if getattr(adapter, "modality", "text") != "text":
        raise ValueError("word-substitution attacks need a text model")
    fields = list(adapter.text_fields)
    field = attack.field or fields[-1]
    if field not in fields:
        raise ValueError(f"attack field {field!r} is not a text field of the model ({', '.join(fields)})")
    began = time.perf_counter()
    todo = list(range(len(examples))) if indices is None else list(indices)
    if store is not None:
        done = store.finished()
        todo = [i for i in todo if i not in done]
    victim = Victim(adapter, attack.batch_size)
    source = attack.build_source(adapter)
    search = attack.build_search(adapter)
    handlers = {"candidates": source.propose,
                "grad": victim.word_saliency}
    encoder, encoder_before = None, 0.0
    if attack.sentence_sim is not None:
        encoder = sentence_encoder(attack.sentence_encoder)  # shared: its clock runs across attacks
        encoder_before = encoder.seconds
        handlers["encode"] = _memoised(encoder.encode)
    engine = Engine(victim, handlers, attack.concurrency)
    records: dict[int, AttackRecord] = {}
    truncated = 0

    def emit(record: AttackRecord) -> None:
        records[record.index] = record
        if store is not None:
            store.append(record)

    def prepared():
        nonlocal truncated
        for i in todo:
            ex = examples[i]
            problem = check_example(ex, fields, field, adapter.num_classes)
            context = {f: ex.get(f) for f in fields if f != field}
            if problem:
                emit(AttackRecord(i, "error", str(ex.get(field, "")), label=int_or_none(ex.get("label")),
                                  field=field, context=context, message=problem, idx=int_or_none(ex.get("idx"))))
                continue
            label = int(ex["label"])
            target = None
            if attack.targeted:
                target = int(ex.get("target_label", (label + 1) % adapter.num_classes))
            item = Example(i, ex, field, fields, label, target, WordText.of(ex[field]), attack.query_budget)
            if _too_long(adapter, item.compose(ex[field])):
                item.message = f"truncated to max_length={adapter.max_length} tokens"
                truncated += 1
            yield item

    def finish(item, outcome) -> None:
        text, p, p0, status = outcome
        emit(AttackRecord(
            item.index, status, item.start.text, adversarial=text.text if status != "skipped" else None,
            label=item.label, pred_before=int(p0.argmax()), pred_after=int(p.argmax()), queries=item.queries,
            words_changed=len(item.start.changed(text)), words_total=len(item.start), seconds=item.seconds,
            field=field, context={f: item.example[f] for f in fields if f != field}, message=item.message,
            idx=int_or_none(item.example.get("idx"))))

    with eval_mode(adapter):  # dropout would make predictions, and so successes, random
        engine.run(prepared(), search, finish, total=len(todo), progress=progress)
    if truncated:
        log.warning("%d example(s) were longer than max_length=%d tokens and were truncated", truncated,
                    adapter.max_length)
    seconds = time.perf_counter() - began
    new = [records[i] for i in sorted(records)]
    encoder_seconds = encoder.seconds - encoder_before if encoder else 0.0
    model_seconds = victim.forward_seconds + encoder_seconds
    stats = {**summarise(new), "seconds": seconds, "forward_seconds": victim.forward_seconds,
             "encoder_seconds": encoder_seconds,
             "forward_fraction": victim.forward_seconds / seconds if seconds else None,
             "model_fraction": model_seconds / seconds if seconds else None,
             "examples_per_second": len(new) / seconds if seconds else None}
    return new, stats


def _memoised(fn):
    """A batched function of texts with an unbounded per-run memo (sentence-encoder calls)."""
    memo: dict = {}

    def call(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            memo.update(zip(missing, fn(missing)))
        return [memo[t] for t in texts]

    return call


def _too_long(adapter, model_input) -> bool:
    tok = adapter.tokenizer
    args = [model_input] if isinstance(model_input, str) else list(model_input)
    return len(tok(*args, truncation=False)["input_ids"]) > adapter.max_length


def run_word_attack(adapter, examples: list[dict], attack, out_dir, accelerator=None, fresh: bool = False,
                    progress: bool = True, runner=None) -> dict:
    """Attack ``examples`` into ``out_dir`` (results.jsonl + summary.json) and return the summary.

    Resumable: examples already in ``out_dir`` are not redone (``fresh`` starts over; results of
    another model, attack configuration or example list are dropped with a warning). Under
    ``accelerate launch`` each process attacks indices ``i % world == rank``; the main process
    merges. ``runner(adapter, examples, attack, store, indices, progress)`` replaces unirobust's
    engine (the TextAttack bridge uses this); it must append every record to ``store``.
    """
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if fresh and rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir)
    if rank == 0:
        field = getattr(attack, "field", None) or adapter.text_fields[-1]
        ResultStore(out_dir).reset_if_stale(result_key(adapter, attack), examples, field)
    if accelerator:
        accelerator.wait_for_everyone()
    store = ResultStore(out_dir, rank, world)
    share = store.todo(len(examples))
    began = time.perf_counter()
    if runner is None:
        _, stats = attack_examples(adapter, examples, attack, store=store, progress=progress, indices=share)
        timing = {k: stats[k] for k in ("forward_seconds", "encoder_seconds", "forward_fraction", "model_fraction")}
    else:
        runner(adapter, examples, attack, store, share, progress)
        timing = {}
    timing["wall_seconds_this_run"] = time.perf_counter() - began
    if accelerator:
        accelerator.wait_for_everyone()
    summary = {}
    if rank == 0:
        summary = store.merge(len(examples), {"processes": world, **timing})
    if accelerator:
        accelerator.wait_for_everyone()
        if rank != 0:
            import json

            summary = json.loads((out_dir / "summary.json").read_text())
    return summary
