"""Recipes: *what experiment* — task, model, defense, training, evaluation, seed.

A recipe is a YAML file validated by :class:`Recipe`. ``key.sub=value`` overrides (values parsed as
YAML, so ``0.1`` is a float and ``[a, b]`` a list) apply on top. A recipe may list ``variants``:
each is a partial recipe merged onto the base, giving one run per variant (e.g. ERM vs PGD-AT).
Every problem is reported at once, with its field path, as a :class:`RecipeError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .registry import MODELS, UnknownName
from .tasks import Task, TaskError, deep_merge, get_task, load_yaml


class RecipeError(ValueError):
    """An invalid recipe; the message lists every problem (the CLI prints it and exits with code 2)."""


class Problems(ValueError):
    """Several recipe problems, one formatted line each."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskRef(BaseModel):
    """``name`` of a task (or a path to a task file); any other key overrides the task's own field."""

    model_config = ConfigDict(extra="allow")
    name: str


class EnsembleMember(Strict):
    """One ensemble member: ``spec`` defaults to ``model.spec``; ``options`` merge over ``model.options``."""

    spec: str | None = None
    options: dict[str, Any] = {}
    seed: int | None = Field(default=None, description="pins this member's initialisation")


class EnsembleConfig(Strict):
    """``model.ensemble``: ``3`` (copies of the model), a list of members, or ``{members, combine}``."""

    members: int | list[EnsembleMember]
    combine: Literal["logits", "probs"] = "logits"

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        return {"members": value} if isinstance(value, (int, list)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_members(self) -> "EnsembleConfig":
        if isinstance(self.members, int) and self.members < 1:
            raise ValueError("an ensemble needs at least one member")
        if isinstance(self.members, list):
            if not self.members:
                raise ValueError("an ensemble needs at least one member")
            for m in self.members:
                source, sep, _ = (m.spec or "").partition(":")
                if m.spec and sep and source not in MODELS:
                    raise ValueError(f"member spec {m.spec!r}: unknown model source {source!r}; "
                                     f"valid: {', '.join(MODELS.names())}")
        return self


class ModelConfig(Strict):
    spec: str = Field(description="<source>:<name>, e.g. timm:resnet18 or hf:sentence-transformers/all-MiniLM-L6-v2")
    options: dict[str, Any] = {}
    ensemble: EnsembleConfig | None = Field(default=None, description="build an ensemble: member count or list")


class AttackConfig(BaseModel):
    """``name`` of an attack plus its parameters; budget keys left out come from the task's threat model."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude={"label"})

    def title(self) -> str:
        if self.label:
            return self.label
        extra = {k: v for k, v in self.params().items() if k != "name"}
        return self.name + ("(" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")" if extra else "")


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "erm"
    attack: AttackConfig | None = None


class TrainConfig(Strict):
    epochs: int = Field(default=1, ge=0)
    max_steps: int | None = Field(default=None, ge=1, description="train for exactly this many optimizer steps, "
                                  "in place of epochs (epochs continue past train.epochs if needed)")
    batch_size: int = Field(default=32, ge=1, description="global batch size (split across processes)")
    lr: float = Field(default=1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = Field(default=0, ge=0, description="processes that read and collate training batches "
                             "(decoding image files: loader imagefolder); 0 = in the training process")
    checkpoint_every: int | None = Field(default=None, ge=1, description="save a resumable checkpoint every N steps")
    monitor_examples: int = Field(default=0, ge=0, description="held-out examples for per-epoch PGD robust accuracy (0 = off)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class TransferConfig(Strict):
    """``eval.transfer``: attacks crafted on surrogate runs and scored on this run (see ``transfer_eval.py``)."""

    surrogates: list[str] = Field(default=[], description="run folders; 'runA+runB' is an ensemble of runs")
    attacks: list[AttackConfig] = Field(default=[], description="default: eval.attacks")
    members: bool = Field(default=True, description="ensembles: member-to-member matrix (diagonal = white-box)")
    max_examples: int | None = Field(default=None, ge=1, description="default: eval.max_examples")


class EvalConfig(Strict):
    split: Literal["validation", "test"] = "test"
    batch_size: int = Field(default=64, ge=1)
    max_examples: int | None = Field(default=None, ge=1)
    attacks: list[AttackConfig] = []
    check_examples: int = Field(default=32, ge=0, description="examples for gradient-masking checks (0 = off)")
    transfer: TransferConfig | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._/-]+$")
    description: str = ""
    seed: int = Field(default=0, ge=0, lt=2**32, description="numpy, torch and python RNGs (0 .. 2**32 - 1)")
    task: TaskRef
    model: ModelConfig
    defense: DefenseConfig = DefenseConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs"

    _task: Task | None = None

    @field_validator("name")
    @classmethod
    def _name_stays_inside_output_dir(cls, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"{name!r}: a run name is a folder inside output_dir (no leading / and no ..)")
        return name

    @model_validator(mode="after")
    def _resolve(self) -> "Recipe":
        """Check names and budgets against the task, without loading data or models; every problem
        is collected with its field path and raised together as one :class:`Problems`."""
        from pathlib import Path as _Path

        from .attacks import build_attack
        from .defenses import build_defense

        problems: list[str] = []

        def attempt(prefix: str, fn, *args):
            try:
                return fn(*args)
            except ValidationError as err:
                problems.extend(_describe(err, prefix))
            except (UnknownName, TaskError, ValueError, TypeError) as err:
                problems.append(f"  {prefix.rstrip('.') or '(recipe)'}: {err}")
            return None

        overrides = self.task.model_dump(exclude={"name"})
        self._task = attempt("task.", get_task, self.task.name, overrides)
        if self._task is not None:
            attempt("task.source.", self._task.check_data)
        source, sep, _ = self.model.spec.partition(":")
        if sep:
            attempt("model.spec.", MODELS.check, source)
        elif not _Path(self.model.spec).is_dir():
            problems.append(f"  model.spec: {self.model.spec!r} needs a source prefix "
                            f"({', '.join(n + ':<name>' for n in MODELS.names())}) or must be a local model folder")
        threat = self._task.threat if self._task is not None else None

        def fits_task(prefix: str, built) -> None:
            """Checks that need the built object and the task (a pixel budget is never relative)."""
            if getattr(built, "relative", False) and self._task.modality == "vision":
                problems.append(f"  {prefix}relative: relative budgets scale by token embedding norms; task "
                                f"{self._task.name!r} is vision")
            if hasattr(built, "check_task"):
                attempt(prefix, built.check_task, self._task)
            word = getattr(built, "attack", built) if prefix != "defense." or self.defense.attack is None else None
            if getattr(word, "wir", None) == "gradient" and self.model.options.get("head") == "prompt":
                problems.append(f"  {prefix}wir: gradient word importance needs a plain classifier head; with "
                                f"model.options.head: prompt use wir: delete or unk (e.g. a2t:wir=delete)")

        if threat is not None:
            if self.defense.attack is not None:
                fits_task("defense.attack.", attempt("defense.attack.", build_attack, self.defense.attack.params(), threat))
            if not any(p.startswith("  defense.attack") for p in problems):
                fits_task("defense.", attempt("defense.", build_defense, self.defense.model_dump(exclude_none=True), threat))
            for i, a in enumerate(self.eval.attacks):
                built = attempt(f"eval.attacks.{i}.", build_attack, a.params(), threat)
                fits_task(f"eval.attacks.{i}.", built)
                if getattr(built, "kind", None) == "word" and self._task.modality != "text":
                    problems.append(f"  eval.attacks.{i}: {a.name!r} substitutes words; task "
                                    f"{self._task.name!r} is {self._task.modality}")
            if self.defense.attack is not None and self._task.modality != "text":
                built = attempt("defense.attack.", build_attack, self.defense.attack.params(), threat)
                if getattr(built, "kind", None) == "word":
                    problems.append(f"  defense.attack: {self.defense.attack.name!r} substitutes words; task "
                                    f"{self._task.name!r} is {self._task.modality}")
            for i, a in enumerate(self.eval.transfer.attacks if self.eval.transfer else []):
                fits_task(f"eval.transfer.attacks.{i}.", attempt(f"eval.transfer.attacks.{i}.", build_attack, a.params(),
                                                                 threat))
        if problems:
            raise Problems(problems)
        return self

    @property
    def resolved_task(self) -> Task:
        return self._task

    def to_yaml(self) -> str:
        """The resolved recipe: every default filled in, and the task written out whole (threat model,
        data source, labels), so the run folder does not depend on task files or the directory."""
        dump = self.model_dump(mode="json")
        if self._task is not None:
            dump["task"] = self._task.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(dump, sort_keys=False)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} is not of the form key.sub=value")
    try:
        return key.split("."), load_yaml(value) if value else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                          f"quote the whole override for the shell, e.g. 'eval.attacks=[{{name: pgd}}]'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``a.b=value`` set; nested dicts are created as needed and a number
    indexes a list (``eval.attacks.0.eps=0.1``)."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {text!r}: {'.'.join(path[:depth]) or 'value'} has "
                                      f"{len(node)} items; {part!r} is not an index of it")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(path[:depth])} is not a mapping")
            if last:
                node[part] = value
            else:
                if not isinstance(node, list) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return out


def _describe_one(e: dict, prefix: str = "") -> list[str]:
    where = (prefix + ".".join(str(p) for p in e["loc"])).rstrip(".") or "(recipe)"
    got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
    msg = e["msg"].removeprefix("Value error, ")  # a validator's own sentence
    glued = [k for k, v in e["input"].items() if isinstance(k, str) and ":" in k and v is None] \
        if e["type"] == "missing" and isinstance(e["input"], dict) else []
    if glued:  # YAML reads {name:fgsm} as the key "name:fgsm"
        msg += f" (YAML read {glued[0]!r} as one key: put a space after the colon)"
    return [f"  {where}: {msg}{got}"]


def _describe(err: ValidationError, prefix: str = "") -> list[str]:
    return [line for e in err.errors() for line in _describe_one(e, prefix)]


def validate(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            ctx = e.get("ctx", {}).get("error")
            lines += ctx.lines if isinstance(ctx, Problems) else _describe_one(e)
        raise RecipeError(f"invalid {where}:\n" + "\n".join(dict.fromkeys(lines))) from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        raw = load_yaml(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe is a YAML mapping of fields")
    return raw


def model_source(spec: Any) -> str | None:
    """``timm`` / ``hf`` of a model spec (a bare folder is an HF model); None for no spec."""
    if not isinstance(spec, str):
        return None
    source, sep, _ = spec.partition(":")
    return source if sep else "hf"


def merge_variant(base: dict, variant: dict) -> dict:
    """A variant merged onto the base recipe (:func:`deep_merge`), except that a variant whose
    ``model.spec`` is of another source (``timm`` vs ``hf``) does not take the base's ``model.options``:
    they were written for the other kind of model (``max_length`` reaching timm, say), and would only
    fail when that variant's turn came, after the others had run."""
    merged = deep_merge(base, variant)
    b, v = base.get("model"), variant.get("model")
    other = isinstance(v, dict) and model_source(v.get("spec")) not in (None, model_source((b or {}).get("spec")))
    if isinstance(b, dict) and other:
        own = v.get("options")
        merged["model"] = {**merged["model"], "options": dict(own) if isinstance(own, dict) else {}}
    return merged


def load_recipes(path: str | Path, overrides: list[str] = ()) -> list[Recipe]:
    """All runs of a recipe file: the base alone, or one per variant (named ``<name>/<variant>``)."""
    raw = read_yaml(path)
    of_variants = [o for o in overrides if re.split(r"[.=\[]", o, maxsplit=1)[0].strip() == "variants"]
    raw = apply_overrides(raw, of_variants)  # variants=null: the base recipe alone
    overrides = [o for o in overrides if o not in of_variants]
    variants = raw.pop("variants", None) or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise RecipeError(f"{path}: variants must be a list of partial recipes, each with a name")
    names = [v.get("name") for v in variants]
    twice = sorted({str(n) for n in names if n is not None and names.count(n) > 1})
    if twice:
        raise RecipeError(f"{path}: variant name(s) {', '.join(twice)} used twice (each variant is a run folder)")
    recipes = []
    for v in variants:
        v = dict(v)
        vname = v.pop("name", None)
        if len(variants) > 1 and not vname:
            raise RecipeError(f"{path}: every variant needs a name")
        merged = apply_overrides(merge_variant(raw, v), list(overrides))
        if vname:
            merged["name"] = f"{merged.get('name', Path(path).stem)}/{vname}"
            merged.setdefault("description", "")
        where = f"recipe {path}" + (f" (variant {vname})" if vname else "")
        recipes.append(validate(merged, where))
    return recipes
