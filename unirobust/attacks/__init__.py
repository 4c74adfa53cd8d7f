"""Continuous attacks on a model adapter's input space; ``build_attack`` fills budgets from a task."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..registry import ATTACKS
from ..tasks import fraction

THREAT_KEYS = ("norm", "eps", "alpha", "steps", "relative")


def build_attack(spec: dict[str, Any], threat=None):
    """An attack from ``{name: pgd, eps: ..., ...}``; budget keys the spec leaves out come from
    ``threat`` (the task's default threat model) when the attack has them. A spec that names another
    norm than the task's must give its own ``eps`` (an Linf radius is no L2 radius); ``cw-l2``
    minimises L2 distance but is projected onto the task's ball, so it takes the task's norm."""
    spec = {k: fraction(v) if k in ("eps", "alpha") else v for k, v in spec.items()}  # eps: 8/255
    name = spec.pop("name")
    cls = ATTACKS.get(name)
    fields = _fields_of(cls)
    given = set(spec)
    unknown = sorted(given - fields) if fields else []
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(fields))}")
    other_norm = threat is not None and "norm" in spec and spec["norm"] != getattr(threat, "norm", None)
    if other_norm and "eps" in fields and "eps" not in spec:
        raise ValueError(f"{name} with norm={spec['norm']} on a task whose threat is {threat.norm} "
                         f"eps={threat.eps:g}: give eps for the {spec['norm']} ball (the task's eps is "
                         f"an {threat.norm} radius, not an {spec['norm']} one)")
    if threat is not None:
        for key in THREAT_KEYS:
            value = getattr(threat, key, None)
            if other_norm and key in ("eps", "alpha"):
                continue  # radius and step belong to the task's norm
            if key == "alpha" and ("steps" not in fields or given & {"eps", "steps"}
                                   or not getattr(cls, "takes_task_alpha", True)):
                continue  # the task's alpha is its PGD's step size: not for single-step attacks, another
                # budget, or an attack whose alpha means something else (CWA's outer step)
            if key in fields and key not in spec and value is not None:
                spec[key] = value
    return cls(**spec)


def _fields_of(cls) -> set[str]:
    """The parameters of an attack class, or of the class a preset function returns (``pwws``)."""
    if not dataclasses.is_dataclass(cls):
        try:
            cls = typing.get_type_hints(cls).get("return")
        except (TypeError, NameError):
            return set()
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def attack_parameters(attack) -> dict[str, Any]:
    """Every field of a built attack, defaults and the task's budget filled in: what a result was
    measured with (a recipe names only what it changes)."""
    if not dataclasses.is_dataclass(attack):
        return {"type": type(attack).__name__}
    params = {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)}
    if params.get("alpha", 0) is None and isinstance(getattr(type(attack), "step_size", None), property):
        params["alpha"] = attack.step_size  # the default step size, as used
    return params


def split_word_attacks(attacks: dict) -> tuple[dict, dict]:
    """``(continuous, word)``: title -> attack, split by threat model. Word substitutions
    (``kind == "word"``) search texts; the others perturb the continuous input."""
    word = {title: a for title, a in attacks.items() if getattr(a, "kind", None) == "word"}
    return {title: a for title, a in attacks.items() if title not in word}, word
