"""MLP-FT vs MVP vs MVP+Adv on SST-2 with MiniLM, under word substitutions and an AdvGLUE-style set (issue 4).

    python bench/bench_prompt.py [--epochs 2] [--n 200] [--advgen-n 400] [--advgen-attack deepwordbug]
        [--rows mlp,mvp,...] [--seeds 0,1,2] [--lr 2e-5] [--model hf:roberta-base]

Five recipes, same model (all-MiniLM-L6-v2, offline), data (the 4,000 bundled SST-2 training
sentences), optimiser and budget (``--epochs``):

- ``mlp``: ``recipes/prompt/sst2_minilm_mlp.yaml``, the standard randomly initialised head (MLP-FT);
- ``mvp``: ``recipes/prompt/sst2_minilm_mvp.yaml``, template + verbalizer read at the mask (MVP);
- ``mvp_multi``: ``recipes/prompt/sst2_minilm_mvp_multi.yaml``, MVP with two templates and three
  verbalizer words per class (scores averaged), checked against the MVP target on its own;
- ``mvp_sim``: ``recipes/prompt/sst2_minilm_mvp_sim.yaml``, MVP read as a sentence encoder is trained
  (``scorer: similarity``: cosine with the label sentence "It was great."), also checked on its own;
- ``mvp_adv``: ``recipes/prompt/sst2_minilm_mvp_adv.yaml``, MVP with embedding PGD-AT (MVP+Adv).

Each is trained once per seed into ``runs/bench_prompt_<row>/`` (seed 0) or
``runs/bench_prompt_<row>_seed<s>/`` (reused when it exists, whatever its epochs: the table says how
many each row had); the seed sets the head's initialisation and the data order. Per row: clean
accuracy on the 872 GLUE dev sentences (and the recipe's embedding-PGD robust accuracy), accuracy
under ``pwws`` and ``textfooler`` (unirobust's offline recipes) on the same first ``--n`` dev
sentences, and accuracy on an AdvGLUE-style set. That set is built once with ``unirobust``'s
``advgen`` from held-out SST-2 training sentences (``../shared/data/sst2/heldout.tsv``, disjoint from
the training sample; rows of at least 10 words) with a *different* attack (``--advgen-attack``,
default DeepWordBug) against a separate surrogate, the ERM victim of the word-attack benchmark
(``recipes/bench/sst2_minilm_victim.yaml``, trained if missing), filtered as AdvGLUE was (prediction
flipped, <= 15% of words changed, sentence similarity >= 0.85). So every row faces transferred
examples, as models evaluated on AdvGLUE do.

Target (issue 4): MVP at least 5 points more robust than MLP-FT (mean of the word-attack and
AdvGLUE-style accuracies) at no more than 1.5 points clean loss; MVP+Adv above MLP-FT and MVP. With
several seeds, the targets compare each row's mean over the seeds both rows have (one seed moves a
row's robust accuracy by a few points: 200 attacked sentences, 98 AdvGLUE-style ones).
``--lr`` trains every row at another learning rate than the recipes' (runs ``..._lr<lr>``); the
table has one group per learning rate and the targets compare rows of the same learning rate.
``--model`` trains every row on another model than the offline MiniLM (runs ``..._<model>``), e.g.
``hf:roberta-base`` or ``hf:bert-base-uncased``, masked LMs as in the MVP paper (their MLM head scores
the verbalizer); it needs hub access or a local copy (``hf:/path/to/folder``). Rows are grouped and
compared per model as per learning rate.
Results: ``bench/results/prompt.json``; word-attack records stay in each run folder's ``attacks/``
(resumable).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, evaluate_saved_weights, write_result  # noqa: E402

from unirobust.compat import ensure_torchvision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = {"mlp": "MLP-FT", "mvp": "MVP", "mvp_multi": "MVP (2 templates, 3 words)",
        "mvp_sim": "MVP (similarity scorer)", "mvp_adv": "MVP+Adv"}
#: rows that are MVP variants, each checked against the MVP target on its own
MVP_ROWS = ("mvp", "mvp_multi", "mvp_sim")
WORD_ATTACKS = ("pwws", "textfooler")
HELDOUT = REPO.parent / "shared" / "data" / "sst2" / "heldout.tsv"


def ensure_run(recipe: Path, name: str, overrides: list[str]) -> Path:
    """``runs/<name>`` trained from ``recipe`` with ``overrides`` (reused if finished; a run whose
    training finished but whose evaluation did not is evaluated, not retrained)."""
    run = REPO / "runs" / name
    if (run / "model.safetensors").exists() and (run / "recipe.yaml").exists() and not (run / "metrics.json").exists():
        evaluate_saved(run)
    if not ((run / "model.safetensors").exists() and (run / "metrics.json").exists()):
        cmd = [sys.executable, "-m", "unirobust.cli", "run", str(recipe), f"name={name}", *overrides]
        print("training:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    return run


def evaluate_saved(run: Path) -> None:
    """Write ``metrics.json`` of a run whose weights are saved but whose evaluation never finished:
    the recipe's evaluation on the saved weights; training seconds unknown (null)."""
    from unirobust.report import atomic_write

    print(f"evaluating the saved weights of {run.name} (its evaluation did not finish)", flush=True)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    atomic_write(run / "metrics.json", json.dumps({"name": recipe["name"], "seed": recipe["seed"],
                                                   "eval": evaluate_saved_weights(run),
                                                   "train": {"seconds": None}}, indent=2))


def heldout_examples(n: int, min_words: int = 10) -> list[dict]:
    """The first ``n`` held-out SST-2 rows with at least ``min_words`` words (sentences, not phrases)."""
    if not HELDOUT.exists():
        raise SystemExit(f"{HELDOUT} not found: the AdvGLUE-style set is built from it (see ../shared/data/README.md)")
    out = []
    with HELDOUT.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            text = row["sentence"].strip()
            if len(text.split()) >= min_words:
                out.append({"sentence": text, "label": int(row["label"])})
            if len(out) == n:
                break
    return out


def build_advglue_set(surrogate: Path, attack_name: str, n: int) -> tuple[Path, dict]:
    """The AdvGLUE-style file (built once; delete ``runs/bench_prompt_advglue`` to rebuild)."""
    from unirobust.advgen import advgen
    from unirobust.attacks import build_attack
    from unirobust.runs import load_run

    folder = REPO / "runs" / "bench_prompt_advglue"
    path = folder / f"advglue_sst2_{attack_name}.json"
    counts_path = folder / f"counts_{attack_name}.json"
    if path.exists() and counts_path.exists():
        return path, json.loads(counts_path.read_text())
    recipe, adapter = load_run(surrogate)
    adapter.eval()
    counts = advgen(adapter, heldout_examples(n), build_attack({"name": attack_name}), path,
                    folder / f"attack_{attack_name}", label_names=list(recipe.resolved_task.labels),
                    attack_name=attack_name)
    counts_path.write_text(json.dumps(counts, indent=2))
    return path, counts


def word_attack(run: Path, adapter, examples: list[dict], name: str) -> dict:
    from unirobust.attacks import build_attack
    from unirobust.attacks.text.attack import run_word_attack

    began = time.perf_counter()
    summary = run_word_attack(adapter, examples, build_attack({"name": name}), run / "attacks" / f"bench_{name}")
    return {**summary, "wall_seconds": time.perf_counter() - began}


def run_name(row: str, seed: int, lr: float | None = None, model: str | None = None) -> str:
    """``bench_prompt_<row>[_<model>][_lr<lr>][_seed<s>]``: the recipes' model and learning rate and
    seed 0 add nothing."""
    return (f"bench_prompt_{row}" + ("" if model is None else f"_{model_slug(model)}")
            + ("" if lr is None else f"_lr{lr:g}") + ("" if seed == 0 else f"_seed{seed}"))


def model_slug(spec: str) -> str:
    """``hf:FacebookAI/roberta-base`` -> ``FacebookAI-roberta-base`` (a folder-name-safe model name)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec.split(":", 1)[-1]).strip("-.") or "model"


def model_label(spec: str) -> str:
    """``hf:sentence-transformers/all-MiniLM-L6-v2`` -> ``all-MiniLM-L6-v2`` (the table's model column)."""
    return spec.split(":", 1)[-1].rstrip("/").split("/")[-1]


def recipe_model() -> str:
    """The model spec the prompt recipes train (all rows share it)."""
    return yaml.safe_load((REPO / "recipes" / "prompt" / "sst2_minilm_mvp.yaml").read_text())["model"]["spec"]


def recipe_lr() -> float:
    """The learning rate the prompt recipes train with (all rows share it)."""
    return float(yaml.safe_load((REPO / "recipes" / "prompt" / "sst2_minilm_mvp.yaml").read_text())["train"]["lr"])


def measure_row(row: str, seed: int, run: Path, dev_examples: list[dict], advglue_path: Path) -> dict:
    from unirobust.advglue import evaluate_advglue
    from unirobust.runs import load_run

    metrics = json.loads((run / "metrics.json").read_text())
    recipe, adapter = load_run(run)
    adapter.eval()
    out = {"row": row, "seed": seed, "method": ROWS[row], "run": str(run.relative_to(REPO)),
           "clean_accuracy": metrics["eval"]["clean_accuracy"], "n_dev": metrics["eval"].get("n"),
           "pgd_accuracy": metrics["eval"].get("robust_accuracy"),
           "train_seconds": metrics.get("train", {}).get("seconds"), "epochs": recipe.train.epochs,
           "lr": recipe.train.lr, "model": recipe.model.spec,
           "train_steps": metrics.get("train", {}).get("steps")}
    for name in WORD_ATTACKS:
        s = word_attack(run, adapter, dev_examples, name)
        out[name] = {k: s.get(k) for k in ("accuracy_under_attack", "attack_success_rate", "clean_accuracy",
                                            "mean_perturbed_fraction", "mean_queries", "wall_seconds", "n")}
    adv = evaluate_advglue(adapter, advglue_path)
    items = json.loads(advglue_path.read_text())["sst2"]
    originals = adapter.predict([it["original"] for it in items]).tolist() if items else []
    out["advglue"] = {"accuracy": adv["tasks"]["sst2"]["accuracy"], "n": adv["tasks"]["sst2"]["n"],
                      "original_accuracy": sum(p == it["label"] for p, it in zip(originals, items)) / len(items)
                      if items else None}
    robust = [out[a]["accuracy_under_attack"] for a in WORD_ATTACKS] + [out["advglue"]["accuracy"]]
    out["mean_robust_accuracy"] = sum(robust) / len(robust)
    return out


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict], n: int, n_adv: int) -> str:
    """Markdown table: one line per (row, seed), then each row's mean over its seeds if it has several."""
    lines = [f"| method | model | lr | seed | clean (872 dev) | embedding PGD | pwws (n={n}) | textfooler (n={n}) | "
             f"AdvGLUE-style (n={n_adv}) | mean robust | epochs | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {model_label(r['model'])} | {r['lr']:g} | {r.get('seed', 0)} | {pct(r['clean_accuracy'])} | {pct(r['pgd_accuracy'])} | "
                     f"{pct(r['pwws']['accuracy_under_attack'])} | {pct(r['textfooler']['accuracy_under_attack'])} | "
                     f"{pct(r['advglue']['accuracy'])} | {pct(r['mean_robust_accuracy'])} | {r['epochs']} | "
                     f"{'—' if r['train_seconds'] is None else format(r['train_seconds'], '.0f')} |")
    for row, model, lr in dict.fromkeys((r["row"], r["model"], r["lr"]) for r in rows):
        group = [r for r in rows if r["row"] == row and r["model"] == model and r["lr"] == lr]
        if len(group) > 1:
            def mean(f):  # None when a seed lacks the figure (e.g. no PGD in its evaluation)
                values = [f(r) for r in group]
                return None if None in values else sum(values) / len(values)

            lines.append(f"| **{group[0]['method']}, mean** | {model_label(model)} | {lr:g} | {len(group)} seeds | {pct(mean(lambda r: r['clean_accuracy']))} | "
                         f"{pct(mean(lambda r: r['pgd_accuracy']))} | "
                         f"{pct(mean(lambda r: r['pwws']['accuracy_under_attack']))} | "
                         f"{pct(mean(lambda r: r['textfooler']['accuracy_under_attack']))} | "
                         f"{pct(mean(lambda r: r['advglue']['accuracy']))} | "
                         f"**{pct(mean(lambda r: r['mean_robust_accuracy']))}** | | |")
    return "\n".join(lines)


def seed_means(results: list[dict], row: str, seeds: set[int]) -> dict | None:
    """Mean clean and mean robust accuracy of ``row`` over ``seeds`` (None if a seed is missing)."""
    picked = [r for r in results if r["row"] == row and r.get("seed", 0) in seeds]
    if not seeds or len(picked) != len(seeds):
        return None
    return {k: sum(r[k] for r in picked) / len(picked) for k in ("clean_accuracy", "mean_robust_accuracy")}


def seeds_of(results: list[dict], row: str) -> set[int]:
    return {r.get("seed", 0) for r in results if r["row"] == row}


def targets(results: list[dict]) -> dict:
    """:func:`targets_at` per model and learning rate; keys of the recipes' own model and learning
    rate unprefixed, the others' prefixed with ``<model>_`` and ``lr<lr>_``."""
    out = {}
    lr0, model0 = recipe_lr(), recipe_model()
    groups = sorted({(r["model"], r["lr"]) for r in results}, key=lambda g: (g[0] != model0, g[0], g[1] != lr0, g[1]))
    for model, lr in groups:
        prefix = ("" if model == model0 else f"{model_slug(model)}_") + ("" if lr == lr0 else f"lr{lr:g}_")
        picked = [r for r in results if r["model"] == model and r["lr"] == lr]
        out.update({prefix + k: v for k, v in targets_at(picked).items()})
    return out


def targets_at(results: list[dict]) -> dict:
    """Per MVP variant: robust gain over MLP-FT and clean loss (target: >= 5 points at <= 1.5 points),
    on the means over the seeds both rows have; MVP+Adv above MLP-FT and every MVP variant."""
    out = {}
    for row in MVP_ROWS:
        common = seeds_of(results, "mlp") & seeds_of(results, row)
        mlp, mvp = seed_means(results, "mlp", common), seed_means(results, row, common)
        if mlp and mvp:
            gain = mvp["mean_robust_accuracy"] - mlp["mean_robust_accuracy"]
            loss = mlp["clean_accuracy"] - mvp["clean_accuracy"]
            out[f"{row}_seeds"] = sorted(common)
            out[f"{row}_robust_gain_points"] = 100 * gain
            out[f"{row}_clean_loss_points"] = 100 * loss
            out[f"{row}_target_met"] = gain >= 0.05 and loss <= 0.015
    common = seeds_of(results, "mvp_adv") & seeds_of(results, "mlp")
    variants = [m for m in (seed_means(results, r, common) for r in MVP_ROWS) if m]
    adv, mlp = seed_means(results, "mvp_adv", common), seed_means(results, "mlp", common)
    if adv and mlp and variants:
        out["mvp_adv_seeds"] = sorted(common)
        out["mvp_adv_above_both"] = adv["mean_robust_accuracy"] > max(r["mean_robust_accuracy"] for r in [mlp, *variants])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every row (same budget)")
    p.add_argument("--n", type=int, default=200, help="GLUE dev sentences attacked with pwws and textfooler")
    p.add_argument("--advgen-n", type=int, default=400, help="held-out sentences the AdvGLUE-style set is built from")
    p.add_argument("--advgen-attack", default="deepwordbug", help="attack that builds the AdvGLUE-style set")
    p.add_argument("--surrogate", default=str(REPO / "runs" / "sst2_minilm_victim"),
                   help="run the AdvGLUE-style set is generated against (trained from recipes/bench if missing)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds of every row (0: runs/bench_prompt_<row>)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every row instead of the recipes' (runs bench_prompt_<row>_lr<lr>...)")
    p.add_argument("--model", default=None,
                   help="model spec of every row instead of the recipes' MiniLM, e.g. hf:roberta-base "
                        "(needs the hub or a local copy, hf:/path; runs bench_prompt_<row>_<model>...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    ensure_torchvision()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(rows) - set(ROWS):
        p.error(f"unknown rows {sorted(set(rows) - set(ROWS))}; valid: {', '.join(ROWS)}")
    if args.advgen_attack in WORD_ATTACKS:
        p.error(f"--advgen-attack must differ from the evaluated attacks ({', '.join(WORD_ATTACKS)})")

    seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be positive")
    lr = [] if args.lr is None else [f"train.lr={args.lr}"]
    model = [] if args.model is None else [f"model.spec={args.model}"]
    runs = {(r, s): ensure_run(REPO / "recipes" / "prompt" / f"sst2_minilm_{r}.yaml", run_name(r, s, args.lr, args.model),
                               [f"train.epochs={args.epochs}", f"seed={s}", *lr, *model]) for r in rows for s in seeds}
    surrogate = Path(args.surrogate)
    if not (surrogate / "model.safetensors").exists():
        surrogate = ensure_run(REPO / "recipes" / "bench" / "sst2_minilm_victim.yaml", surrogate.name, [])
    advglue_path, counts = build_advglue_set(surrogate, args.advgen_attack, args.advgen_n)
    print(f"AdvGLUE-style set: {counts['kept']} of {counts['examples']} held-out sentences kept "
          f"({counts['successful']} successful {args.advgen_attack} attacks on {surrogate.name}) -> {advglue_path}")

    from unirobust.runs import load_run
    from unirobust.tasks import load_task

    recipe, _ = load_run(next(iter(runs.values())))
    dev = load_task(recipe.resolved_task, seed=recipe.seed).test
    dev_examples = [{"sentence": dev[i]["sentence"], "label": int(dev[i]["label"])} for i in range(min(args.n, len(dev)))]
    results = [measure_row(r, s, run, dev_examples, advglue_path) for (r, s), run in runs.items()]
    previous = RESULTS / "prompt.json"
    if previous.exists():  # keep rows not re-run, measured on the same sentences and AdvGLUE-style set
        old = json.loads(previous.read_text())
        if (old.get("config", {}).get("n_dev_attacked") == len(dev_examples)
                and old.get("advglue_set", {}).get("path") == str(advglue_path.relative_to(REPO))):
            measured = {r["run"] for r in results}
            kept = [r for r in old.get("results", []) if r["run"] not in measured]
            for r in kept:  # rows written before a field existed: read it from their recipe
                if not {"epochs", "lr", "model"} <= r.keys():
                    written = yaml.safe_load((REPO / r["run"] / "recipe.yaml").read_text())
                    r.setdefault("epochs", written["train"]["epochs"])
                    r.setdefault("lr", written["train"]["lr"])
                    r.setdefault("model", written["model"]["spec"])
            results = kept + results
    lr0, model0 = recipe_lr(), recipe_model()
    results.sort(key=lambda r: (r["model"] != model0, r["model"], r["lr"] != lr0, r["lr"], list(ROWS).index(r["row"]),
                                r.get("seed", 0)))
    print()
    print(table(results, len(dev_examples), counts["kept"]))
    verdict = targets(results)
    print("\n" + json.dumps(verdict, indent=1))
    path = write_result("prompt", {"config": {**vars(args), "n_dev_attacked": len(dev_examples)},
                                   "advglue_set": {"path": str(advglue_path.relative_to(REPO)), **{
                                       k: v for k, v in counts.items() if k != "attack_summary"}},
                                   "results": results, "targets": verdict})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
