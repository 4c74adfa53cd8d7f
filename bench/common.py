"""Shared helpers for benchmarks: atomic JSON results, timing, environment."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """``bench/results/<name>.json`` written atomically, with the command and package versions."""
    from unirobust.report import atomic_write, environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(), **payload}
    path = RESULTS / f"{name}.json"
    atomic_write(path, json.dumps(payload, indent=2))
    return path


def evaluate_saved_weights(run_dir: Path, recipe=None) -> dict:
    """The evaluation (``evaluate``'s metrics) of a run folder's saved weights under ``recipe``'s eval
    settings (default: the run's own recipe); per-attack files go to ``run_dir``."""
    from unirobust.evaluate import evaluate
    from unirobust.runs import build_attacks, first_examples, load_run
    from unirobust.tasks import load_task
    from unirobust.train import make_accelerator

    own, adapter = load_run(run_dir)
    recipe = recipe or own
    task = recipe.resolved_task
    data = first_examples(load_task(task, seed=recipe.seed).split(recipe.eval.split), recipe.eval.max_examples)
    return evaluate(adapter, data, build_attacks(recipe.eval.attacks, task.threat), make_accelerator(recipe),
                    recipe.eval.batch_size, task.labels, threat=task.threat, check_examples=recipe.eval.check_examples,
                    out_dir=run_dir, desc=f"eval {Path(run_dir).name}")


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
