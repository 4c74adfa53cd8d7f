"""Clean and robust accuracy of each defense under one shared training budget, with training time.

    python bench/bench_quality.py --suite vision [--max-train 3000 --epochs 3 --eval 500]
    python bench/bench_quality.py --suite text --word-attacks deepwordbug:n=100 textfooler:n=100

Free-AT runs epochs / replays epochs, so every defense makes about the same number of updates.
Runs the recipes of the suite (recipes/defenses/<task>_<defense>.yaml) with the same overrides
(training set size, epochs, evaluation size) into bench/runs/, then tabulates clean accuracy, the
cascade (FGSM, then 20-step PGD), worst-class robust accuracy, training seconds and a flag for
catastrophic overfitting; ``--word-attacks`` adds word-substitution attacks (accuracy under
attack on their first n examples, reported beside the cascade). Writes bench/results/quality_<suite>.json and prints a markdown table.

    python bench/bench_quality.py --suite text --retime [--defenses ...]

re-measures only the training time of rows already in the results (e.g. after a run on a busy machine),
training each again with the row's own recipe and overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, evaluate_saved_weights, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "vision": ("animal_mnist", ["erm", "pgd_at", "trades", "mart", "fat", "fgsm_at", "free_at", "freelb", "iat"]),
    "text": ("sst2_minilm", ["erm", "pgd_at", "trades", "fat", "fgsm_at", "free_at", "freelb", "embedding_at",
                             "discrete_at"]),
}
WORD_ATTACKS = ("pwws", "textfooler", "deepwordbug", "bae", "bert-attack", "a2t", "word")
TEXT_BASELINES = {"erm": "recipes/sst2_minilm_embedding_at.yaml", "pgd_at": "recipes/sst2_minilm_embedding_at.yaml"}


def recipe_for(suite: str, defense: str) -> tuple[Path, list[str]]:
    prefix, _ = SUITES[suite]
    for path in (ROOT / "recipes" / "defenses" / f"{prefix}_{defense}.yaml", ROOT / "recipes" / f"{prefix}_{defense}.yaml"):
        if path.exists():
            return path, []
    if suite == "text" and defense in TEXT_BASELINES:
        extra = ["defense={name: erm}"] if defense == "erm" else []
        return ROOT / TEXT_BASELINES[defense], extra + [f"name={prefix}_{defense}"]
    raise FileNotFoundError(path)


def reevaluate(recipe, run_dir: Path) -> dict:
    """The run's saved metrics with ``eval`` redone on its saved weights under ``recipe``'s eval settings."""
    return {**json.loads((run_dir / "metrics.json").read_text()), "eval": evaluate_saved_weights(run_dir, recipe)}


def recipe_overrides(args, defense: str, out_dir: Path):
    """(recipe path, overrides, base recipe) of ``defense`` in ``args.suite`` under the shared budget."""
    from unirobust.defenses import build_defense
    from unirobust.recipe import load_recipes

    path, extra = recipe_for(args.suite, defense)
    base = load_recipes(path, extra)[0]
    replays = getattr(build_defense(base.defense.model_dump(exclude_none=True), base.resolved_task.threat),
                      "replays", 1)
    epochs = max(1, round(args.epochs / replays))  # Free-AT: same number of updates (Shafahi et al.)
    return path, [*extra, f"task.max_train={args.max_train}", f"train.epochs={epochs}",
                  f"eval.max_examples={args.eval}", f"output_dir={out_dir}", *args.set], base


def retime(args, command: str) -> None:
    """``--retime``: train each selected defense again with its row's recipe and overrides (output in
    bench/runs/<suite>_retime, eval reduced to one clean example) and replace the row's train_seconds."""
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    previous = RESULTS / f"quality_{args.suite}.json"
    if not previous.exists():
        raise SystemExit(f"--retime updates {previous}, which does not exist: run the suite first")
    results = json.loads(previous.read_text())
    out_dir = ROOT / "bench" / "runs" / f"{args.suite}_retime"
    for defense in args.defenses or list(results.get("rows", {})):
        row = results["rows"].get(defense)
        if row is None:
            print(f"{defense}: no row in {previous.name}, skipped")
            continue
        overrides = [o for o in row["overrides"] if not o.startswith(("output_dir=", "eval."))]
        recipe = load_recipes(ROOT / row["recipe"], [*overrides, f"output_dir={out_dir}", "eval.attacks=[]",
                                                      "eval.max_examples=1"])[0]
        seconds = execute(recipe)["train"]["seconds"]
        row.update(train_seconds=seconds, train_seconds_command=command)
        print(f"{defense}: {seconds:.0f} s train", flush=True)
    payload = {k: v for k, v in results.items() if k not in ("command", "environment")}
    print(f"results: {write_result(f'quality_{args.suite}', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="vision")
    p.add_argument("--defenses", nargs="*", help="subset of the suite's defenses (as `unirobust list defenses` "
                                                 "names them, e.g. pgd-at fgsm-at; default: all of the suite's)")
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval", type=int, default=500, help="evaluation examples")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every recipe")
    p.add_argument("--reuse", action="store_true",
                   help="re-evaluate finished runs in bench/runs/<suite> instead of training them again")
    p.add_argument("--retime", action="store_true",
                   help="only re-measure training time: train each defense of quality_<suite>.json again with "
                        "its row's recipe and overrides into bench/runs/<suite>_retime (eval: one clean example) "
                        "and replace the row's train_seconds (other figures stay those of the original run)")
    p.add_argument("--word-attacks", nargs="*", default=[], metavar="NAME[:k=v,...]",
                   help="text suite: word attacks evaluated for every defense (replacing the recipe's own)")
    args = p.parse_args()
    known = SUITES[args.suite][1]
    args.defenses = [d.replace("-", "_") for d in args.defenses or []]  # pgd-at (the defense's name) = pgd_at
    unknown = [d for d in args.defenses if d not in known]
    if unknown:
        p.error(f"unknown defense(s) {unknown} for suite {args.suite}; valid: {', '.join(known)}")

    from unirobust.recipe import load_recipes
    from unirobust.report import metrics_table
    from unirobust.runs import execute, run_dir_of

    command = " ".join([Path(sys.executable).name, *sys.argv])
    if args.retime:
        return retime(args, command)
    out_dir = ROOT / "bench" / "runs" / args.suite
    rows, table_rows = {}, {}
    for defense in args.defenses or SUITES[args.suite][1]:
        path, overrides, base = recipe_overrides(args, defense, out_dir)
        if args.word_attacks:
            from unirobust.cli import parse_attack

            continuous = [a.params() for a in base.eval.attacks if a.name not in WORD_ATTACKS]
            overrides.append("eval.attacks=" + json.dumps(continuous + [parse_attack(a) for a in args.word_attacks]))
        recipe = load_recipes(path, overrides)[0]
        start = time.time()
        run_dir = run_dir_of(recipe)
        if args.reuse and (run_dir / "model.safetensors").exists() and (run_dir / "metrics.json").exists():
            m = reevaluate(recipe, run_dir)
        else:
            m = execute(recipe)
        ev, tr = m["eval"], m.get("train", {})
        rows[defense] = {"recipe": str(path.relative_to(ROOT)), "overrides": overrides,
                         "clean_accuracy": ev["clean_accuracy"], "robust_accuracy": ev["robust_accuracy"],
                         "cascade": ev["cascade"], "worst_class_robust_accuracy": ev["worst_class_robust_accuracy"],
                         "train_seconds": tr.get("seconds"), "wall_seconds": time.time() - start,
                         "catastrophic_overfitting": tr.get("catastrophic_overfitting"),
                         "word_attacks": ev.get("word_attacks", {}), "command": command}
        table_rows[f"{defense} ({tr.get('seconds', 0):.0f} s train)"] = ev
        print(json.dumps({defense: rows[defense]}, default=str), flush=True)
    config = {"suite": args.suite, "max_train": args.max_train, "epochs": args.epochs, "eval_examples": args.eval,
              "set": args.set, "word_attacks": args.word_attacks}
    previous = RESULTS / f"quality_{args.suite}.json"
    if previous.exists():  # keep rows of defenses not re-run, when measured with the same settings
        old = json.loads(previous.read_text())
        if all(old.get(k, v) == v for k, v in config.items()):  # a key the old file lacks is not a mismatch
            rows = {**{d: r for d, r in old.get("rows", {}).items() if d not in rows}, **rows}
            config["notes"] = old.get("notes", [])
        else:  # other settings: these rows are not comparable with the old ones; keep those aside
            kept = previous.with_name(previous.stem + ".previous.json")
            previous.replace(kept)
            print(f"other settings than {previous.name}'s: its rows moved to {kept.name}", flush=True)
    commands = list(dict.fromkeys(r.get("command", "(not recorded)") for r in rows.values()))
    path = write_result(f"quality_{args.suite}", {**config, "commands": commands, "rows": rows})
    print("\n" + metrics_table(table_rows))
    words = {f"{d} / {a}": s for d, r in rows.items() for a, s in r["word_attacks"].items()}
    if words:
        from unirobust.report import word_attack_table

        print("\n" + word_attack_table(words))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
