"""One run, end to end: recipe -> task data + adapter + defense -> fit -> evaluate -> run folder."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .attacks import build_attack
from .evaluate import evaluate, numbered
from .models import build_model
from .recipe import AttackConfig, Recipe, RecipeError, read_yaml, validate
from .report import atomic_write, attacked, environment, load_weights, save_weights, write_report
from .tasks import Task, get_task, labels_of, load_task

log = logging.getLogger("unirobust")


#: what a finished run leaves in its folder (removed when the folder is trained again from the start)
RESULTS = ("model.safetensors", "metrics.json", "report.md", "per_class.png", "eval.json")


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


class LogToFile:
    """Copies the ``unirobust`` log into ``path`` while the block runs (appending: a resumed run's log
    continues), and the error that ended the block, if one did."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def __enter__(self):
        self.logger = logging.getLogger("unirobust")
        self.level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)  # the run log keeps INFO even when the console does not
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, Exception):  # why the run stopped, in its log (the console
            self.handler.handle(logging.LogRecord(  # has it already, from the command's own error)
                "unirobust", logging.ERROR, __file__, 0, "stopped: %s: %s", (exc_type.__name__, exc), None))
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.handler.close()


def first_examples(split, limit: int | None):
    """The first ``limit`` examples of an evaluation split (all of them when ``limit`` is None).
    Warns when they miss classes the split has (see :func:`coverage_warning`)."""
    if not limit or limit >= len(split):
        return split
    warning = coverage_warning(split, limit)
    if warning:
        log.warning(warning)
    return split.select(range(limit))


def coverage_warning(split, limit: int | None) -> str | None:
    """A sentence when the first ``limit`` examples miss classes the split has (a split sorted by
    class, as animal-mnist's is); results record it (``eval.data_warning``) and the report shows it."""
    if not limit or limit >= len(split):
        return None
    try:
        labels = labels_of(split)
        missing = set(labels.tolist()) - set(labels[:limit].tolist())
    except (KeyError, ValueError):  # a split without labels
        return None
    if not missing:
        return None
    counts = np.bincount(np.asarray(labels.tolist()) - min(labels.tolist()))
    n = len(labels)
    # classes a random order would leave out of the first `limit`, on average (hypergeometric)
    expected = sum(float(np.prod([(n - c - i) / (n - i) for i in range(limit)])) for c in counts if c)
    sorted_like = len(missing) >= max(1.0, 3 * expected)
    why = "is it sorted by class?" if sorted_like else "a sample this small can miss classes by chance"
    return (f"the first {limit} examples miss {len(missing)} of the split's classes ({why}); "
            f"task.max_eval={limit} takes a seeded stratified sample instead")


def build_attacks(configs: list[AttackConfig], threat) -> dict:
    """Title -> attack, in order (a title given twice is numbered, see :func:`evaluate.numbered`)."""
    return numbered((c.title(), build_attack(c.params(), threat)) for c in configs)


def execute(recipe: Recipe, resume: bool = False, train: bool = True, evaluate_after: bool = True) -> dict:
    """Train and evaluate one recipe into ``<output_dir>/<name>/``; returns its metrics."""
    from accelerate.utils import set_seed

    from .train import (check_batch_split, clear_checkpoints, fit, latest_checkpoint, make_accelerator, precision_used,
                        resumable_state)

    run_dir = run_dir_of(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(recipe, run_dir)
    set_seed(recipe.seed)
    task = recipe.resolved_task
    main = accelerator.is_main_process
    with LogToFile(run_dir / ("log.txt" if main else f"log.{accelerator.process_index}.txt")):
        log.info("run %s: task %s, model %s, defense %s, seed %d, %d process(es)", recipe.name, task.name,
                 recipe.model.spec, recipe.defense.name, recipe.seed, accelerator.num_processes)
        # everything that can refuse the recipe (a checkpoint of another recipe, the data, the model's
        # options) comes before the folder is touched: a failed start leaves the earlier run whole
        if train:
            check_batch_split(recipe, accelerator)
        ckpt = latest_checkpoint(run_dir) if train and resume else None
        if ckpt is not None:
            resumable_state(recipe, ckpt)
        trained = finished_training(recipe, run_dir) if train and resume and ckpt is None else None
        data = load_task(task, seed=recipe.seed)
        if trained is not None:  # --resume of a run trained to the end with this recipe, without checkpoints
            log.info("%s was trained to the end with this recipe (model.safetensors); --resume evaluates it again "
                     "(run without --resume to train it again)", run_dir)
            adapter = build_for_weights(recipe, task, run_dir / "model.safetensors")  # not its start checkpoint
            load_weights(adapter, run_dir / "model.safetensors")
        else:
            adapter = build_model(recipe.model.spec, task, ensemble=recipe.model.ensemble, **recipe.model.options)
        # a fresh start (--resume without a checkpoint or finished training too): an earlier run's results
        # and checkpoints must not pass for this one's
        if trained is None and train and ckpt is None:
            if main:
                for name in RESULTS:
                    (run_dir / name).unlink(missing_ok=True)
                for other in [*run_dir.glob("on-*"), run_dir / "attacks"]:  # other tasks, per-attack records
                    shutil.rmtree(other, ignore_errors=True)
            clear_checkpoints(accelerator, run_dir)  # also when nothing is trained (train.epochs=0)
        if main:
            atomic_write(run_dir / "recipe.yaml", recipe.to_yaml())
        metrics = {"name": recipe.name, "seed": recipe.seed, "split": recipe.eval.split,
                   "processes": accelerator.num_processes, "precision": precision_used(accelerator),
                   "environment": environment()}
        if train and recipe.train.monitor_examples and data.one_held_out:
            log.warning("task %s has one held-out split for validation and test: train.monitor_examples watches "
                        "the test set (name a validation split, or carve one: task.source.holdout.validation=0.1)",
                        task.name)
        if trained is not None:
            metrics["train"] = trained
        elif train and (recipe.train.epochs or recipe.train.max_steps):
            metrics["train"] = fit(recipe, adapter, data.train, accelerator, run_dir, resume=resume,
                                   monitor_set=data.validation)
        adapter = accelerator.unwrap_model(adapter).eval()  # trained: from here on it is evaluated
        if main:
            save_weights(adapter, run_dir / "model.safetensors")
        if evaluate_after:
            split = first_examples(data.split(recipe.eval.split), recipe.eval.max_examples)
            attacks = build_attacks(recipe.eval.attacks, task.threat)
            set_seed(recipe.seed)  # as `unirobust eval` seeds: the same random starts, the same numbers
            metrics["eval"] = evaluate(adapter, split, attacks, accelerator, recipe.eval.batch_size,
                                       task.labels, desc=f"eval {recipe.name}", threat=task.threat,
                                       check_examples=recipe.eval.check_examples, out_dir=run_dir)
            from .transfer_eval import evaluate_extras

            metrics["eval"].update(evaluate_extras(recipe, adapter, split, accelerator))
            ev = metrics["eval"]
            note = coverage_warning(data.split(recipe.eval.split), recipe.eval.max_examples)
            if note:
                ev["data_warning"] = note
            if attacked(ev):
                log.info("clean accuracy %.4f, robust accuracy %.4f on %d examples", ev["clean_accuracy"],
                         ev["robust_accuracy"], ev["n"])
            else:
                log.info("clean accuracy %.4f on %d examples (no continuous attack in eval.attacks)",
                         ev["clean_accuracy"], ev["n"])
            if main:
                write_report(run_dir, recipe.name, metrics)
        elif main:
            atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics


def finished_training(recipe: Recipe, run_dir: Path) -> dict | None:
    """The ``train`` metrics of a run in ``run_dir`` that trained to the end with ``recipe``'s training
    (same :func:`~unirobust.train.recipe_hash`) and kept its weights; None otherwise. A study resumed
    with ``--resume`` then does not train its finished variants again when they kept no checkpoint."""
    from .train import recipe_hash

    weights, metrics_file, saved = run_dir / "model.safetensors", run_dir / "metrics.json", run_dir / "recipe.yaml"
    if not (weights.exists() and metrics_file.exists() and saved.exists()):
        return None
    try:
        done = json.loads(metrics_file.read_text()).get("train")
        same = recipe_hash(validate(read_yaml(saved))) == recipe_hash(recipe)
    except (RecipeError, ValueError, OSError):
        return None
    return done if same and isinstance(done, dict) and done.get("steps") else None


def trained_task_name(run_dir: str | Path) -> str | None:
    """The task a run folder was trained on (from its recipe.yaml)."""
    return _task_name(read_yaml(Path(run_dir) / "recipe.yaml"))


def _task_name(raw: dict) -> str | None:
    return (raw.get("task") or {}).get("name")


def _recorded_task(raw: dict) -> Task:
    """The task recorded in a run's recipe.yaml (whole since the recipe hash; older runs name it);
    its data is not checked: it need not exist any more."""
    task = dict(raw["task"])
    return get_task(task.pop("name"), task)


def _on_another_task(raw: dict, trained: Task, name: str, overrides: list[str]) -> dict:
    """The run's recipe on task ``name`` (``task.name=advglue-sst2``): that task's own file, not the
    recorded task renamed; the other ``task.*`` overrides still apply. A prompt head keeps the
    templates and verbalizer it was trained with (on ``trained``), wherever they came from."""
    from .recipe import apply_overrides

    model = dict(raw.get("model") or {})
    options = dict(model.get("options") or {})
    if options.get("head") == "prompt":
        if options.get("templates") is None and trained.templates is not None:
            options["templates"] = trained.templates
        if options.get("verbalizer") is None:
            options["verbalizer"] = trained.verbalizer or {label: [label] for label in trained.labels}
        model["options"] = options
    return apply_overrides({**raw, "model": model, "task": {"name": name}}, overrides)


def check_same_outputs(trained: Task, now: Task, run_dir: Path) -> None:
    """A model trained on ``trained`` reads ``now``'s examples and names its classes the same way."""
    differ = []
    if trained.modality != now.modality:
        differ.append(f"modality ({trained.modality} vs {now.modality})")
    elif [label.lower() for label in trained.labels] != [label.lower() for label in now.labels]:
        differ.append(f"labels ({trained.labels} vs {now.labels}; override task.labels if only names differ)")
    if trained.modality == now.modality == "text" and len(trained.text_fields) != len(now.text_fields):
        differ.append(f"text fields ({trained.text_fields} vs {now.text_fields})")
    if trained.modality == now.modality == "vision" and list(trained.image_shape) != list(now.image_shape):
        differ.append(f"image_shape ({trained.image_shape} vs {now.image_shape}; task.image_shape=[...] resizes "
                      f"image files, not arrays)")
    if differ:
        raise RecipeError(f"the run {run_dir} was trained on {trained.name!r}, which differs from {now.name!r} in "
                          f"{'; '.join(differ)}: evaluate on a task with the same inputs and classes")


def load_run(run_dir: str | Path, overrides: list[str] = ()):
    """The recipe and trained adapter (in eval mode) of a finished run folder."""
    from .recipe import apply_overrides

    run_dir = Path(run_dir)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)  # one "key=value" alone
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise RecipeError(f"{run_dir} is not a finished run (no model.safetensors)")
    raw = read_yaml(run_dir / "recipe.yaml")
    applied = apply_overrides(raw, list(overrides))
    recorded, asked = _task_name(raw), _task_name(applied) if isinstance(applied.get("task"), dict) else None
    trained = _recorded_task(raw) if recorded and asked and asked != recorded else None  # on another task
    if trained is not None:
        applied = _on_another_task(raw, trained, asked, list(overrides))
    recipe = validate(applied, f"run {run_dir}")
    if trained is not None:
        check_same_outputs(trained, recipe.resolved_task, run_dir)
    with _trained_weights_follow(recipe.resolved_task.modality):
        adapter = build_for_weights(recipe, recipe.resolved_task, weights)
    load_weights(adapter, weights)
    return recipe, adapter.eval()


def build_for_weights(recipe: Recipe, task: Task, weights: Path):
    """The recipe's model, built to receive a run's own ``weights`` right after (the checkpoint it
    started from is not read: see :func:`_start_from_own_weights`)."""
    ensemble = recipe.model.ensemble
    return build_model(recipe.model.spec, task, ensemble=_start_from_own_weights(ensemble, None),
                       **_start_from_own_weights(recipe.model.options, weights if ensemble is None else None))


def _start_from_own_weights(options, weights: Path | None):
    """Model options with ``checkpoint_path`` pointing at the run's own ``weights`` (which replace the
    checkpoint it started from, and give the same shapes, e.g. a visual prompt backbone's outputs), so
    loading the run does not need that file, which may have moved. ``weights`` None (an ensemble, whose
    weights file holds all members): a ``checkpoint_path`` still in place is kept (a visual prompt
    backbone reads its outputs from it), a missing one dropped, in the members' options too."""
    if isinstance(options, dict):
        if "checkpoint_path" not in options:
            return options
        if weights is None:
            here = Path(str(options["checkpoint_path"])).expanduser().is_file()
            return options if here else {k: v for k, v in options.items() if k != "checkpoint_path"}
        return {**options, "checkpoint_path": str(weights)}
    members = getattr(options, "members", None)
    if isinstance(members, list):
        return options.model_copy(update={"members": [m.model_copy(update={"options": _start_from_own_weights(
            m.options, None)}) for m in members]})
    return options


@contextlib.contextmanager
def _trained_weights_follow(modality: str):
    """Quiets what is said about a model's starting weights while a run's model is built (transformers'
    "newly initialized ... You should probably TRAIN this model", the builder's notes on the head's
    label names, a visual prompt's random backbone): the run's trained weights replace them right after."""
    if modality != "text":
        prompt_log = logging.getLogger("unirobust.models.prompt")
        own = prompt_log.level
        prompt_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            prompt_log.setLevel(own)
        return
    from .compat import ensure_torchvision

    ensure_torchvision()
    from transformers.utils import logging as hf_logging

    builder = logging.getLogger("unirobust.models.text")
    level, own = hf_logging.get_verbosity(), builder.level
    hf_logging.set_verbosity_error()
    builder.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        builder.setLevel(own)
