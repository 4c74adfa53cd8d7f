"""Run folders: ``runs/<name>/`` holds recipe.yaml (resolved), metrics.json, report.md, a plot,
model.safetensors, checkpoints/ and log.txt. Every write is atomic (temp file, then rename)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

PACKAGES = ("unirobust", "torch", "torchvision", "transformers", "timm", "accelerate", "datasets", "numpy",
            "safetensors", "scikit-learn", "pydantic", "textattack")


@contextmanager
def atomic_path(path: Path):
    """``with atomic_path(p) as tmp: <write tmp>``: a temp file beside ``p`` (same suffix) that becomes
    ``p`` when the block succeeds: flushed to disk, given the umask's usual mode (``mkstemp`` alone
    leaves 0600), then renamed, so readers see the old file or the new one, never a part. The temp
    file is removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """``data`` written to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def environment() -> dict:
    """Python, platform and package versions, and the command line: what reproducing a run needs."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "argv": sys.argv, **source_revision()}


def source_revision() -> dict:
    """``{"git_commit", "git_dirty"}`` of the unirobust source when it is a git checkout, else ``{}``."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5,
                                   check=True).stdout.strip()

        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        return {}


def save_weights(adapter, path: Path) -> None:
    """The adapter's weights as safetensors (shared / tied tensors handled), written atomically."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(adapter, tmp)


def load_weights(adapter, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(adapter, str(path), strict=True)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def cell(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def attacked(ev: dict) -> bool:
    """Whether a continuous attack ran (``eval.attacks`` had one); without one, ``robust_accuracy``
    equals clean accuracy, and reports show "—" for it rather than a robustness nobody measured."""
    return bool(ev.get("cascade"))


#: What "robust %" measures, under every table of runs.
ROBUST_MEANS = ("Robust accuracy: correct under every attack of the cascade, each searching the ball in brackets "
                "around the model's continuous input: pixels for images, token embeddings for text (`x unit "
                "norm`: the radius is that fraction of each unit's own norm, each token's embedding for text). "
                "For text this is not robustness to word substitutions, which the word-attack table measures.")


def budget(params: dict | None) -> str:
    """`` [Linf 0.1]`` / `` [L2 0.05 x unit norm]`` (a relative ball: per token embedding for text):
    the ball an attack searched, from its recorded parameters; empty when they are unknown."""
    if not params or params.get("eps") is None or not params.get("norm"):
        return ""
    norm = {"linf": "Linf", "l2": "L2"}.get(params["norm"], params["norm"])
    return f" [{norm} {params['eps']:g}{' x unit norm' if params.get('relative') else ''}]"


def flag(ev: dict) -> bool:
    """Whether a result is to be read with care: a one-class model, or gradient-masking warnings."""
    return bool(ev.get("prediction_warning") or ev.get("warnings"))


def cautions(results: dict[str, dict]) -> list[str]:
    """One markdown line per flagged result (``flag``), with why."""
    lines = []
    for name, ev in results.items():
        if ev.get("prediction_warning"):
            lines.append(f"- ⚠ {name}: {ev['prediction_warning']}.")
        if ev.get("warnings"):
            lines.append(f"- ⚠ {name}: {len(ev['warnings'])} gradient-masking warning(s): its robust accuracy may be "
                         f"overstated (see its report.md or eval.json); first: {ev['warnings'][0][:200]}")
    return lines


def metrics_table(rows: dict[str, dict], tasks: dict[str, str] | None = None) -> str:
    """Markdown table: one row per run, clean accuracy, each cascade stage, robust accuracy. With
    ``tasks`` (run -> task name; a study's summary) also each run's task and number of examples,
    and the accuracy under each word-substitution attack (on its own ``n`` examples)."""
    extra = ("task", "examples") if tasks else ()
    words = list(dict.fromkeys(k for m in rows.values() for k in m.get("word_attacks", {}))) if tasks else []
    head = ["run", *extra, "clean %", "robust %", "worst class robust %", "attacks (cascade)",
            *(f"{w} %" for w in words)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, m in rows.items():
        stages = "; ".join(f"{s['attack']}{budget(m.get('attacks', {}).get(s['attack']))}: {pct(s['robust_accuracy'])}"
                           for s in m.get("cascade", []))
        where = [tasks[name], str(m["n"])] if tasks else []
        word = [pct(m.get("word_attacks", {}).get(w, {}).get("accuracy_under_attack")) for w in words]
        robust = [pct(m["robust_accuracy"]), pct(m.get("worst_class_robust_accuracy"))] if attacked(m) else ["—", "—"]
        flagged = name + (" ⚠" if flag(m) else "")  # a one-class model, or gradient-masking warnings
        cells = [flagged, *where, pct(m["clean_accuracy"]), *robust, stages or "—", *word]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def word_attack_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per word attack (success rate, accuracy under attack, cost)."""
    lines = ["| attack | n | clean % | accuracy under attack % | success rate % | words perturbed % | "
             "queries / example | s / example (per process) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summaries.items():
        # errors (an empty text, a label the model lacks) are left out of the percentages
        n = f"{m['n']} ({m['n_error']} not attacked: errors)" if m.get("n_error") else str(m["n"])
        lines.append(f"| {name} | {n} | {pct(m['clean_accuracy'])} | {pct(m['accuracy_under_attack'])} | "
                     f"{pct(m['attack_success_rate'])} | {pct(m['mean_perturbed_fraction'])} | "
                     f"{cell(m['mean_queries'])} | {cell(m['seconds_per_example'])} |")
    return "\n".join(lines)


def write_report(run_dir: Path, name: str, metrics: dict) -> None:
    ev = metrics["eval"]
    checks = f" The gradient-masking checks took {ev['checks_seconds']:.1f} s more." if ev.get("checks_seconds") else ""
    lines = [f"# {name}", "", metrics_table({name: ev}), "", *([ROBUST_MEANS, ""] if attacked(ev) else []),
             f"Evaluated on {ev['n']} examples ({metrics.get('split', 'test')} split) in {ev['seconds']:.1f} s."
             + checks,
             ""]
    if ev.get("word_attacks"):
        lines += ["## Word-substitution attacks", "", word_attack_table(ev["word_attacks"]), "",
                  "Per-example results: `attacks/<name>/results.jsonl`.", ""]
    from .transfer_eval import extras_markdown

    extras = extras_markdown(ev)
    if extras:
        lines += [extras, ""]
    if ev.get("data_warning"):
        lines += [f"**Evaluation set:** {ev['data_warning']}.", ""]
    if ev.get("prediction_warning"):
        lines += [f"**⚠ Predictions:** {ev['prediction_warning']}.", ""]
    if "warnings" in ev:
        lines += ["## Gradient-masking checks", ""]
        lines += [f"- {w}" for w in ev["warnings"]] or ["No warnings (randomness, softmax outputs, zero gradients, "
                                                        "eps monotonicity, black box vs white box)."]
        lines += [""]
    elif ev.get("checks_off"):
        lines += ["## Gradient-masking checks", "", "Not run (`eval.check_examples: 0`).", ""]
    train = metrics.get("train")
    if train and train.get("history"):
        extra = [k for k in dict.fromkeys(k for h in train["history"] for k in h)
                 if k not in ("epoch", "step", "loss", "train_accuracy")]  # monitors and defense stats
        as_pct = {k for k in extra if k.endswith("accuracy")}  # fractions, shown in % like train accuracy
        header = ["epoch", "loss", "train accuracy %",
                  *(k.replace("_", " ") + " %" if k in as_pct else k.replace("_", " ") for k in extra)]
        lines += ["## Training", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join([str(h["epoch"]), f"{h['loss']:.4f}", pct(h["train_accuracy"]),
                                     *(pct(h.get(k)) if k in as_pct else cell(h.get(k)) for k in extra)]) + " |"
                  for h in train["history"]]
        lines += ["", "Train accuracy and loss are over the inputs the defense trains on (adversarial ones for "
                  "adversarial training), so they differ in meaning across defenses; monitor accuracies are on a "
                  "fixed held-out batch."]
        if train.get("catastrophic_overfitting"):
            lines += ["", "**Catastrophic overfitting detected** (held-out PGD accuracy collapsed; see log.txt)."]
        lines += ["", f"{train['steps']} steps in {train['seconds']:.1f} s.", ""]
    lines += ["## Per class", "", "| class | n | clean % | robust % |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['n']} | {pct(v['clean_accuracy'])} | {pct(v['robust_accuracy']) if attacked(ev) else '—'} |"
              for c, v in ev["per_class"].items()]
    if plot_per_class(run_dir / "per_class.png", name, ev):
        lines += ["", "![per-class accuracy](per_class.png)"]
    atomic_write(run_dir / "report.md", "\n".join(lines) + "\n")
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))


def plot_per_class(path: Path, title: str, ev: dict) -> bool:
    """Bar chart of clean and robust accuracy per class (PNG); False if matplotlib is missing."""
    return plot_clean_robust(path, title, {c: {**v, "cascade": ev.get("cascade")} for c, v in ev["per_class"].items()})


def plot_clean_robust(path: Path, title: str, bars: dict[str, dict]) -> bool:
    """Bar chart of ``clean_accuracy`` and ``robust_accuracy`` for each labelled entry of ``bars``
    (classes of a run, or the runs of a study; no robust bar where no attack ran); False if matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(bars)
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3))
    ax.bar([i - 0.2 for i in x], [bars[k]["clean_accuracy"] for k in labels], 0.4, label="clean")
    ax.bar([i + 0.2 for i in x], [bars[k]["robust_accuracy"] if attacked(bars[k]) else float("nan") for k in labels],
           0.4, label="robust")
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return True


def write_summary(root: Path, results: dict[str, dict], tasks: dict[str, str]) -> Path:
    """``root/summary.md`` for the variants of one recipe (a study): the metrics table, each run's
    task, and a clean-vs-robust bar chart of all runs (``summary.png``). Returns the summary path."""
    lines = [f"# {root.name}", "", metrics_table(results, tasks)]
    if any(attacked(ev) for ev in results.values()):
        lines += ["", ROBUST_MEANS]
    flagged = cautions(results)
    if flagged:
        lines += ["", *flagged]
    cascades = {tuple((s["attack"], json.dumps(ev.get("attacks", {}).get(s["attack"]), sort_keys=True, default=str))
                      for s in ev.get("cascade", [])) for ev in results.values() if attacked(ev)}  # budgets too
    if len(cascades) > 1:
        lines += ["", "Robust accuracy is each run's own cascade of attacks (the attacks column), which differ "
                      "between these runs: compare robust figures only between runs attacked alike."]
    short = {name: Path(task).stem if task.endswith((".yaml", ".yml")) else task for name, task in tasks.items()}
    bars = {f"{name.split('/', 1)[-1]} ({short[name]})" + (" ⚠" if flag(ev) else ""): ev
            for name, ev in results.items()}  # a task file: its stem; ⚠ as in the table (flag)
    if plot_clean_robust(root / "summary.png", f"{root.name}: clean vs robust accuracy", bars):
        lines += ["", "![clean and robust accuracy of every run](summary.png)"]
    atomic_write(root / "summary.md", "\n".join(lines) + "\n")
    return root / "summary.md"
