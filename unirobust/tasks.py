"""Tasks: *what problem* — data source, fields, labels, modality, default threat model.

A task is a YAML file in ``tasks/`` (or any path, or a folder listed in ``$UNIROBUST_TASKS``),
validated by :class:`Task`. Loading returns a :class:`TaskData` with ``train`` / ``validation`` /
``test`` splits; each split is a map-style dataset whose items are dicts: text tasks carry their
text fields and ``label`` (int), vision tasks carry ``image`` (float C x H x W in [0, 1]) and ``label``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .registry import LOADERS

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "validation", "test")


class TaskError(ValueError):
    """A task that cannot be found, validated or loaded; the message says what to fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ThreatModel(Strict):
    """Default perturbation budget of a task: ``norm`` ball of radius ``eps`` around the clean point.

    Vision: pixels in [0, 1]. Text: per-token ball in embedding space; with ``relative`` the radius
    of token t is ``eps * ||e_t||`` (the embedding's own norm).
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(ge=0)
    alpha: float | None = Field(default=None, gt=0, description="multi-step attack step size; default 2.5 * eps / steps")
    steps: int = Field(default=10, ge=1)
    relative: bool = False

    @field_validator("eps", "alpha", mode="before")
    @classmethod
    def _fractions(cls, value: Any) -> Any:
        return fraction(value)


_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def fraction(value: Any) -> Any:
    """A budget written as the field writes it, ``8/255``, as its float; anything else unchanged."""
    m = _FRACTION.match(value) if isinstance(value, str) else None
    return float(m[1]) / float(m[2]) if m and float(m[2]) else value


class DataSource(Strict):
    """Where the examples come from; ``loader`` names an entry of the loader registry."""

    loader: str
    path: str | None = None          # hub dataset id, local folder / file, npz file, sklearn loader
    name: str | None = None          # hub configuration (e.g. "sst2" of "glue")
    splits: dict[str, str] = {}      # our split -> source split name or file name
    columns: list[str] | None = None  # column names of header-less csv/tsv files
    holdout: dict[str, float] = {}   # split -> fraction of train, for sources without that split
    seed: int = Field(default=0, ge=0, lt=2**32)  # of the holdout split (sklearn's random_state range)

    @field_validator("loader")
    @classmethod
    def _known_loader(cls, v: str) -> str:
        LOADERS.check(v)
        return v

    @field_validator("splits", "holdout")
    @classmethod
    def _known_splits(cls, v: dict) -> dict:
        bad = set(v) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown split(s) {sorted(bad)}; valid: {', '.join(SPLITS)}")
        return v


class Task(Strict):
    name: str
    description: str = ""
    modality: Literal["vision", "text"]
    labels: list[str] = Field(min_length=2)
    label_field: str = "label"
    text_fields: list[str] = []        # text: one field, or two for sentence pairs
    image_shape: list[int] | None = None  # vision: [C, H, W]
    mean: list[float] | None = None    # vision normalisation, applied inside the model
    std: list[float] | None = None
    threat: ThreatModel
    metric: Literal["accuracy"] = "accuracy"
    source: DataSource
    max_train: int | None = Field(default=None, ge=1)
    max_eval: int | None = Field(default=None, ge=1)
    templates: list[str] | None = None  # head: prompt default templates ("{field}" and one [MASK])
    verbalizer: dict[str, list[str]] | None = None  # head: prompt: label name -> words read at the mask
    advglue: list[str] | None = None   # AdvGLUE key(s) for `eval --advglue` (default: by text_fields)
    base_dir: str | None = None        # where relative paths are resolved (set when loaded from a file)

    @model_validator(mode="after")
    def _modality_fields(self) -> "Task":
        if self.modality == "text" and not 1 <= len(self.text_fields) <= 2:
            raise ValueError("a text task needs text_fields: one field, or two for sentence pairs")
        if self.verbalizer is not None and set(self.verbalizer) != set(self.labels):
            raise ValueError(f"verbalizer keys must be the task's labels {self.labels}")
        if self.modality == "vision":
            if self.threat.relative:
                raise ValueError("threat.relative scales the budget by each token's embedding norm: text tasks only")
            if not self.image_shape or len(self.image_shape) != 3 or min(self.image_shape) < 1:
                raise ValueError(f"a vision task needs image_shape: [channels, height, width], got {self.image_shape}")
            c, h, w = self.image_shape
            if c not in (1, 3, 4) and w in (1, 3, 4) and c > w:
                raise ValueError(f"image_shape {self.image_shape} reads as {c} channels of {h} x {w}: "
                                 f"channels come first, [{w}, {c}, {h}]")
            for key, stat in (("mean", self.mean), ("std", self.std)):
                if stat is not None and len(stat) != c:
                    raise ValueError(f"{key} has {len(stat)} value(s), image_shape {self.image_shape} has {c} "
                                     f"channel(s): one value per channel")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def resolve_path(self, path: str) -> Path:
        """A path as given if it exists, else relative to the task file's project root."""
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists() or self.base_dir is None:
            return p
        alt = Path(self.base_dir) / p
        return alt if alt.exists() else p

    def check_data(self) -> None:
        """Fail early, with the path, when a local data file is missing (no data is read)."""
        src = self.source
        if src.loader == "package" or (src.loader in ("local", "npz", "imagefolder") and src.path):
            root = PACKAGE_DATA / (src.path or "") if src.loader == "package" else self.resolve_path(src.path)
            whole = src.loader in ("npz", "imagefolder") and not src.splits  # path is the train split itself
            paths = {"": root} if whole else {split: root / f for split, f in src.splits.items()}
            what = "folder" if src.loader == "imagefolder" else "data file"
            for split, p in paths.items():
                if not p.exists():
                    other_root = self.base_dir and Path(self.base_dir).resolve() != Path.cwd().resolve()
                    tried = "" if p.is_absolute() else f"; looked in {Path.cwd()}" + (
                        f" and in {self.base_dir} (the task file's project root)" if other_root else "")
                    fix = (f"task.source.splits.{split}=..., or task.source.path=... for the folder it is in"
                           if split else "task.source.path=...")
                    raise TaskError(f"task {self.name!r}: {what} not found: {p}{tried} (override it with {fix})")


# ----------------------------------------------------------------------------- finding tasks


def task_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("UNIROBUST_TASKS", "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "tasks", PROJECT_ROOT / "tasks"]


def available_tasks() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in task_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(f.stem, f)
    return found


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``; nested dicts merge, ``null`` removes a key (the field
    is back to its default: ``task.source.splits.test=null``), everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_task(raw: dict, overrides: dict) -> dict:
    """A task file's fields with a recipe's ``task`` overrides. A ``source`` with another ``loader``
    replaces the file's source whole: the hub splits or sklearn holdout of the file mean nothing to
    local files (a merged holdout would silently replace the files' own test split)."""
    source = overrides.get("source")
    if isinstance(source, dict) and source.get("loader") not in (None, (raw.get("source") or {}).get("loader")):
        raw = {k: v for k, v in raw.items() if k != "source"}
    return deep_merge(raw, overrides)


def task_file(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        return Path(name)
    tasks = available_tasks()
    if name not in tasks:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(sorted(tasks))} "
                        f"(or a path to a task .yaml)")
    return tasks[name]


#: fields that make a recipe's ``task:`` a whole task (a run folder's recipe.yaml records it so)
WHOLE_TASK = {"modality", "labels", "threat", "source"}


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML loading that also reads floats written without a dot (``1e-2``, ``5E3``) as numbers,
    as YAML 1.2 does; PyYAML's YAML 1.1 reads them as strings."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` for recipes, task files and overrides (see :class:`_YamlLoader`)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def get_task(name: str, overrides: dict[str, Any] | None = None) -> Task:
    """The task called ``name`` (or at a .yaml path), with recipe ``overrides`` merged in.

    Overrides that are a whole task (a run's resolved ``recipe.yaml``) are the task: no task file is
    read, so a run folder means the same task and threat model from any directory, whatever the
    task files say today."""
    if WHOLE_TASK <= set(overrides or {}):
        return Task.model_validate({"name": name, **overrides})
    path = task_file(name)
    with open(path) as f:
        raw = load_yaml(f.read()) or {}
    raw = merge_task(raw, overrides or {})
    raw.setdefault("name", path.stem)  # a task file of one's own need not repeat its name
    raw.setdefault("base_dir", str(path.resolve().parent.parent))
    return Task.model_validate(raw)


# ----------------------------------------------------------------------------- datasets


class ArrayDataset:
    """Images (N x C x H x W float32 in [0, 1]) and labels as a map-style dataset of dicts."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise TaskError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}

    def select(self, idx: Sequence[int]) -> "ArrayDataset":
        idx = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx])


class ImageFileDataset:
    """Image files decoded when read: each item an ``image`` (float C x H x W in [0, 1], converted to
    the task's channels and resized to its height and width) and its ``label``. For folders of
    photos too large to hold in memory as one array (``loader: imagefolder``)."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, image_shape: Sequence[int]):
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_shape = tuple(image_shape)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": read_image(self.files[i], self.image_shape), "label": int(self.labels[i])}

    def select(self, idx: Sequence[int]) -> "ImageFileDataset":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageFileDataset([self.files[i] for i in idx], self.labels[idx], self.image_shape)


def read_image(path: Path, image_shape: Sequence[int]) -> np.ndarray:
    """One image file as float32 C x H x W in [0, 1]: grey (C = 1) or RGB (C = 3), bilinearly resized
    to H x W when its size differs. 16/32-bit integer grey files keep their depth (0..65535 -> [0, 1];
    PIL's own conversion to 8 bits would clip them to white); float files (TIFF mode F) are taken as
    they are and must lie in [0, 1]. EXIF orientation is not applied, as in torchvision's ImageFolder."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    try:
        with Image.open(path) as im:
            floating, deep = im.mode == "F", im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N")
            im = im.convert("F" if deep or floating else "L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            scale = 1.0 if floating else 65535.0 if deep else 255.0
            x = np.asarray(im, dtype=np.float32) / scale
    except (OSError, UnidentifiedImageError) as err:
        raise TaskError(f"cannot read image {path}: {err}") from err
    if (floating or deep) and x.size and not (0.0 <= float(x.min()) and float(x.max()) <= 1.0):
        kind = "float values" if floating else "integer values above 65535 (a 32-bit file?)"
        raise TaskError(f"image {path}: {kind}: they span [{x.min() * scale:g}, {x.max() * scale:g}]; float files "
                        f"are read as [0, 1] and integer ones as 0..65535: rescale the file")
    if x.ndim == 2:
        return np.repeat(x[None], c, axis=0)
    return x.transpose(2, 0, 1).copy()


def labels_of(ds) -> np.ndarray:
    return ds.labels if isinstance(ds, (ArrayDataset, ImageFileDataset)) else np.asarray(ds["label"])


@dataclass
class TaskData:
    task: Task
    train: Any
    validation: Any
    test: Any
    one_held_out: bool = False  # validation and test are the same examples (the source gave one of them)

    def split(self, name: str):
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)


def _stratify_by(y: np.ndarray, n_first: int, n_second: int) -> np.ndarray | None:
    """``y`` if sklearn can split it into parts of ``n_first`` and ``n_second`` rows by class, else None
    (a class with one row, or more classes than one part has rows)."""
    classes, counts = np.unique(y, return_counts=True)
    return y if len(y) and counts.min() >= 2 and len(classes) <= min(n_first, n_second) else None


def _stratified_holdout(ds, fraction: float, seed: int):
    """(rest, held out): ``fraction`` of ``ds``, stratified by class. The held-out part comes in a
    seeded shuffled order, so its first rows (the monitor's, the checks', ``eval.max_examples``) mix
    every class even when the source is sorted by class (animal-mnist)."""
    from sklearn.model_selection import train_test_split

    n_held = math.ceil(fraction * len(ds))
    if not 0 < n_held < len(ds):
        raise TaskError(f"a holdout of {fraction:.3g} of {len(ds)} rows leaves an empty split")
    stratify = _stratify_by(labels_of(ds), n_held, len(ds) - n_held)
    keep, held = train_test_split(np.arange(len(ds)), test_size=n_held, random_state=seed, stratify=stratify)
    return ds.select(np.sort(keep)), ds.select(held)


def _shuffled_head(ds, n: int | None, seed: int):
    """``n`` rows of ``ds`` (``max_train`` / ``max_eval``), seeded and stratified by class (each class
    keeps its share), in shuffled order; all of ``ds``, in its own order, when ``n`` is None or larger."""
    if n is None or n >= len(ds):
        return ds
    from sklearn.model_selection import train_test_split

    stratify = _stratify_by(labels_of(ds), n, len(ds) - n)
    if stratify is None:
        return ds.select(np.random.default_rng(seed).permutation(len(ds))[:n])
    picked, _ = train_test_split(np.arange(len(ds)), train_size=n, random_state=seed, stratify=stratify)
    return ds.select(picked)


def label_indices(task: Task, values) -> np.ndarray:
    """Labels as class indices: each a label name of the task, or an index (2, "2", 2.0; not 2.5,
    which int() would silently cut to 2)."""
    names = {n: i for i, n in enumerate(task.labels)}

    def to_index(v):
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v in names:  # a label name, even one that looks like a number
            return names[v]
        try:
            number = float(v)
            if number == int(number):
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
        raise TaskError(f"task {task.name!r}: unknown label {v!r}; labels are the names {task.labels} or "
                        f"their indices 0..{task.num_classes - 1}")

    return np.asarray([to_index(v) for v in values], dtype=np.int64)


def _normalise_labels(task: Task, ds):
    """Rename the label column to ``label`` and map label names to indices."""
    if isinstance(ds, (ArrayDataset, ImageFileDataset)):
        bad = ds.labels[(ds.labels < 0) | (ds.labels >= task.num_classes)]
        if len(bad):
            raise TaskError(f"task {task.name!r}: label {bad[0]} outside 0..{task.num_classes - 1}")
        return ds
    if task.label_field not in ds.column_names:
        raise TaskError(f"task {task.name!r}: label field {task.label_field!r} not in data columns {ds.column_names}; "
                        f"name the label column with the task's label_field")
    if task.label_field != "label":
        ds = ds.rename_column(task.label_field, "label")
    missing = [f for f in task.text_fields if f not in ds.column_names]
    if missing:
        raise TaskError(f"task {task.name!r}: text field(s) {missing} not in data columns {ds.column_names}")
    ys = label_indices(task, ds["label"])
    ds = ds.remove_columns("label").add_column("label", ys.tolist())
    if "idx" not in ds.column_names:  # each example's row in its source split, kept through holdout and
        ds = ds.add_column("idx", list(range(len(ds))))  # sampling (AdvGLUE items made by advgen carry it)
    if len(ys) and (ys.min() < 0 or ys.max() >= task.num_classes):
        bad = int(ys[(ys < 0) | (ys >= task.num_classes)][0])
        raise TaskError(f"task {task.name!r}: label {bad} outside 0..{task.num_classes - 1} (labels are 0-based "
                        f"indices into {task.labels}; an unlabelled split such as GLUE test? map test to validation)")
    return ds


def load_task(task: Task, seed: int = 0) -> TaskData:
    """Load the task's splits, derive missing ones by stratified holdout, apply size limits."""
    task.check_data()
    raw = LOADERS.build(task.source.loader, task)
    if "train" not in raw:
        raise TaskError(f"task {task.name!r}: the source gave no train split (got {sorted(raw)})")
    splits = {k: _normalise_labels(task, v) for k, v in raw.items()}
    whole = len(splits["train"])
    if sum(task.source.holdout.values()) >= 1:
        raise TaskError(f"task {task.name!r}: source.holdout fractions must sum to less than 1")
    both = sorted(set(task.source.holdout) & set(raw))
    if both:
        raise TaskError(f"task {task.name!r}: split(s) {both} come from the source and from source.holdout; "
                        f"drop one (task.source.holdout.{both[0]}=null)")
    for name, frac in task.source.holdout.items():  # fractions of the whole train source
        splits["train"], splits[name] = _stratified_holdout(splits["train"], frac * whole / len(splits["train"]),
                                                            task.source.seed)
    splits.setdefault("validation", splits.get("test"))
    splits.setdefault("test", splits["validation"])
    if splits["validation"] is None:
        raise TaskError(f"task {task.name!r}: no validation or test split; add source.holdout")
    return TaskData(
        task,
        train=_shuffled_head(splits["train"], task.max_train, seed),
        validation=_shuffled_head(splits["validation"], task.max_eval, seed),
        test=_shuffled_head(splits["test"], task.max_eval, seed),
        one_held_out=splits["validation"] is splits["test"],
    )


# ----------------------------------------------------------------------------- loaders


def _read_table(path: Path, columns: list[str] | None):
    """A csv / tsv / json / jsonl file as a ``datasets.Dataset`` (text kept verbatim, no quoting)."""
    import datasets

    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return datasets.Dataset.from_json(str(path))
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not text
        rows = list(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL))
    header, body = (columns, rows) if columns else (rows[0], rows[1:])
    body = [r for r in body if r]
    bad = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if bad is not None:
        raise TaskError(f"{path}: row {bad + 1} has {len(body[bad])} fields, expected {len(header)} ({header})")
    return datasets.Dataset.from_dict({c: [r[i] for r in body] for i, c in enumerate(header)})


def load_local(task: Task) -> dict:
    src = task.source
    root = task.resolve_path(src.path or ".")
    if not src.splits:
        raise TaskError(f"task {task.name!r}: a local source needs splits: {{train: file, ...}}")
    return {split: _read_table(root / f, src.columns) for split, f in src.splits.items()}


def load_package(task: Task) -> dict:
    src = task.source
    return {split: _read_table(PACKAGE_DATA / (src.path or "") / f, src.columns) for split, f in src.splits.items()}


def offline_hint(task: Task) -> str:
    """How to run ``task`` from local files: the columns its files need, and the override."""
    columns = [*task.text_fields, task.label_field] if task.modality == "text" else ["image", task.label_field]
    bundled = " (or the bundled task sst2-sample)" if task.name == "sst2" else ""
    return (f"Offline, read local files{bundled} whose columns are {', '.join(columns)} (TSV / CSV with a header, "
            f"or JSONL; task.label_field=<column> if the labels are in another, task.source.columns=[...] for "
            f"headerless files): task.source={{loader: local, path: <folder>, splits: {{train: <file>, "
            f"validation: <file>}}}}; the task file's first comment lines give the command for a copy bundled here, where there is one "
            f"(README, Tasks)")


def load_hub(task: Task) -> dict:
    import datasets

    src = task.source
    try:
        ds = datasets.load_dataset(src.path, src.name)
    except Exception as err:  # offline, unknown id, gated, ...: say what to do instead
        raise TaskError(f"task {task.name!r}: cannot load {src.path!r}" + (f" (config {src.name!r})" if src.name else "")
                        + f" from the hub: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
                        + offline_hint(task)) from err
    mapping = src.splits or {s: s for s in SPLITS if s in ds}
    return {ours: ds[theirs] for ours, theirs in mapping.items()}


def _images(task: Task, images: np.ndarray) -> np.ndarray:
    """uint8 or float images (N x H x W, N x H x W x C or N x C x H x W) -> float N x C x H x W in [0, 1]."""
    x = np.asarray(images)
    if x.size and float(x.min()) < 0:
        raise TaskError(f"task {task.name!r}: images have negative values (min {float(x.min()):.3g}); give raw "
                        f"pixels (uint8, or floats in [0, 1]): attacks work in [0, 1] and the task's mean / std "
                        f"normalise inside the model")
    pixels = np.issubdtype(x.dtype, np.integer)  # 0..255, whatever the integer type (np.array of lists: int64)
    top = float(x.max()) if x.size else 0.0
    if top > (255 if pixels else 1 + 1e-6):  # no dividing by the max: that would brighten a dark set
        raise TaskError(f"task {task.name!r}: {x.dtype} images have values up to {top:.4g}; give integer pixels "
                        f"in 0..255 or floats in [0, 1]")
    x = x.astype(np.float32) / 255.0 if pixels else np.clip(x.astype(np.float32), 0.0, 1.0)
    c, h, w = task.image_shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] == c and x.shape[1] != c:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1:] != (c, h, w):
        raise TaskError(f"task {task.name!r}: images have shape {x.shape[1:]}, image_shape says {(c, h, w)}")
    return x


def load_npz(task: Task) -> dict:
    """``path``: one .npz file (the train split; hold the others out with ``holdout``), or with
    ``splits`` a folder and split -> file. Arrays ``images`` and ``labels`` (or the two ``columns``
    named); labels are class indices or label names."""
    src = task.source
    files = ({split: task.resolve_path(src.path or ".") / f for split, f in src.splits.items()} if src.splits
             else {"train": task.resolve_path(src.path)})
    keys = src.columns or ["images", "labels"]
    out = {}
    for split, file in files.items():
        data = np.load(file, allow_pickle=False)
        missing = [k for k in keys if k not in data]
        if missing:
            raise TaskError(f"task {task.name!r}: arrays {missing} not in {file} (has {list(data)})")
        out[split] = ArrayDataset(_images(task, data[keys[0]]), label_indices(task, data[keys[1]].tolist()))
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _image_files(task: Task, folder: Path) -> ImageFileDataset:
    """``folder/<class>/<image files>``: a class folder is named by a label of the task or its 0-based
    index; files of other types are skipped, a folder that is no class is an error. Files are listed
    in one fixed shuffled order (the same on every machine and run), so the first examples of a split
    (``eval.max_examples``, ``--max-examples``) span its classes instead of being one class's files."""
    if not folder.is_dir():
        raise TaskError(f"task {task.name!r}: {folder} is not a folder (loader imagefolder: <folder>/<class>/<images>)")
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels, folder_of = [], [], {}
    for d in classes:
        try:
            label = int(label_indices(task, [d.name])[0])
        except TaskError:
            hint = (" (a folder of splits? name them: task.source.splits={train: train, test: "
                    f"{d.name}}})" if d.name.lower() in ("train", "val", "valid", "validation", "test") else "")
            raise TaskError(f"task {task.name!r}: folder {d} is not a class: class folders are named by the "
                            f"labels {task.labels} or their indices 0..{task.num_classes - 1}{hint}") from None
        if not 0 <= label < task.num_classes:
            raise TaskError(f"task {task.name!r}: folder {d}: label {label} outside 0..{task.num_classes - 1}")
        if label in folder_of:
            raise TaskError(f"task {task.name!r}: folders {folder_of[label].name!r} and {d.name!r} in {folder} "
                            f"are both class {label} ({task.labels[label]!r}): keep one")
        folder_of[label] = d
        found = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(d).parts))  # .ipynb_checkpoints
        if not found:
            log.warning("task %s: class folder %s holds no image files", task.name, d)
        files += found
        labels += [label] * len(found)
    if not files:
        raise TaskError(f"task {task.name!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in class folders of {folder}")
    _check_image_headers(files)
    order = np.random.default_rng(0).permutation(len(files))
    ds = ImageFileDataset([files[i] for i in order], np.asarray(labels)[order], task.image_shape)
    ds[0]  # an unreadable first file fails here, at load, with its path
    return ds


def _check_image_headers(files: Sequence[Path]) -> None:
    """Open every file's header (about 25 us each) so a file that is no image fails at load, before a
    run starts, not when an epoch or the evaluation reaches it."""
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    bad = []
    for f in tqdm(files, desc=f"checking image files in {files[0].parent.parent}", unit="file",
                  disable=len(files) < 20_000, leave=False):
        try:
            with Image.open(f):
                pass
        except (OSError, UnidentifiedImageError) as err:
            bad.append(f"{f} ({err})")
    if bad:
        raise TaskError(f"{len(bad)} file(s) are no readable image: {'; '.join(bad[:3])}"
                        + (f"; and {len(bad) - 3} more" if len(bad) > 3 else ""))


def load_imagefolder(task: Task) -> dict:
    """``path``: a folder of class folders (the train split; hold the others out with ``holdout``), or
    with ``splits`` a folder and split -> its folder of class folders. Images are decoded when read."""
    src = task.source
    if task.image_shape[0] not in (1, 3):
        raise TaskError(f"task {task.name!r}: image files are read as grey (1 channel) or RGB (3), "
                        f"image_shape says {task.image_shape[0]} channels")
    root = task.resolve_path(src.path or ".")
    folders = {split: root / f for split, f in src.splits.items()} if src.splits else {"train": root}
    return {split: _image_files(task, folder) for split, folder in folders.items()}


def load_sklearn(task: Task) -> dict:
    import sklearn.datasets

    fn = getattr(sklearn.datasets, task.source.path or "", None)
    if fn is None:
        raise TaskError(f"task {task.name!r}: sklearn.datasets has no {task.source.path!r}")
    bunch = fn()
    images = bunch.images / max(float(bunch.images.max()), 1.0)
    return {"train": ArrayDataset(_images(task, images.astype(np.float32)), bunch.target)}
