"""Recipes: *what experiment* — task, model, defense, training, evaluation, seed.

A recipe is a YAML file validated by :class:`Recipe`. ``key.sub=value`` overrides (values parsed as
YAML, so ``0.1`` is a float and ``[a, b]`` a list) apply on top. A recipe may list ``variants``:
each is a partial recipe merged onto the base, giving one run per variant (e.g. ERM vs PGD-AT).
Every problem is reported at once, with its field path, as a :class:`RecipeError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .registry import MODELS, UnknownName
from .tasks import Task, TaskError, deep_merge, get_task


class RecipeError(ValueError):
    """An invalid recipe; the message lists every problem (the CLI prints it and exits with code 2)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskRef(BaseModel):
    """``name`` of a task (or a path to a task file); any other key overrides the task's own field."""

    model_config = ConfigDict(extra="allow")
    name: str


class ModelConfig(Strict):
    spec: str = Field(description="<source>:<name>, e.g. timm:resnet18 or hf:sentence-transformers/all-MiniLM-L6-v2")
    options: dict[str, Any] = {}


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
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
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
    checkpoint_every: int | None = Field(default=None, ge=1, description="save a resumable checkpoint every N steps")
    monitor_examples: int = Field(default=0, ge=0, description="held-out examples for per-epoch PGD robust accuracy (0 = off)")


class EvalConfig(Strict):
    split: Literal["validation", "test"] = "test"
    batch_size: int = Field(default=64, ge=1)
    max_examples: int | None = Field(default=None, ge=1)
    attacks: list[AttackConfig] = []


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._/-]+$")
    description: str = ""
    seed: int = 0
    task: TaskRef
    model: ModelConfig
    defense: DefenseConfig = DefenseConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs"

    _task: Task | None = None

    @model_validator(mode="after")
    def _resolve(self) -> "Recipe":
        """Check names and budgets against the task, without loading data or models."""
        overrides = self.task.model_dump(exclude={"name"})
        self._task = get_task(self.task.name, overrides)
        self._task.check_data()
        source = self.model.spec.partition(":")[0]
        if ":" in self.model.spec:
            MODELS.check(source)
        from .attacks import build_attack
        from .defenses import build_defense

        build_defense(self.defense.model_dump(exclude_none=True), self._task.threat)
        for a in self.eval.attacks:
            build_attack(a.params(), self._task.threat)
        return self

    @property
    def resolved_task(self) -> Task:
        return self._task

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} is not of the form key.sub=value")
    return key.split("."), yaml.safe_load(value) if value else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``a.b=value`` set (nested dicts are created as needed)."""
    out = deep_merge(raw, {})
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            node[part] = nxt = deep_merge(nxt, {}) if isinstance(nxt, dict) else {}
            node = nxt
        node[path[-1]] = value
    return out


def _describe(err: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        lines.append(f"  {prefix}{where}: {e['msg']}{got}")
    return lines


def validate(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            ctx = e.get("ctx", {}).get("error")
            if isinstance(ctx, (UnknownName, TaskError, ValidationError)):
                if isinstance(ctx, ValidationError):
                    lines += _describe(ctx, prefix="")
                else:
                    lines.append(f"  {ctx}")
        lines = lines or _describe(err)
        raise RecipeError(f"invalid {where}:\n" + "\n".join(dict.fromkeys(lines))) from None
    except (UnknownName, TaskError, TypeError) as err:
        raise RecipeError(f"invalid {where}:\n  {err}") from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe is a YAML mapping of fields")
    return raw


def load_recipes(path: str | Path, overrides: list[str] = ()) -> list[Recipe]:
    """All runs of a recipe file: the base alone, or one per variant (named ``<name>/<variant>``)."""
    raw = read_yaml(path)
    variants = raw.pop("variants", None) or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise RecipeError(f"{path}: variants must be a list of partial recipes, each with a name")
    recipes = []
    for v in variants:
        v = dict(v)
        vname = v.pop("name", None)
        if len(variants) > 1 and not vname:
            raise RecipeError(f"{path}: every variant needs a name")
        merged = apply_overrides(deep_merge(raw, v), list(overrides))
        if vname:
            merged["name"] = f"{merged.get('name', Path(path).stem)}/{vname}"
            merged.setdefault("description", "")
        where = f"recipe {path}" + (f" (variant {vname})" if vname else "")
        recipes.append(validate(merged, where))
    return recipes
