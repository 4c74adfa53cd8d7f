"""Transfer evaluation: attacks crafted on surrogate adapters, scored on target adapters.

:func:`transfer_matrix` crafts each attack once per surrogate and batch, and scores the point on
every target: rows = surrogates, columns = targets, cells = robust accuracy (correct on the clean
input *and* on the transferred point, the definition ``evaluate.py`` uses). A surrogate that is also
a target gives the white-box cell, so the diagonal of ``transfer_matrix(models, models, ...)`` is each
model's white-box robust accuracy. Ensemble targets also get per-member accuracy on the transferred
points, and :func:`member_matrix` gives an ensemble's member-to-member matrix (diagonal: each member's
white-box accuracy; off-diagonal: transfer between members, DVERGE's diversity figure).

How a point moves between models. Vision: the adversarial image itself. Text: the perturbation
``z_adv - embed_s(batch)`` is added to the target's own embedding of the same tokens and projected
onto the target's ball (models must tokenize identically; checked per batch). The projection
threat is the attack's own budget (eps, norm, relative).

Entry points: :func:`evaluate_extras` (a run's ``eval.transfer`` section, and per-member accuracy
for ensembles) and :func:`cmd_transfer` / :func:`add_transfer_parser` (``unirobust transfer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .attacks import split_word_attacks
from .models.base import ModelSpecError, batch_to, device_of, eval_mode, forked_rng
from .models.ensemble import EnsembleAdapter, check_one_text_layout, is_ensemble

log = logging.getLogger(__name__)


def _check_same_tokens(batches: dict[int, dict], names: dict[int, str]) -> None:
    ref_key = next(iter(batches))
    ref = batches[ref_key].get("input_ids")
    for key, b in batches.items():
        ids = b.get("input_ids")
        if (ref is None) != (ids is None) or (ids is not None and (ids.shape != ref.shape or not torch.equal(ids, ref))):
            raise ValueError(f"{names[key]!r} and {names[ref_key]!r} tokenize differently; a text perturbation "
                             "transfers only between models that share one tokenizer and max_length")


def _attack_seed(seed: int, surrogate: str, batch_start: int) -> int:
    """The seed of one surrogate's attack on one batch: its random starts do not depend on which other
    surrogates or targets share the matrix, nor on what ran before (loading models draws numbers)."""
    return zlib.crc32(f"{seed}:{surrogate}:{batch_start}".encode())


def transfer_matrix(surrogates: dict[str, Any], targets: dict[str, Any], dataset, attack, accelerator=None,
                    batch_size: int = 64, threat=None, desc: str = "transfer", seed: int = 0) -> dict:
    """Robust accuracy of every target on attacks crafted on every surrogate.

    ``surrogates`` / ``targets``: name -> adapter (an :class:`EnsembleAdapter` is one surrogate; CWA
    attacks it member by member). ``dataset``: items as a task split yields them. ``attack``: a
    callable ``attack(adapter, batch) -> z_adv`` whose ``eps`` / ``norm`` / ``relative`` (or ``threat``)
    bound the transferred point. With an ``accelerator`` the examples are split across processes and
    the counts summed. Returns ``{"n", "clean", "matrix", "member_accuracy", "white_box", "seconds"}``.
    A cell counts the examples the target classifies correctly both clean and under the transferred
    attack; ``member_accuracy`` counts the same per member of an ensemble target. Each surrogate's
    attack on each batch draws its random numbers from its own ``seed``-derived stream, so a cell is
    the same whatever else is in the matrix.
    """
    threat = threat or attack
    adapters = {**{id(a): a for a in surrogates.values()}, **{id(a): a for a in targets.values()}}
    names = {id(a): n for n, a in {**surrogates, **targets}.items()}
    with contextlib.ExitStack() as modes:  # every model in eval mode; each mode restored, also on error
        for a in adapters.values():
            modes.enter_context(eval_mode(a))
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        indices = list(range(len(dataset)))[rank::world]
        clean = {t: 0.0 for t in targets}
        cells = {s: {t: 0.0 for t in targets} for s in surrogates}
        members = {s: {t: [0.0] * len(a) for t, a in targets.items() if isinstance(a, EnsembleAdapter)} for s in surrogates}
        start, n = time.time(), 0
        show = accelerator is None or accelerator.is_local_main_process
        for lo in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not show, dynamic_ncols=True):
            examples = [dataset[i] for i in indices[lo:lo + batch_size]]
            batches = {key: batch_to(a.collate(examples), device_of(a)) for key, a in adapters.items()}
            _check_same_tokens(batches, names)
            with torch.no_grad():
                z0 = {key: adapters[key].embed(b) for key, b in batches.items()}
                correct = {t: adapters[id(a)].logits(z0[id(a)], batches[id(a)]).argmax(-1) == batches[id(a)]["labels"]
                           for t, a in targets.items()}
                member_correct = {t: [a.member_logit(i, z0[id(a)], batches[id(a)]).argmax(-1) == batches[id(a)]["labels"]
                                      for i in range(len(a))] for t, a in targets.items() if isinstance(a, EnsembleAdapter)}
            for t in targets:
                clean[t] += float(correct[t].sum())
            for s, sa in surrogates.items():
                sb = batches[id(sa)]
                with forked_rng(device_of(sa)):
                    torch.manual_seed(_attack_seed(seed, s, indices[lo]))
                    z_adv = attack(sa, sb).detach()
                delta = z_adv - z0[id(sa)]
                with torch.no_grad():
                    for t, ta in targets.items():
                        tb = batches[id(ta)]
                        if ta is sa:
                            z = z_adv
                        else:
                            base = z0[id(ta)]
                            z = ta.project(base + delta.to(base.device), base, tb, threat)
                        ok = correct[t] & (ta.logits(z, tb).argmax(-1) == tb["labels"])
                        cells[s][t] += float(ok.sum())
                        if t in members[s]:
                            for i in range(len(ta)):
                                hit = member_correct[t][i] & (ta.member_logit(i, z, tb).argmax(-1) == tb["labels"])
                                members[s][t][i] += float(hit.sum())
            n += len(examples)
    totals = {"n": n, "clean": clean, "cells": cells, "members": members}
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([totals])
        totals = _sum_parts(parts)
    n = max(totals["n"], 1)
    out = {
        "n": totals["n"],
        "surrogates": list(surrogates),
        "targets": list(targets),
        "clean": {t: v / n for t, v in totals["clean"].items()},
        "matrix": {s: {t: v / n for t, v in row.items()} for s, row in totals["cells"].items()},
        "member_accuracy": {s: {t: [v / n for v in accs] for t, accs in row.items()}
                            for s, row in totals["members"].items() if row},
        "seconds": time.time() - start,
    }
    out["white_box"] = {s: out["matrix"][s][t] for s, sa in surrogates.items() for t, ta in targets.items() if ta is sa}
    return out


def _sum_parts(parts: list[dict]) -> dict:
    total = parts[0]
    for p in parts[1:]:
        total["n"] += p["n"]
        for t in total["clean"]:
            total["clean"][t] += p["clean"][t]
        for s in total["cells"]:
            for t in total["cells"][s]:
                total["cells"][s][t] += p["cells"][s][t]
            for t in total["members"][s]:
                total["members"][s][t] = [a + b for a, b in zip(total["members"][s][t], p["members"][s][t])]
    return total


def member_adapters(ensemble: EnsembleAdapter, prefix: str = "member") -> dict[str, Any]:
    """``{"member0": adapter, ...}``: the members as standalone adapters."""
    return {f"{prefix}{i}": m for i, m in enumerate(ensemble.members)}


def member_matrix(ensemble: EnsembleAdapter, dataset, attack, accelerator=None, batch_size: int = 64,
                  threat=None, seed: int = 0) -> dict:
    """Member-to-member transfer inside an ensemble; the diagonal is each member's white-box accuracy."""
    members = member_adapters(ensemble)
    return transfer_matrix(members, members, dataset, attack, accelerator, batch_size, threat, desc="members",
                           seed=seed)


# ----------------------------------------------------------------------------- tables


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def transfer_table(result: dict, title: str = "") -> str:
    """Markdown: rows = surrogates, columns = targets (clean accuracy in the first row)."""
    targets = result["targets"]
    corner = title or "surrogate \\ target"
    lines = [f"| {corner} | " + " | ".join(targets) + " |",
             "|---" * (len(targets) + 1) + "|",
             "| (clean) | " + " | ".join(_pct(result["clean"][t]) for t in targets) + " |"]
    for s in result["surrogates"]:
        lines.append(f"| {s} | " + " | ".join(_pct(result["matrix"][s][t]) for t in targets) + " |")
    for s, row in result.get("member_accuracy", {}).items():
        for t, accs in row.items():  # the members' accuracies under their ensemble's column
            cells = [" / ".join(_pct(a) for a in accs) if other == t else "" for other in targets]
            lines.append(f"| {s} -> members of {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extras_markdown(ev: dict) -> str:
    """Markdown for a run report: the ``members`` and ``transfer`` sections :func:`evaluate_extras` added."""
    parts = []
    for title, res in ev.get("members", {}).items():
        parts += [f"## Ensemble members under {title}", "",
                  "Rows attack one member, columns score each member (robust accuracy %; diagonal = white box).", "",
                  transfer_table(res), ""]
    for title, res in ev.get("transfer", {}).items():
        parts += [f"## Transfer under {title}", "", transfer_table(res), ""]
    if ev.get("transfer_skipped"):
        parts += ["Surrogates skipped (not finished runs): " + ", ".join(ev["transfer_skipped"]), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- runs


def load_surrogate(spec, device=None, task=None):
    """A run folder, or ``runA+runB+...`` (or a list of folders): an ensemble (mean of logits) of run
    folders. With ``task`` (the one whose examples it will attack), each run must have been trained
    on its kind of examples and classes."""
    from .runs import check_same_outputs, load_run

    parts = [p for p in spec.split("+") if p] if isinstance(spec, str) else [str(p) for p in spec]
    loaded = [load_run(p) for p in parts]
    if task is not None:
        for part, (recipe, _) in zip(parts, loaded):
            check_same_outputs(recipe.resolved_task, task, Path(part))
    adapters = [adapter for _, adapter in loaded]
    adapter = adapters[0] if len(adapters) == 1 else EnsembleAdapter(adapters)
    return adapter.to(device) if device is not None else adapter


def check_transferable(models: dict[str, Any]) -> None:
    """Surrogates and targets of one transfer matrix read the same inputs: one modality and number of
    classes, and for text one tokenizer and input layout (a perturbation is per token position)."""
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        m = models[name]
        if (m.modality, m.num_classes) != (first.modality, first.num_classes):
            raise ModelSpecError(f"{name} is a {m.modality} model with {m.num_classes} classes, {names[0]} a "
                                 f"{first.modality} model with {first.num_classes}: attacks transfer only between "
                                 f"models of one task")
    if first.modality == "text":
        check_one_text_layout(list(models.values()), names, what="model")
        for name in names[1:]:  # each model collates on its own: one truncation, one token per position
            got, want = [(getattr(m, "max_length", None), getattr(m, "pad_multiple", None))
                         for m in (models[name], first)]
            if got != want:
                raise ModelSpecError(f"{name} reads at most {got[0]} tokens (padded to multiples of {got[1]}), "
                                     f"{names[0]} {want[0]} (of {want[1]}): a text perturbation is per token "
                                     f"position, so transfer needs one model.options.max_length")


def run_candidates(path: str, recipe) -> list[Path]:
    """Where a run folder named in a recipe may be, in order: under the recipe's ``output_dir`` when
    it is not the default and the name starts with ``runs/`` (the surrogate recipe was run with the
    same ``output_dir``); as given (from the current folder); under the project root (as task data
    paths are looked up)."""
    p = Path(path).expanduser()
    out = [p]
    if not p.is_absolute():
        if p.parts and p.parts[0] == "runs" and recipe.output_dir and Path(recipe.output_dir) != Path("runs"):
            out.insert(0, Path(recipe.output_dir, *p.parts[1:]))  # this recipe's own output_dir first
        base = getattr(recipe.resolved_task, "base_dir", None)
        if base:
            out.append(Path(base) / p)
    return list(dict.fromkeys(out))


def find_run(path: str, recipe) -> Path:
    """The first of :func:`run_candidates` holding a finished run (``model.safetensors``), else ``path``."""
    return next((c for c in run_candidates(path, recipe) if (c / "model.safetensors").exists()), Path(path))


def evaluate_extras(recipe, adapter, dataset, accelerator=None) -> dict:
    """What ``runs.execute`` adds to ``metrics["eval"]`` after the cascade: for an ensemble, the
    member-to-member matrix per attack (``members``); with ``eval.transfer.surrogates``, the transfer
    matrix from each surrogate run to this run per attack (``transfer``). Empty dict otherwise."""
    from .recipe import RecipeError
    from .runs import build_attacks

    cfg = recipe.eval.transfer
    task = recipe.resolved_task
    configs = (cfg.attacks if cfg and cfg.attacks else recipe.eval.attacks)
    if not configs:
        return {}
    # word-substitution attacks are another threat model (evaluate() reports them on their own)
    attacks, _ = split_word_attacks(build_attacks(configs, task.threat))
    if not attacks:
        return {}
    if cfg and cfg.max_examples and cfg.max_examples < len(dataset):
        dataset = dataset.select(range(cfg.max_examples))
    device = accelerator.device if accelerator is not None else device_of(adapter)
    out: dict[str, Any] = {}
    if is_ensemble(adapter) and (cfg is None or cfg.members):
        out["members"] = {title: member_matrix(adapter, dataset, attack, accelerator, recipe.eval.batch_size,
                                               seed=recipe.seed)
                          for title, attack in attacks.items()}
    found = {s: [find_run(p, recipe) for p in s.split("+") if p]
             for s in (cfg.surrogates if cfg else [])}  # name as written -> where its runs are
    missing = [s for s, where in found.items() if not all((p / "model.safetensors").exists() for p in where)]
    for s, where in found.items():
        if s not in missing and [str(p) for p in where] != [p for p in s.split("+") if p]:
            log.info("eval.transfer: surrogate %s is %s", s, " + ".join(str(p.resolve()) for p in where))
    for s in missing:  # training is done: report what can be measured instead of failing the run
        tried = ", ".join(str(c.resolve()) for p in s.split("+") if p for c in run_candidates(p, recipe))
        log.warning("eval.transfer: surrogate %s is not a finished run (looked in %s); skipped (train it first)",
                    s, tried)
    surrogates = {}
    for s in (cfg.surrogates if cfg else []):
        if s in missing:
            continue
        try:
            surrogate = load_surrogate(found[s], device, task)
            check_transferable({recipe.name: adapter, s: surrogate})
            surrogates[s] = surrogate
        except (RecipeError, ModelSpecError) as err:  # as above: the run's results stand
            log.warning("eval.transfer: surrogate %s skipped: %s", s, err)
            missing.append(s)
    if missing:
        out["transfer_skipped"] = missing
    if surrogates:
        out["transfer"] = {title: transfer_matrix(surrogates, {recipe.name: adapter}, dataset, attack, accelerator,
                                                  recipe.eval.batch_size, seed=recipe.seed)
                           for title, attack in attacks.items()}
    return out


# ----------------------------------------------------------------------------- command line


def add_transfer_parser(sub) -> None:
    """``unirobust transfer``: add the sub-command to the CLI's sub-parsers."""
    t = sub.add_parser("transfer", help="transfer matrix: attacks crafted on surrogate runs, scored on target runs",
                       description="Rows = surrogates, columns = targets, cells = robust accuracy. A surrogate "
                       "'runA+runB' is an ensemble of runs (CWA attacks it member by member). A run that is both "
                       "surrogate and target gives its white-box cell.")
    t.add_argument("--surrogates", nargs="+", required=True, metavar="RUN[+RUN...]")
    t.add_argument("--targets", nargs="+", required=True, metavar="RUN")
    t.add_argument("--attack", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="repeatable, e.g. mi-fgsm, cwa:steps=20, pgd:steps=20 (default: mi-fgsm)")
    t.add_argument("--members", action="store_true", help="also the member-to-member matrix of ensemble targets")
    t.add_argument("--split", choices=["validation", "test"])
    t.add_argument("--max-examples", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--output", help="write the results as JSON here")
    t.set_defaults(func=cmd_transfer)


def cmd_transfer(args) -> int:
    from .cli import parse_attack
    from .recipe import AttackConfig
    from .report import atomic_write
    from .runs import build_attacks, first_examples, load_run
    from .tasks import load_task
    from .train import make_accelerator

    from .recipe import RecipeError

    recipe, first = load_run(args.targets[0])
    task = recipe.resolved_task
    configs = [AttackConfig(**parse_attack(a)) for a in (args.attack or ["mi-fgsm"])]
    attacks, words = split_word_attacks(build_attacks(configs, task.threat))
    if words:
        raise RecipeError(f"unirobust transfer runs continuous attacks; {', '.join(words)} "
                          f"substitutes words (use unirobust attack)")
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    targets = {t: first.to(device) if i == 0 else load_surrogate(t, device, task)  # every target reads targets[0]'s data
               for i, t in enumerate(args.targets)}
    surrogates = {s: targets[s] if s in targets else load_surrogate(s, device, task) for s in args.surrogates}
    check_transferable({**targets, **surrogates})
    data = first_examples(load_task(task, seed=recipe.seed).split(args.split or recipe.eval.split),
                          args.max_examples or recipe.eval.max_examples)
    batch_size = args.batch_size or recipe.eval.batch_size
    results = {}
    for title, attack in attacks.items():
        res = transfer_matrix(surrogates, targets, data, attack, accelerator, batch_size, seed=recipe.seed)
        if args.members:
            res["members"] = {t: member_matrix(a, data, attack, accelerator, batch_size, seed=recipe.seed)
                              for t, a in targets.items() if isinstance(a, EnsembleAdapter)}
        results[title] = res
    if accelerator.is_main_process:
        for title, res in results.items():
            print(f"\n{title} ({res['n']} examples, robust accuracy %)\n\n{transfer_table(res)}")
            for t, mm in res.get("members", {}).items():
                print(f"\nmembers of {t}\n\n{transfer_table(mm)}")
        if args.output:
            atomic_write(Path(args.output), json.dumps(results, indent=2))
            print(f"\nresults: {args.output}")
    return 0
