"""AdvGLUE: static adversarial test sets for GLUE tasks, loaded, scored and written.

Wang et al., "Adversarial GLUE: A Multi-Task Benchmark for Robustness Evaluation of Language
Models", NeurIPS 2021 Datasets and Benchmarks. The release (``dev.json``) is one JSON object whose
keys are ``sst2``, ``qqp``, ``mnli``, ``mnli-mm``, ``qnli``, ``rte``; each is a list of items with
``idx``, ``label`` and the GLUE field names (:data:`GLUE_FIELDS`). The hub copy is the dataset
``adv_glue`` with configs ``adv_sst2`` ... ``adv_mnli_mismatched`` (validation split only).

- :func:`load_advglue` reads either (a local file / folder, or a hub id) into ``datasets.Dataset`` s;
- :func:`write_advglue` writes the same format atomically (for generators of new adversarial sets);
- :func:`evaluate_advglue` / :func:`run_advglue_eval` measure adapters on them (accuracy; F1 too on QQP);
- :func:`advglue_score` is the benchmark's single number: the mean over tasks, where QQP counts as the
  mean of accuracy and F1 and MNLI as the mean of matched and mismatched;
- :func:`advglue_markdown` renders a result as a markdown table;
- :func:`load_advglue_task` is the ``advglue`` task loader (adversarial set as validation and test;
  an empty train split: AdvGLUE is for evaluation only).

Labels are GLUE's integer labels (:data:`GLUE_LABELS` names them); a model whose task names the
same labels in another order is evaluated with the labels mapped by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .models.base import batch_to, eval_mode

log = logging.getLogger(__name__)

#: AdvGLUE task key -> its GLUE text fields (one, or a sentence pair).
GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}

#: AdvGLUE task key -> GLUE label names, in GLUE's integer order.
GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mnli-mm": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}

#: AdvGLUE task key -> configuration of the hub dataset ``adv_glue``.
HUB_CONFIGS: dict[str, str] = {
    "sst2": "adv_sst2", "qqp": "adv_qqp", "mnli": "adv_mnli", "mnli-mm": "adv_mnli_mismatched",
    "qnli": "adv_qnli", "rte": "adv_rte",
}

#: AdvGLUE task key -> (configuration, split) of the benign GLUE dev set on the hub dataset ``glue``.
GLUE_DEV: dict[str, tuple[str, str]] = {
    "sst2": ("sst2", "validation"), "qqp": ("qqp", "validation"), "mnli": ("mnli", "validation_matched"),
    "mnli-mm": ("mnli", "validation_mismatched"), "qnli": ("qnli", "validation"), "rte": ("rte", "validation"),
}

#: tasks whose score is the mean of accuracy and F1 (positive class = label 1).
F1_TASKS = frozenset({"qqp"})

#: benchmark score groups: each group's score is the mean of its keys' scores.
SCORE_GROUPS: dict[str, tuple[str, ...]] = {
    "sst2": ("sst2",), "qqp": ("qqp",), "mnli": ("mnli", "mnli-mm"), "qnli": ("qnli",), "rte": ("rte",),
}


class AdvGLUEError(ValueError):
    """An AdvGLUE source that cannot be read, or adapters that do not fit it; the message says what to fix."""


# ----------------------------------------------------------------------------- reading and writing


def _check_keys(keys) -> None:
    bad = [k for k in keys if k not in GLUE_FIELDS]
    if bad:
        raise AdvGLUEError(f"unknown AdvGLUE task(s) {bad}; valid: {', '.join(GLUE_FIELDS)}")


def _label_index(key: str, value) -> int:
    if isinstance(value, str) and value in GLUE_LABELS[key]:
        return GLUE_LABELS[key].index(value)
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise AdvGLUEError(f"{key}: unknown label {value!r}; labels: {list(GLUE_LABELS[key])}") from None
    if not 0 <= label < len(GLUE_LABELS[key]):
        raise AdvGLUEError(f"{key}: label {label} outside 0..{len(GLUE_LABELS[key]) - 1}")
    return label


def _items(key: str, items, where: str) -> list[dict]:
    """Validated plain items (dicts) of one task: GLUE fields present, integer labels, ``idx`` filled in."""
    if hasattr(items, "to_list"):
        items = items.to_list()
    if not isinstance(items, (list, tuple)):
        raise AdvGLUEError(f"{where}: {key} must be a list of items, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise AdvGLUEError(f"{where}: {key}[{i}] is not an object")
        missing = [f for f in (*GLUE_FIELDS[key], "label") if f not in item]
        if missing:
            raise AdvGLUEError(f"{where}: {key}[{i}] lacks {missing} (a {key} item has idx, label, "
                               f"{', '.join(GLUE_FIELDS[key])})")
        empty = [f for f in GLUE_FIELDS[key] if not isinstance(item[f], str)]
        if empty:
            raise AdvGLUEError(f"{where}: {key}[{i}] has {empty} that are not text: {[item[f] for f in empty]}")
        try:
            idx = i if item.get("idx") is None else int(item["idx"])
        except (TypeError, ValueError):
            raise AdvGLUEError(f"{where}: {key}[{i}] has idx {item['idx']!r}, not an integer") from None
        row = {"idx": idx, "label": _label_index(key, item["label"])}
        row.update({f: item[f] for f in GLUE_FIELDS[key]})
        row.update({k: v for k, v in item.items() if k not in row})
        out.append(row)
    return out


def _dataset(rows: list[dict]):
    import datasets

    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["idx", "label"]
    return datasets.Dataset.from_dict({c: [r.get(c) for r in rows] for c in columns})


def _from_hub(hub_id: str, keys: Sequence[str], config_split: Mapping[str, tuple[str, str]]) -> dict:
    import datasets

    out = {}
    for key in keys:
        config, split = config_split[key]
        try:
            ds = datasets.load_dataset(hub_id, config, split=split)
        except Exception as err:  # offline, unknown id, ...: say what to do instead
            raise AdvGLUEError(f"cannot load {hub_id!r} (config {config!r}, split {split!r}) from the hub: "
                               f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. Offline, give "
                               f"a file in the AdvGLUE release format (dev.json): task.source.path=<file> for an "
                               f"advglue-* task, or --advglue <file>") from err
        out[key] = _dataset(_items(key, ds, f"{hub_id}/{config}"))
    return out


def load_advglue(source: str | Path | Mapping, tasks: Sequence[str] | None = None) -> dict:
    """AdvGLUE task key -> ``datasets.Dataset`` (columns ``idx``, ``label``, the GLUE fields).

    ``source``: a local ``.json`` file in the release format (or a folder holding ``dev.json``), a
    mapping of task key -> items, or a hub id (``adv_glue``). ``tasks`` limits the keys (default: all
    in the file, or all six from the hub).
    """
    if tasks is not None:
        _check_keys(tasks)
    if isinstance(source, Mapping):
        raw, where = dict(source), "AdvGLUE items"
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "dev.json").exists():
                raise AdvGLUEError(f"{path} is a folder without dev.json (the AdvGLUE release's file name); "
                                   f"give the .json file itself")
            path = path / "dev.json"
        if not path.exists():
            if _looks_like_path(str(source)):
                raise AdvGLUEError(f"AdvGLUE file not found: {path}")
            return _from_hub(str(source), list(tasks or HUB_CONFIGS), {k: (c, "validation") for k, c in HUB_CONFIGS.items()})
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise AdvGLUEError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise AdvGLUEError(f"{path}: the AdvGLUE format is one JSON object with keys {', '.join(GLUE_FIELDS)}")
        where = str(path)
    _check_keys(raw)
    keys = [k for k in (tasks or raw) if k in raw]
    missing = [k for k in (tasks or []) if k not in raw]
    if missing:
        raise AdvGLUEError(f"{where} has no {missing} (has {sorted(raw)})")
    return {k: _dataset(_items(k, raw[k], where)) for k in keys}


def _looks_like_path(text: str) -> bool:
    """A file name rather than a hub id (``adv_glue``, ``owner/name``)."""
    return text.lower().endswith(".json") or text.startswith(("/", ".", "~")) or len(Path(text).parts) > 2


def load_glue_dev(source: str | Path | Mapping, tasks: Sequence[str]) -> dict:
    """The benign counterparts: task key -> dataset, from a release-format file / mapping like
    :func:`load_advglue`, or from a hub id of GLUE (``glue``; matched / mismatched dev for MNLI)."""
    _check_keys(tasks)
    if isinstance(source, Mapping) or Path(source).expanduser().exists():
        return load_advglue(source, tasks)
    if _looks_like_path(str(source)):
        raise AdvGLUEError(f"benign (GLUE dev) file not found: {source}")
    return _from_hub(str(source), list(tasks), GLUE_DEV)


def write_advglue(path: str | Path, items_by_task: Mapping[str, Any]) -> Path:
    """Write task key -> items (lists of dicts or datasets) as one AdvGLUE-format JSON object, atomically.

    :func:`load_advglue` reads the file back to the same items (``idx``, integer ``label``, GLUE
    fields, then any extra keys).
    """
    from .report import atomic_write

    _check_keys(items_by_task)
    payload = {k: _items(k, v, "write_advglue") for k, v in items_by_task.items()}
    path = Path(path)
    atomic_write(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- scoring


def accuracy_f1(pred: Sequence[int], labels: Sequence[int]) -> tuple[float, float]:
    """Accuracy, and F1 of the positive class (label 1)."""
    pred, labels = torch.as_tensor(list(pred)), torch.as_tensor(list(labels))
    n = len(labels)
    acc = (pred == labels).float().mean().item() if n else float("nan")
    tp = ((pred == 1) & (labels == 1)).sum().item()
    fp = ((pred == 1) & (labels != 1)).sum().item()
    fn = ((pred != 1) & (labels == 1)).sum().item()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return acc, f1


def task_score(key: str, metrics: Mapping[str, float], prefix: str = "") -> float | None:
    """One task's score: accuracy, or for QQP the mean of accuracy and F1 (None for an empty task)."""
    acc = metrics[prefix + "accuracy"]
    if acc is None:
        return None
    return (acc + metrics[prefix + "f1"]) / 2 if key in F1_TASKS else acc


def group_scores(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """Benchmark task -> score, over the tasks present (MNLI = mean of matched and mismatched)."""
    out = {}
    for group, keys in SCORE_GROUPS.items():
        present = [k for k in keys if k in results and results[k].get(prefix + "accuracy") is not None]
        if present:
            out[group] = sum(task_score(k, results[k], prefix) for k in present) / len(present)
    return out


def advglue_score(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> float | None:
    """The AdvGLUE score: mean over tasks of :func:`group_scores` (``prefix="benign_"`` for the benign one).

    ``results``: task key -> ``{"accuracy": ..., "f1": ...}`` (fractions; F1 needed for QQP).
    """
    groups = group_scores(results, prefix)
    return sum(groups.values()) / len(groups) if groups else None


# ----------------------------------------------------------------------------- evaluation


def keys_for(text_fields: Sequence[str], num_classes: int | None = None) -> list[str]:
    """AdvGLUE tasks whose GLUE fields (and number of labels) are these."""
    return [k for k, f in GLUE_FIELDS.items()
            if tuple(text_fields) == f and (num_classes is None or num_classes == len(GLUE_LABELS[k]))]


def _label_map(key: str, label_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """GLUE label index -> the model's class index (by name when the model's labels are GLUE's names)."""
    glue = GLUE_LABELS[key]
    if num_classes != len(glue):
        raise AdvGLUEError(f"{key} has {len(glue)} labels, the model {num_classes}")
    if label_names is not None and set(label_names) == set(glue):
        return [list(label_names).index(n) for n in glue]
    if label_names is not None and list(label_names) != list(glue):
        log.warning("%s: the model's labels %s are not GLUE's %s; reading them in GLUE's order (is the task "
                    "really %s?)", key, list(label_names), glue, key)
    return list(range(len(glue)))


@torch.no_grad()
def predict_examples(adapter, examples: list[dict], batch_size: int = 64, accelerator=None) -> tuple[list, list]:
    """Predictions and labels of ``adapter`` on examples (dicts with its text fields and ``label``)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        model = accelerator.unwrap_model(adapter)
    else:
        model = adapter
    device = next(model.parameters()).device
    preds, labels = [], []
    with eval_mode(model):
        for batch in loader:
            batch = batch_to(batch, device)
            pred, y = model.logits(model.embed(batch), batch).argmax(-1), batch["labels"]
            if accelerator is not None:
                pred, y = accelerator.gather_for_metrics((pred, y))
            preds += pred.cpu().tolist()
            labels += y.cpu().tolist()
    return preds, labels


def _examples(key: str, ds, text_fields: Sequence[str], label_map: list[int]) -> list[dict]:
    """Rows of an AdvGLUE dataset as the model's examples: GLUE fields renamed (in order) to its fields."""
    glue = GLUE_FIELDS[key]
    if len(text_fields) != len(glue):
        raise AdvGLUEError(f"{key} has {len(glue)} text field(s) {list(glue)}, the model reads {list(text_fields)}")
    return [{**{ours: row[theirs] for ours, theirs in zip(text_fields, glue)}, "label": label_map[int(row["label"])]}
            for row in ds]


def _measure(key: str, adapter, ds, label_names, batch_size: int, accelerator) -> dict:
    mapping = _label_map(key, label_names, adapter.num_classes)
    pred, labels = predict_examples(adapter, _examples(key, ds, adapter.text_fields, mapping), batch_size, accelerator)
    out = {"n": len(labels), "accuracy": sum(p == y for p, y in zip(pred, labels)) / len(labels) if labels else None}
    if key in F1_TASKS and labels:  # F1 of GLUE's label 1 (duplicate), whatever index the model gives it
        out["f1"] = accuracy_f1([int(p == mapping[1]) for p in pred], [int(y == mapping[1]) for y in labels])[1]
    elif key in F1_TASKS:
        out["f1"] = None
    return out


def evaluate_advglue(adapters, source, benign=None, batch_size: int = 64, accelerator=None,
                     tasks: Sequence[str] | None = None, label_names: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> dict:
    """Accuracy (and QQP F1) of adapters on AdvGLUE, per task, with the benchmark score.

    ``adapters``: one adapter (evaluated on every AdvGLUE task whose GLUE fields are its
    ``text_fields``, e.g. an MNLI model on ``mnli`` and ``mnli-mm``) or a mapping task key ->
    adapter (an ``mnli`` adapter also serves ``mnli-mm`` unless that is given). ``source``: what
    :func:`load_advglue` reads. ``benign``: optional benign counterparts (what :func:`load_glue_dev`
    reads, e.g. ``glue``), adding ``benign_accuracy`` (and ``benign_f1``). ``label_names``: the
    models' label names (per task or one list), to map GLUE labels by name; default GLUE's order.

    Returns ``{"tasks": {key: {"n", "accuracy", ["f1"], ["benign_..."]}}, "groups": {...},
    "score": ..., "benign_score": ...}`` (fractions).
    """
    if isinstance(adapters, Mapping):
        _check_keys(adapters)
        by_key = dict(adapters)
        if "mnli" in by_key and "mnli-mm" not in by_key and (tasks is None or "mnli-mm" in tasks):
            by_key["mnli-mm"] = by_key["mnli"]
    else:
        found = keys_for(adapters.text_fields, adapters.num_classes)
        if not found:
            raise AdvGLUEError(f"the model reads {list(adapters.text_fields)} with {adapters.num_classes} classes, "
                               f"which match no AdvGLUE task ({GLUE_FIELDS}); pass a mapping task -> adapter")
        by_key = {k: adapters for k in found}
    keys = [k for k in (tasks or GLUE_FIELDS) if k in by_key]
    if not keys:
        raise AdvGLUEError(f"no adapter for the requested AdvGLUE tasks {list(tasks or [])}")
    if isinstance(source, Mapping) or Path(str(source)).expanduser().exists():
        available = load_advglue(source)  # a file holds what it holds: evaluate the keys it has
        data = {k: available[k] for k in keys if k in available}
        if not data:
            raise AdvGLUEError(f"{source} has none of the tasks {keys} (has {sorted(available)})")
    else:
        data = load_advglue(source, keys)
    clean = load_glue_dev(benign, list(data)) if benign is not None else {}
    results = {}
    for key, ds in data.items():
        names = label_names.get(key, label_names.get("mnli") if key == "mnli-mm" else None) \
            if isinstance(label_names, Mapping) else label_names
        results[key] = _measure(key, by_key[key], ds, names, batch_size, accelerator)
        if key in clean:
            b = _measure(key, by_key[key], clean[key], names, batch_size, accelerator)
            results[key].update({f"benign_{m}": v for m, v in b.items()})
        log.info("AdvGLUE %s: accuracy %s on %d examples", key, _pct(results[key]["accuracy"]), results[key]["n"])
    return {"tasks": results, "groups": group_scores(results), "score": advglue_score(results),
            "benign_score": advglue_score(results, "benign_") if clean else None}


def advglue_keys(task) -> list[str]:
    """The AdvGLUE task keys of ``task``: its ``advglue`` field (a key or a list), else those whose GLUE
    fields are its ``text_fields``."""
    keys = getattr(task, "advglue", None)
    keys = [keys] if isinstance(keys, str) else list(keys) if keys else keys_for(task.text_fields, task.num_classes)
    if not keys:
        raise AdvGLUEError(f"task {task.name!r} (fields {task.text_fields}) matches no AdvGLUE task; AdvGLUE "
                           f"covers {', '.join(f'{k} {list(f)}' for k, f in GLUE_FIELDS.items())}")
    return keys


def check_advglue_source(task, source) -> list[str]:
    """:func:`advglue_keys`, having checked that a local ``source`` reads and holds one of them:
    ``unirobust eval`` calls this before its attacks, so a wrong ``--advglue`` fails at once."""
    keys = advglue_keys(task)
    if isinstance(source, Mapping) or Path(str(source)).expanduser().exists() or _looks_like_path(str(source)):
        available = load_advglue(source)
        if not set(keys) & set(available):
            raise AdvGLUEError(f"{source} has none of the AdvGLUE tasks of {task.name!r} {keys} (has {sorted(available)})")
    return keys


def run_advglue_eval(adapter, task, source, accelerator=None, batch_size: int = 64, benign=None) -> dict:
    """``unirobust eval <run> --advglue <hub id | file>``: the run's adapter on the AdvGLUE tasks of its task.

    The AdvGLUE task(s) are the task's ``advglue`` field if it has one (a key or a list), else those
    whose GLUE fields are the task's ``text_fields``. Returns :func:`evaluate_advglue`'s result plus
    ``"markdown"`` (the table) and ``"source"``.
    """
    keys = advglue_keys(task)  # evaluate_advglue checks the source itself
    result = evaluate_advglue({k: adapter for k in keys}, source, benign=benign, batch_size=batch_size,
                              accelerator=accelerator, tasks=keys, label_names=list(task.labels))
    result["source"] = str(source)
    result["markdown"] = advglue_markdown(result)
    return result


# ----------------------------------------------------------------------------- reporting


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def advglue_markdown(result: Mapping, title: str | None = None) -> str:
    """A markdown table of an :func:`evaluate_advglue` result (percentages), with the score row."""
    tasks = result["tasks"]
    benign = any("benign_accuracy" in m for m in tasks.values())
    head = ["task", "n", "adv accuracy %", "adv F1 %", "task score %"]
    if benign:
        head += ["benign accuracy %", "benign F1 %", "benign task score %"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in tasks.items():
        row = [key, str(m["n"]), _pct(m["accuracy"]), _pct(m.get("f1")), _pct(task_score(key, m))]
        if benign:
            has = "benign_accuracy" in m
            row += [_pct(m.get("benign_accuracy")), _pct(m.get("benign_f1")),
                    _pct(task_score(key, m, "benign_")) if has else "—"]
        lines.append("| " + " | ".join(row) + " |")
    last = ["**AdvGLUE score**", "", "", "", f"**{_pct(result.get('score'))}**"]
    if benign:
        last += ["", "", f"**{_pct(result.get('benign_score'))}**"]
    lines.append("| " + " | ".join(last) + " |")
    return "\n".join(lines)


def write_advglue_table(path: str | Path, result: Mapping, title: str | None = None) -> Path:
    """:func:`advglue_markdown` written atomically to ``path``."""
    from .report import atomic_write

    atomic_write(Path(path), advglue_markdown(result, title) + "\n")
    return Path(path)


# ----------------------------------------------------------------------------- task loader


def load_advglue_task(task) -> dict:
    """The ``advglue`` loader of task files: ``source.path`` is a release-format file (resolved like
    other task paths) or a hub id (``adv_glue``); ``source.name`` the AdvGLUE key (``sst2``, ``mnli-mm``,
    ...). The adversarial set becomes validation and test; train is empty (evaluation only)."""
    from .tasks import TaskError

    src = task.source
    key = src.name
    if key not in GLUE_FIELDS:
        raise TaskError(f"task {task.name!r}: source.name must be an AdvGLUE task: {', '.join(GLUE_FIELDS)}")
    if list(task.text_fields) != list(GLUE_FIELDS[key]):
        raise TaskError(f"task {task.name!r}: AdvGLUE {key} has text fields {list(GLUE_FIELDS[key])}")
    local = task.resolve_path(src.path) if src.path else None
    where = str(local) if local is not None and local.exists() else (src.path or "adv_glue")
    try:
        ds = load_advglue(where, [key])[key]
    except AdvGLUEError as err:
        raise TaskError(f"task {task.name!r}: {err}") from None
    names = list(task.labels)
    if names != list(GLUE_LABELS[key]):
        mapping = _label_map(key, names, task.num_classes)
        ds = ds.remove_columns("label").add_column("label", [mapping[y] for y in ds["label"]])
    return {"train": ds.select([]), "validation": ds, "test": ds}
