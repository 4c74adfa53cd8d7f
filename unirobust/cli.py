"""``unirobust run|train|eval|list``: the command line over recipes, runs and registries."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .recipe import RecipeError

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  unirobust run recipes/quickstart.yaml
  unirobust run recipes/digits_pgd_at.yaml train.epochs=1 defense.attack.eps=0.05
  unirobust eval runs/digits_pgd_at --attack pgd:eps=0.1,steps=20 --attack fgsm
  unirobust eval timm:resnet18 --task digits --attack pgd
  unirobust eval runs/sst2_minilm_mvp --advglue path/to/advglue/dev.json
  unirobust attack runs/sst2_minilm_embedding_at --attack textfooler --n 200
  unirobust attack runs/sst2_minilm_embedding_at --textattack-recipe deepwordbug --n 100
  unirobust advgen runs/sst2_minilm_embedding_at --attack textfooler --n 500 --out my_advglue.json
  unirobust list tasks
  unirobust launch --multi_gpu --num_processes 2 -- run recipes/digits_pgd_at.yaml
"""


def parse_attack(text: str) -> dict:
    """``pgd`` or ``pgd:eps=0.1,steps=20`` -> ``{"name": "pgd", "eps": 0.1, "steps": 20}``."""
    import yaml

    from .tasks import load_yaml

    name, _, rest = text.partition(":")
    spec = {"name": name}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise RecipeError(f"attack {text!r}: expected name:key=value,key=value")
        try:
            spec[key.strip()] = load_yaml(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"attack {text!r}: {key.strip()}={value} is not valid YAML ({str(err).splitlines()[0]})") from None
    return spec


def cmd_run(args, evaluate_after: bool = True) -> int:
    from .recipe import load_recipes
    from .report import cautions, metrics_table, word_attack_table, write_summary
    from .runs import execute

    recipes = load_recipes(args.recipe, args.overrides)
    # the process count as `launch` sets it: a PartialState made before execute's accelerator would
    # take the distributed setup from it
    check_can_start(recipes, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
    results = {}
    for recipe in recipes:
        metrics = execute(recipe, resume=args.resume, evaluate_after=evaluate_after)
        if "eval" in metrics:
            results[recipe.name] = metrics["eval"]
    from accelerate import PartialState

    if results and PartialState().is_main_process:
        tasks = {r.name: r.resolved_task.name for r in recipes} if len(recipes) > 1 else None
        print("\n" + metrics_table(results, tasks))
        for line in cautions(results):
            print(line)
        if not tasks and next(iter(results.values())).get("word_attacks"):  # a study's table has them as columns
            print("\n" + word_attack_table(next(iter(results.values()))["word_attacks"]))
        if tasks:
            root = Path(recipes[0].output_dir) / recipes[0].name.split("/")[0]
            print(f"\nsummary: {write_summary(root, results, tasks)}")
    return 0


def check_can_start(recipes, num_processes: int, resume: bool) -> None:
    """The checks that can refuse a run before anything runs (batch split, resumed checkpoint), for every
    variant first: a study does not stop at its third run for a batch that does not split over the
    processes or a checkpoint of another recipe."""
    from types import SimpleNamespace

    from .runs import run_dir_of
    from .train import check_batch_split, latest_checkpoint, resumable_state

    for recipe in recipes:
        check_batch_split(recipe, SimpleNamespace(num_processes=num_processes))
        if resume and (ckpt := latest_checkpoint(run_dir_of(recipe))) is not None:
            resumable_state(recipe, ckpt)


def results_folder(target: Path, task_name: str) -> Path | None:
    """Where evaluations of ``target`` on ``task_name`` go: the run folder itself for the task it was
    trained on, ``on-<task>/`` inside it for another (its own results stay); None for a model spec."""
    from .runs import trained_task_name

    if not (target / "recipe.yaml").exists():
        return None
    return target if trained_task_name(target) == task_name else target / f"on-{task_name}"


def load_target(args):
    """(recipe, adapter) of ``args.target``: a run folder, or a model spec with ``--task``."""
    from .recipe import apply_overrides, validate
    from .runs import load_run

    target = Path(args.target)
    if (target / "recipe.yaml").exists():  # --task on a run folder: its model on another task
        return load_run(target, ([f"task.name={args.task}"] if args.task else []) + list(args.overrides))
    if ":" not in args.target and not target.is_dir():  # neither a model spec nor a model folder
        raise RecipeError(f"run folder not found: {args.target} (a run folder holds recipe.yaml; a model is "
                          f"hf:<name or folder> or timm:<arch> with --task)")
    if not args.task:
        raise RecipeError(f"{args.target!r} is not a run folder; to evaluate a model spec, give --task")
    from .models.base import build_from_config

    from accelerate.utils import set_seed

    raw = {"name": "eval", "task": {"name": args.task}, "model": {"spec": args.target}}
    recipe = validate(apply_overrides(raw, args.overrides), "evaluation")
    set_seed(recipe.seed)  # a head (or a whole timm model) initialised at random: the same one every call
    return recipe, build_from_config(recipe.model, recipe.resolved_task)


def cmd_eval(args) -> int:
    from .report import atomic_write, cautions, environment, metrics_table, word_attack_table
    from .runs import build_attacks, coverage_warning, first_examples
    from .tasks import load_task

    from accelerate.utils import set_seed

    target = Path(args.target)
    if args.attack:  # validated as the recipe's own attacks are, against the task (word attacks need text, ...)
        args.overrides = [*args.overrides, "eval.attacks=" + json.dumps([parse_attack(a) for a in args.attack],
                                                                        default=str)]
    try:
        recipe, adapter = load_target(args)
    except RecipeError as err:
        if args.attack and "eval.attacks." in str(err):
            raise RecipeError(f"{err}\n  (eval.attacks.<i> is the (i+1)-th --attack)") from None
        raise
    task = recipe.resolved_task
    attacks = build_attacks(recipe.eval.attacks, task.threat)
    whole = load_task(task, seed=recipe.seed).split(args.split or recipe.eval.split)
    limit = args.max_examples or recipe.eval.max_examples
    data = first_examples(whole, limit)
    from .evaluate import evaluate

    from .train import make_accelerator

    if args.advglue_benign and not args.advglue:
        raise RecipeError("--advglue-benign gives the benign counterparts of --advglue; give --advglue too")
    if args.advglue:  # a wrong file or task fails now, not after the attacks
        from .advglue import check_advglue_source

        check_advglue_source(task, args.advglue)
        if args.advglue_benign:
            check_advglue_source(task, args.advglue_benign)
    accelerator = make_accelerator(recipe)
    adapter = adapter.to(accelerator.device)
    batch_size = args.batch_size or recipe.eval.batch_size
    results = results_folder(target, task.name)
    set_seed(recipe.seed)  # random starts and restarts: the same numbers on every call
    metrics = evaluate(adapter, data, attacks, accelerator, batch_size, task.labels,
                       threat=task.threat, check_examples=recipe.eval.check_examples, out_dir=results)
    metrics.update({"task": task.name, "split": args.split or recipe.eval.split, "max_examples": limit,
                    "seed": recipe.seed, "threat": task.threat.model_dump(mode="json", exclude_none=True),
                    "environment": environment()})  # evaluate records each attack's parameters
    note = coverage_warning(whole, limit)
    if note:
        metrics["data_warning"] = note
    from .transfer_eval import evaluate_extras, extras_markdown

    metrics.update(evaluate_extras(recipe, adapter, data, accelerator))  # an ensemble's members, eval.transfer
    advglue = None
    if args.advglue:
        from .advglue import run_advglue_eval

        advglue = run_advglue_eval(adapter, task, args.advglue, accelerator, batch_size, benign=args.advglue_benign)
        metrics["advglue"] = {k: v for k, v in advglue.items() if k != "markdown"}
    if accelerator.is_main_process:
        print("\n" + metrics_table({str(args.target): metrics}))
        for line in cautions({str(args.target): metrics}):
            print(line)
        if extras_markdown(metrics):
            print("\n" + extras_markdown(metrics))
        if metrics.get("word_attacks"):
            print("\n" + word_attack_table(metrics["word_attacks"]))
        if advglue:
            print("\n" + advglue["markdown"])
        out = Path(args.output) if args.output else (results / "eval.json" if results else None)
        if out:
            atomic_write(out, json.dumps(metrics, indent=2))
            print(f"\nmetrics: {out}")
        else:
            print("\n(a model spec has no run folder: nothing written; --output <file> saves eval.json)")
    return 0


def text_examples(args):
    """(recipe, adapter, examples): the target's first ``--n`` examples of the split, as dicts."""
    from .runs import first_examples
    from .tasks import load_task

    recipe, adapter = load_target(args)
    task = recipe.resolved_task
    if task.modality != "text":
        raise RecipeError(f"word-substitution attacks need a text task; {task.name!r} is {task.modality}")
    split = load_task(task, seed=recipe.seed).split(args.split or recipe.eval.split)
    if args.n and args.n > len(split):
        capped = (f" (the run's task.max_eval={task.max_eval}; task.max_eval=null lifts it)"
                  if task.max_eval and task.max_eval == len(split) else "")
        log.warning("--n %d: the %s split has %d examples%s; all of them are attacked", args.n,
                    args.split or recipe.eval.split, len(split), capped)
    split = first_examples(split, args.n)
    return recipe, adapter, [dict(split[i]) for i in range(len(split))]


def word_attack_of(text: str, **extra):
    """A word-substitution attack from ``NAME[:k=v,...]``; anything else is a usage error."""
    from .attacks import build_attack
    from .registry import ATTACKS

    spec = {**parse_attack(text), **extra}
    target = ATTACKS.get(spec["name"]) if spec["name"] in ATTACKS else None  # word presets are functions
    if isinstance(target, type) and getattr(target, "kind", None) != "word":
        raise RecipeError(f"{spec['name']!r} is not a word-substitution attack (pwws, textfooler, ...); "
                          f"continuous attacks run with `unirobust eval --attack`")
    try:
        return build_attack(spec)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"attack {text!r}: {err}") from None


def cmd_attack(args) -> int:
    """Word-substitution attack (unirobust's engine, or any TextAttack recipe through the bridge)."""
    from .attacks.text.attack import run_word_attack
    from .evaluate import slug
    from .report import word_attack_table
    from .train import make_accelerator

    runner = None
    if not args.textattack_recipe:  # a wrong attack is reported before the model loads
        attack = word_attack_of(args.attack, **({"query_budget": args.query_budget} if args.query_budget else {}))
        name = slug(args.attack.replace(":", "_").replace(",", "_").replace("=", "-"))  # mlm=/a/path: one folder
    recipe, adapter, examples = text_examples(args)
    if not args.textattack_recipe:  # what the engine would refuse mid-run, refused now
        fields = list(adapter.text_fields)
        if attack.field and attack.field not in fields:
            raise RecipeError(f"attack {args.attack!r}: field {attack.field!r} is not a text field of the model "
                              f"({', '.join(fields)})")
        if attack.wir == "gradient" and getattr(adapter, "templates", None) is not None:
            raise RecipeError(f"attack {args.attack!r}: wir: gradient word importance needs a plain classifier "
                              f"head; this model has a prompt head: use wir=delete or wir=unk")
    if args.textattack_recipe:
        from .attacks.text.bridge import AdapterWrapper, build_textattack_attack, run_textattack

        name = f"textattack-{args.textattack_recipe}"
        try:
            attack = build_textattack_attack(args.textattack_recipe, AdapterWrapper(adapter),
                                             query_budget=args.query_budget)
        except (ValueError, RuntimeError) as err:  # an unknown recipe; a resource it cannot load offline
            raise RecipeError(f"--textattack-recipe: {err}") from None

        def runner(adapter, examples, attack, store, indices, progress):
            run_textattack(adapter, examples, attack, store=store, progress=progress,  # store.todo(): this rank's share
                           seed=recipe.seed)
    target = Path(args.target)
    folder = results_folder(target, recipe.resolved_task.name)
    if folder is None:  # a model spec: a folder of its own, so two models' results do not replace each other
        base = Path("runs") / "attacks" / slug(f"{args.target}-on-{recipe.resolved_task.name}")
    else:
        base = folder / "attacks"
    out = Path(args.out) if args.out else base / name
    accelerator = make_accelerator(recipe)
    adapter = adapter.to(accelerator.device).eval()
    summary = run_word_attack(adapter, examples, attack, out, accelerator, fresh=args.fresh,
                              progress=accelerator.is_local_main_process, runner=runner)
    if accelerator.is_main_process:
        print("\n" + word_attack_table({name: summary}))
        print(f"\nresults: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}")
    return 0


def cmd_advgen(args) -> int:
    """Build an AdvGLUE-format adversarial set from a text run with a word attack and AdvGLUE-like filters."""
    from .advgen import advgen
    from .train import make_accelerator

    if not -1 <= args.min_similarity <= 1:
        raise RecipeError(f"--min-similarity {args.min_similarity}: a cosine, in [-1, 1]")
    if not 0 < args.max_change <= 1:
        raise RecipeError(f"--max-change {args.max_change}: a fraction of the words, in (0, 1]")
    recipe, adapter, examples = text_examples(args)
    attack = word_attack_of(args.attack)
    out = Path(args.out)
    accelerator = make_accelerator(recipe)
    counts = advgen(adapter.to(accelerator.device).eval(), examples, attack, out,
                    out.with_name(out.stem + ".attack"), recipe.resolved_task.labels, accelerator,
                    args.min_similarity, args.max_change, attack_name=args.attack)
    if accelerator.is_main_process:
        print(f"{counts['kept']} of {counts['examples']} examples kept ({counts['successful']} successful attacks; "
              f"dropped {counts['too_many_words_changed']} for words changed, {counts['too_dissimilar']} for "
              f"similarity) -> {out}\nevaluate with: unirobust eval <run> --advglue {out}")
    return 0


def cmd_launch(args) -> int:
    """``accelerate launch <options> -m unirobust.cli <command>``, with the torchvision fix applied first
    (the ``accelerate`` CLI imports timm, hence torchvision, before it launches anything)."""
    from .compat import ensure_torchvision

    ensure_torchvision()
    from accelerate.commands.launch import launch_command, launch_command_parser

    rest = list(args.rest)
    if "--" not in rest:
        raise RecipeError("usage: unirobust launch [accelerate launch options] -- run RECIPE [overrides]")
    cut = rest.index("--")
    options, command = rest[:cut], rest[cut + 1:]
    if not command:
        raise RecipeError("unirobust launch: give the unirobust command after --, e.g. -- run recipes/x.yaml")
    parsed = launch_command_parser().parse_args([*options, "-m", "unirobust.cli", *command])
    if (parsed.num_processes or 1) > 1 and not (parsed.multi_gpu or parsed.use_deepspeed or parsed.use_fsdp):
        log.warning("--num_processes %d without --multi_gpu: accelerate starts one process; add --multi_gpu "
                    "(on CPU it runs the processes with the gloo backend)", parsed.num_processes)
    inner = parse_with_late_overrides(build_parser(), command)
    if inner.command in ("run", "train"):  # a recipe error once, here, not once per process
        from .recipe import load_recipes

        processes = (parsed.num_processes or 1) if parsed.multi_gpu or parsed.use_deepspeed or parsed.use_fsdp else 1
        check_can_start(load_recipes(inner.recipe, inner.overrides), processes, inner.resume)
    try:
        launch_command(parsed)
    except subprocess.CalledProcessError as err:  # the command has printed its own error
        return err.returncode
    except Exception as err:  # torch elastic's ChildFailedError: each process printed its own error
        if type(err).__name__ != "ChildFailedError":
            raise
        codes = [f.exitcode for f in getattr(err, "failures", {}).values()]
        print(f"unirobust launch: {len(codes) or 'a'} process(es) failed (exit codes {codes}); their errors "
              f"are above", file=sys.stderr)
        return next((c for c in codes if c), 1)
    return 0


def cmd_list(args) -> int:
    from .registry import ATTACKS, DEFENSES, MODELS
    from .tasks import available_tasks, get_task

    if args.what == "tasks":
        for name, path in available_tasks().items():
            try:
                t = get_task(str(path))
                print(f"{name:16s} {t.modality:7s} {len(t.labels):3d} classes  {t.description}")
            except Exception as err:  # a broken user task file should not hide the others
                print(f"{name:16s} INVALID: {err}")
    elif args.what == "recipes":
        found = sorted(Path("recipes").glob("**/*.yaml"))
        if not found:  # recipes are files of the repository, not of the installed package
            print(f"no recipes/*.yaml under {Path.cwd()}: run this from the unirobust repository", file=sys.stderr)
            return 1
        for p in found:
            print(p)
    else:
        reg = {"models": MODELS, "attacks": ATTACKS, "defenses": DEFENSES}[args.what]
        for name in reg.names():
            shown = f"{name}:<name>" if args.what == "models" else name
            print(f"{shown:16s} {reg.doc(name)}")
    return 0


def add_text_target(parser, n: int) -> None:
    """The arguments ``attack`` and ``advgen`` share: which model, which examples."""
    parser.add_argument("target", help="a run folder (runs/<name>) or a model spec (hf:<id>) with --task")
    parser.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    parser.add_argument("--task", help="task of a model spec; for a run folder, another task to evaluate it on")
    parser.add_argument("--n", type=positive_int, default=n, help=f"number of examples (default {n})")
    parser.add_argument("--split", choices=["validation", "test"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unirobust", description="Attack, adversarially train and evaluate vision "
                                "(timm) and text (Hugging Face) models through one code path.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("run", "train with the recipe's defense, evaluate, write runs/<name>/"),
                           ("train", "train only (no evaluation)")):
        r = sub.add_parser(name, help=helptext, description=helptext)
        r.add_argument("recipe", help="recipe YAML file (see recipes/)")
        r.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=1")
        r.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")

    e = sub.add_parser("eval", help="evaluate a run folder or a model spec under attacks",
                       description="Clean accuracy and the per-example worst case over --attack (in order).")
    e.add_argument("target", help="a run folder (runs/<name>) or a model spec (timm:<arch>, hf:<id>)")
    e.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides (e.g. task.max_eval=200)")
    e.add_argument("--task", help="task of a model spec; for a run folder, another task to evaluate it on")
    e.add_argument("--attack", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="attack, repeatable, e.g. pgd:eps=0.1,steps=20 (default: the recipe's eval.attacks)")
    e.add_argument("--split", choices=["validation", "test"])
    e.add_argument("--max-examples", type=positive_int)
    e.add_argument("--batch-size", type=positive_int)
    e.add_argument("--output", help="write metrics JSON here (default: <run>/eval.json; a model spec writes "
                                    "nothing without it)")
    e.add_argument("--advglue", metavar="HUB_ID|FILE",
                   help="also score AdvGLUE: hub id (adv_glue) or a release-format dev.json; "
                        "the AdvGLUE task(s) whose GLUE fields match the run's task")
    e.add_argument("--advglue-benign", metavar="HUB_ID|FILE",
                   help="benign counterparts for --advglue (hub glue, or a file in the release format)")

    at = sub.add_parser("attack", help="word-substitution attack on a text run or model spec",
                        description="Attack the first --n examples; per-example results.jsonl and summary.json "
                        "go to <run>/attacks/<name>/ (resumable: finished examples are not redone).")
    add_text_target(at, n=100)
    how = at.add_mutually_exclusive_group()
    how.add_argument("--attack", default="pwws", metavar="NAME[:k=v,...]",
                     help="unirobust word attack: pwws, textfooler, deepwordbug, bae, bert-attack, a2t or word "
                          "(e.g. textfooler:max_candidates=20); default pwws")
    how.add_argument("--textattack-recipe", metavar="NAME", help="run a TextAttack recipe through the bridge instead")
    at.add_argument("--query-budget", type=int)
    at.add_argument("--out", help="output folder (default <run>/attacks/<name>)")
    at.add_argument("--fresh", action="store_true", help="discard earlier results in the output folder")

    ag = sub.add_parser("advgen", help="build an AdvGLUE-format adversarial set from a text run",
                        description="Attack the first --n examples, keep flipped predictions with at most "
                        "--max-change of words changed and sentence similarity >= --min-similarity, write AdvGLUE JSON.")
    add_text_target(ag, n=200)
    ag.add_argument("--attack", default="textfooler", metavar="NAME[:k=v,...]", help="word attack (default textfooler)")
    ag.add_argument("--out", required=True, help="output AdvGLUE JSON file")
    ag.add_argument("--min-similarity", type=float, default=0.85, help="sentence-encoder cosine (default 0.85)")
    ag.add_argument("--max-change", type=float, default=0.15, help="max fraction of words changed (default 0.15)")

    from .transfer_eval import add_transfer_parser

    add_transfer_parser(sub)

    la = sub.add_parser("launch", help="run a unirobust command on several processes (accelerate launch)",
                        description="Options before -- go to `accelerate launch` (e.g. --multi_gpu "
                        "--num_processes 2; on CPU this runs gloo); after -- comes the unirobust command.")
    la.add_argument("rest", nargs=argparse.REMAINDER, help="[accelerate options] -- COMMAND ...")

    ls = sub.add_parser("list", help="list tasks, models, attacks, defenses or recipes")
    ls.add_argument("what", choices=["tasks", "models", "attacks", "defenses", "recipes"])
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def parse_with_late_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may also come after options
    (``unirobust eval runs/x --attack pgd task.max_eval=200``): argparse alone gives a ``nargs="*"``
    positional only the words before the first option, and rejects the rest."""
    args, extra = parser.parse_known_args(argv)
    late = [w for w in extra if "=" in w and not w.startswith("-")] if hasattr(args, "overrides") else []
    if len(late) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(w for w in extra if w not in late)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def configure_logging(verbose: bool) -> None:
    """Console logging: INFO (DEBUG with -v); under `launch`, warnings only except on local rank 0.
    The level sits on the console handler too, so a run log that lowers the ``unirobust`` logger to
    INFO (runs.LogToFile) does not bring every rank's progress lines back to the console."""
    import os

    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    theirs = set(root.handlers)  # an embedding program's (or pytest's) handlers are left as they are
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in set(root.handlers) - theirs:
        handler.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["launch"] and not {"-h", "--help"} & set(argv[1:argv.index("--") if "--" in argv else None]):
        args = argparse.Namespace(command="launch", rest=argv[1:], verbose=False)  # options belong to accelerate
    else:
        args = parse_with_late_overrides(parser, argv)
    configure_logging(args.verbose)
    from .advglue import AdvGLUEError
    from .attacks.text.sources import MissingMaskedLM
    from .models.base import ModelSpecError
    from .registry import UnknownName
    from .tasks import TaskError

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "train":
            return cmd_run(args, evaluate_after=False)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "transfer":
            return args.func(args)
        if args.command == "advgen":
            return cmd_advgen(args)
        if args.command == "attack":
            return cmd_attack(args)
        if args.command == "launch":
            return cmd_launch(args)
        return cmd_list(args)
    except (RecipeError, TaskError, UnknownName, ModelSpecError, AdvGLUEError, MissingMaskedLM) as err:
        print(f"unirobust: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
