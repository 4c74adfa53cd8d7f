"""Per-example word-attack results: one JSON line per example, resumable, sharded, merged.

Every attack (unirobust's engine or the TextAttack bridge) produces :class:`AttackRecord` rows.
A :class:`ResultStore` appends each finished example to ``part-<rank>.jsonl`` as soon as it ends
(flushed, so a killed run loses at most the example in flight), skips examples already recorded on
restart, and merges the parts into ``results.jsonl`` (sorted by example index) plus
``summary.json``, both written atomically. Under ``accelerate launch`` each process takes the
indices ``i % world == rank``; the merged file does not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field  # the record has a field named ``field``
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

#: ``status`` values: the attack flipped the prediction / did not / the model was already wrong /
#: the example could not be attacked (empty text, label outside the model's classes, ...).
STATUSES = ("success", "failed", "skipped", "error")


@dataclass
class AttackRecord:
    """What happened to one example. ``index`` is its position among the attacked examples, ``idx``
    its row in the task's source split (where the data gives it); ``original`` / ``adversarial`` are
    the attacked text field; ``context`` holds the other fields of a pair unchanged."""

    index: int
    status: str
    original: str
    adversarial: str | None = None
    label: int | None = None
    pred_before: int | None = None
    pred_after: int | None = None
    queries: int = 0
    words_changed: int = 0
    words_total: int = 0
    seconds: float = 0.0
    field: str = "sentence"
    context: dict = dataclass_field(default_factory=dict)
    message: str = ""
    idx: int | None = None

    @property
    def perturbed_fraction(self) -> float:
        return self.words_changed / self.words_total if self.words_total else 0.0

    def to_json(self) -> str:
        row = asdict(self)
        row["perturbed_fraction"] = round(self.perturbed_fraction, 6)
        return json.dumps(row, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "AttackRecord":
        row = json.loads(line)
        row.pop("perturbed_fraction", None)
        return cls(**row)


def int_or_none(x):
    """``int(x)``, or None where ``x`` is not a number (a missing label or source row)."""
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def summarise(records: Iterable[AttackRecord]) -> dict:
    """Attack success rate (over examples the model got right), accuracy under attack (over all
    valid examples), mean words perturbed (over successes, as TextAttack reports it), mean queries
    (over attacked examples) and seconds per example."""
    records = list(records)
    count = {s: sum(r.status == s for r in records) for s in STATUSES}
    valid = count["success"] + count["failed"] + count["skipped"]
    attacked = count["success"] + count["failed"]
    wins = [r for r in records if r.status == "success"]
    tried = [r for r in records if r.status in ("success", "failed")]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return {
        "n": len(records),
        **{f"n_{s}": c for s, c in count.items()},
        "clean_accuracy": attacked / valid if valid else None,
        "accuracy_under_attack": count["failed"] / valid if valid else None,
        "attack_success_rate": count["success"] / attacked if attacked else None,
        "mean_perturbed_fraction": mean(r.perturbed_fraction for r in wins),
        "mean_queries": mean(r.queries for r in tried),
        "seconds_per_example": mean(r.seconds for r in records),
        "total_seconds": sum(r.seconds for r in records),
    }


def read_jsonl(path: Path) -> list[AttackRecord]:
    """Records of a JSONL file; a truncated last line (a run killed mid-write) is ignored."""
    out = []
    if not path.exists():
        return out
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(AttackRecord.from_json(line))
        except (json.JSONDecodeError, TypeError):
            log.warning("%s:%d is not a complete record (interrupted write?); it will be redone", path, number)
    return out


def _label(example: dict) -> int | None:
    try:
        return int(example["label"])
    except (KeyError, TypeError, ValueError):
        return None


#: attack fields that records do not depend on: the example count (which may grow on resume) and the
#: engine's batching (results are the same for any batch size or number of examples in flight)
NOT_IN_KEY = ("n", "batch_size", "concurrency")


def result_key(adapter, attack) -> str:
    """Fingerprint of what a result folder's records depend on: the model's weights (every parameter
    and buffer, hashed) and the attack configuration (its fields except :data:`NOT_IN_KEY`)."""
    import dataclasses
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in [*adapter.named_parameters(), *adapter.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    config = {k: v for k, v in dataclasses.asdict(attack).items() if k not in NOT_IN_KEY} \
        if dataclasses.is_dataclass(attack) else str(attack)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


class ResultStore:
    """Result files of one attack run in ``root``; see the module docstring."""

    def __init__(self, root: str | Path, rank: int = 0, world: int = 1):
        self.root = Path(root)
        self.rank, self.world = rank, world
        self.root.mkdir(parents=True, exist_ok=True)
        self._part = self.root / f"part-{rank}.jsonl"
        self._drop_partial_line()

    def _drop_partial_line(self) -> None:
        """Cut an unfinished last line (a run killed mid-write) so new records start on a fresh line."""
        if not self._part.exists():
            return
        data = self._part.read_bytes()
        if data and not data.endswith(b"\n"):
            self._part.write_bytes(data[: data.rfind(b"\n") + 1])

    @property
    def results_path(self) -> Path:
        return self.root / "results.jsonl"

    def finished(self) -> dict[int, AttackRecord]:
        """Records already written by any earlier run (merged file and every part), by index."""
        done = {r.index: r for r in read_jsonl(self.results_path)}
        for part in sorted(self.root.glob("part-*.jsonl")):
            done.update({r.index: r for r in read_jsonl(part)})
        return done

    def todo(self, n: int) -> list[int]:
        """This process's share of ``range(n)`` that is not finished yet."""
        done = self.finished()
        return [i for i in range(self.rank, n, self.world) if i not in done]

    def append(self, record: AttackRecord) -> None:
        with open(self._part, "a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reset_if_stale(self, key: str, examples: list[dict], field: str) -> bool:
        """Start over (drop every record) when the folder holds results of another model or attack
        configuration (``key`` differs from the one written with them) or of other examples (a
        record's text, label or pair context differs from ``examples[index]``). Returns whether it reset. Call
        on one process before the others open the folder."""
        key_file = self.root / "key.txt"
        done = self.finished()
        reason = None
        if done and (not key_file.exists() or key_file.read_text().strip() != key):
            reason = "another model or attack configuration"
        elif any(r.index < len(examples) and (r.label != _label(examples[r.index])
                                             or (r.status != "error" and r.original != str(examples[r.index].get(field)))
                                             or any(str(examples[r.index].get(f)) != v for f, v in r.context.items()))
                 for r in done.values()):
            reason = "other examples"
        if reason:
            log.warning("%s holds results of %s; starting over", self.root, reason)
            for path in [*self.root.glob("part-*.jsonl"), self.results_path, self.root / "summary.json"]:
                path.unlink(missing_ok=True)
        from ...report import atomic_write

        atomic_write(key_file, key + "\n")
        return reason is not None

    def merge(self, n: int | None = None, extra: dict | None = None) -> dict:
        """Write ``results.jsonl`` (every record, by index: a later run with a smaller ``n`` keeps the
        work of a larger one) and ``summary.json`` (records ``< n``); drop the parts. Call on one
        process after every process has finished."""
        from ...report import atomic_write

        done = self.finished()
        atomic_write(self.results_path, "".join(done[i].to_json() + "\n" for i in sorted(done)))
        records = [done[i] for i in sorted(done) if n is None or i < n]
        summary = {**summarise(records), **(extra or {})}
        atomic_write(self.root / "summary.json", json.dumps(summary, indent=2))
        for part in self.root.glob("part-*.jsonl"):
            part.unlink()
        return summary
