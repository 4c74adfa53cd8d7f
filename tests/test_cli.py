"""The command line (unirobust/cli.py), in process, plus two subprocesses (exit code, import weight)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unirobust.cli import main, parse_attack
from unirobust.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


@pytest.mark.parametrize("what,names", [
    ("tasks", ["digits", "sst2-sample", "sst2", "ag-news", "animal-mnist"]),
    ("models", ["timm:<name>", "hf:<name>"]),
    ("attacks", ["fgsm", "pgd"]),
    ("defenses", ["erm", "pgd-at"]),
])
def test_list(capsys, what, names):
    from unirobust.registry import ATTACKS, DEFENSES, MODELS

    registered = {"models": [f"{n}:<name>" for n in MODELS.names()], "attacks": ATTACKS.names(),
                  "defenses": DEFENSES.names()}.get(what, [])
    code, out, err = run_main(capsys, "list", what)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    if registered:
        assert listed == registered  # every registered name, sorted, once
    for name in names:
        assert name in listed, out
    assert "INVALID" not in out


def test_list_tasks_shows_modality_and_classes(capsys):
    _, out, _ = run_main(capsys, "list", "tasks")
    digits = next(line for line in out.splitlines() if line.startswith("digits "))
    assert "vision" in digits and "10 classes" in digits
    sst2 = next(line for line in out.splitlines() if line.startswith("sst2-sample "))
    assert "text" in sst2 and "2 classes" in sst2


def test_list_recipes_here_and_elsewhere(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = run_main(capsys, "list", "recipes")
    assert code == 0 and "recipes/quickstart.yaml" in out.splitlines()
    monkeypatch.chdir(tmp_path)  # no recipes/ folder: say so, not an empty list with exit 0
    code, out, err = run_main(capsys, "list", "recipes")
    assert code == 1 and out == "" and "run this from the unirobust repository" in err


def test_list_unknown_kind_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["list", "widgets"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["eval", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: unirobust" in out
    if argv == ["--help"]:
        for command in ("run", "train", "eval", "list"):
            assert command in out
        assert "examples:" in out
    if argv[0] == "run":
        assert "overrides" in out and "--resume" in out
    if argv[0] == "eval":
        assert "--attack" in out and "--task" in out


def test_parse_attack():
    assert parse_attack("pgd:eps=0.1,steps=20") == {"name": "pgd", "eps": 0.1, "steps": 20}
    spec = parse_attack("pgd:eps=0.1,steps=20")
    assert isinstance(spec["eps"], float) and isinstance(spec["steps"], int)
    assert parse_attack("fgsm") == {"name": "fgsm"}
    assert parse_attack("pgd:norm=l2, random_start=false") == {"name": "pgd", "norm": "l2", "random_start": False}
    with pytest.raises(RecipeError, match="key=value"):
        parse_attack("pgd:eps")


@pytest.mark.parametrize("argv,overrides", [
    (["eval", "runs/x", "--attack", "pgd", "task.max_eval=200", "seed=3"], ["task.max_eval=200", "seed=3"]),
    (["eval", "runs/x", "seed=3", "--attack", "pgd", "task.max_eval=200"], ["seed=3", "task.max_eval=200"]),
    (["run", "r.yaml", "--resume", "train.epochs=1"], ["train.epochs=1"]),
    (["advgen", "runs/x", "--out", "a.json", "task.max_eval=9"], ["task.max_eval=9"]),
])
def test_overrides_may_follow_options(argv, overrides):
    from unirobust.cli import build_parser, parse_with_late_overrides

    assert parse_with_late_overrides(build_parser(), argv).overrides == overrides


def test_stray_words_after_options_are_still_rejected(capsys):
    from unirobust.cli import build_parser, parse_with_late_overrides

    for argv in (["eval", "runs/x", "--attack", "pgd", "oops"], ["eval", "runs/x", "--no-such-option"],
                 ["list", "tasks", "seed=1"]):
        with pytest.raises(SystemExit) as exc:
            parse_with_late_overrides(build_parser(), argv)
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_bad_recipe_returns_2(capsys, tmp_path):
    code, out, err = run_main(capsys, "run", str(REPO / "recipes" / "digits_pgd_at.yaml"), "train.epochs=abc",
                              f"output_dir={tmp_path}")
    assert code == 2
    assert err.startswith("unirobust: error: invalid recipe")
    assert "train.epochs" in err and "abc" in err
    assert out == ""
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_missing_recipe_returns_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "recipe file not found" in err


def test_bad_override_syntax_returns_2(capsys):
    code, _, err = run_main(capsys, "run", str(REPO / "recipes" / "digits_pgd_at.yaml"), "train.epochs")
    assert code == 2 and "key.sub=value" in err


def test_eval_of_model_spec_without_task_returns_2(capsys):
    code, _, err = run_main(capsys, "eval", "timm:test_resnet")
    assert code == 2 and "--task" in err


def test_cli_subprocess_bad_recipe_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntask: {name: digits}\nmodel: {spec: timm:test_resnet}\n"
                   "defense: {name: pgd-at, attack: {name: pgd, eps: -0.1}}\n")
    # python -m unirobust (its __main__.py), as the unirobust command
    proc = subprocess.run([sys.executable, "-m", "unirobust", "run", str(bad), f"output_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("unirobust: error: invalid recipe") and str(bad) in err[0]
    assert 1 <= len(err) <= 4 and "eps" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_import_and_validation_stay_light():
    """Importing the package and CLI, listing registries and validating every shipped recipe never
    imports timm, transformers or textattack."""
    code = "\n".join([
        "import sys, glob, io, contextlib",
        "import unirobust, unirobust.cli, unirobust.recipe",
        "heavy = ('textattack', 'timm', 'transformers')",
        "assert not [m for m in heavy if m in sys.modules], 'import'",
        "from unirobust.recipe import load_recipes",
        "paths = sorted(glob.glob('recipes/**/*.yaml', recursive=True))",
        "assert paths",
        "for p in paths: load_recipes(p)",
        "with contextlib.redirect_stdout(io.StringIO()):",
        "    for what in ('tasks', 'models', 'attacks', 'defenses'): unirobust.cli.main(['list', what])",
        "print(sorted(m for m in heavy if m in sys.modules))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_eval_of_a_run_on_another_task_writes_beside_its_own_evaluation(tmp_path, monkeypatch, capsys, make_run):
    """``eval runs/x --task other``: results go to ``runs/x/on-other/eval.json`` and name their task;
    the run's own ``eval.json`` (and word-attack records) stay as they were."""
    import json

    import yaml

    run, _, _ = make_run(tmp_path / "runs" / "r", {"name": "r", "task": {"name": "digits"},
                                                   "model": {"spec": "timm:test_resnet"}})
    (tmp_path / "tasks").mkdir()
    other = yaml.safe_load((REPO / "tasks" / "digits.yaml").read_text())
    other.update(name="digits-copy")
    other["threat"]["eps"] = 0.2
    (tmp_path / "tasks" / "digits-copy.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_main(capsys, "eval", str(run), "--task", "digits-copy", "--attack", "fgsm", "task.max_eval=16")
    assert code == 0 and not (run / "eval.json").exists()
    result = json.loads((run / "on-digits-copy" / "eval.json").read_text())
    assert result["task"] == "digits-copy" and result["threat"]["eps"] == 0.2 and result["n"] == 16
    code, _, _ = run_main(capsys, "eval", str(run), "--attack", "fgsm", "task.max_eval=16")
    assert code == 0 and json.loads((run / "eval.json").read_text())["task"] == "digits"
    other.update(name="digits-big", image_shape=[1, 16, 16])  # the same labels: only the images differ
    (tmp_path / "tasks" / "digits-big.yaml").write_text(yaml.safe_dump(other))
    code, _, err = run_main(capsys, "eval", str(run), "--task", "digits-big", "--attack", "fgsm")
    assert code == 2 and "differs from 'digits-big' in image_shape ([1, 8, 8] vs [1, 16, 16]" in err
    assert "labels" not in err.split("differs from")[1]


def test_eval_attacks_are_checked_against_the_task_before_anything_runs(tmp_path, capsys, make_run):
    """``--attack`` is validated as a recipe's eval.attacks are: a word attack or a relative budget
    on a vision run, or a bad parameter, is a usage error (exit 2, no traceback, nothing written)."""
    run, _, _ = make_run(tmp_path / "runs" / "r", {"name": "r", "task": {"name": "digits"},
                                                   "model": {"spec": "timm:test_resnet"}})
    for attack, says in (("textfooler", "substitutes words"), ("pgd:relative=true", "relative"),
                         ("pgd:eps=-1", "eps"), ("nosuch", "nosuch")):
        code, _, err = run_main(capsys, "eval", str(run), "--attack", attack, "task.max_eval=8")
        assert code == 2 and says in err and "Traceback" not in err, (attack, err)
    assert not (run / "eval.json").exists()


def test_usage_errors_of_overrides_and_word_attacks_return_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", str(REPO / "recipes" / "digits_pgd_at.yaml"), "eval.attacks=[{name: pgd")
    assert code == 2 and "not valid YAML" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "eval", "timm:test_resnet", "--task", "digits", "--attack", "pgd:eps=[1")
    assert code == 2 and "not valid YAML" in err
    # a continuous attack given to `attack` is named as such, before any model is looked for
    code, _, err = run_main(capsys, "attack", str(tmp_path / "no-run"), "--attack", "pgd")
    assert code == 2 and "not a word-substitution attack" in err
    code, _, err = run_main(capsys, "attack", str(tmp_path / "no-run"), "--attack", "pwwz")
    assert code == 2 and "unknown attack 'pwwz'" in err
    code, _, err = run_main(capsys, "attack", str(tmp_path / "no-run"), "--attack", "textfooler:max_candidate=5")
    assert code == 2 and "textfooler has no parameter max_candidate; its parameters: antonyms," in err
    for n in ("0", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["attack", str(tmp_path / "no-run"), "--n", n])
        assert exc.value.code == 2


def test_launch_returns_the_commands_exit_code(capsys, tmp_path, monkeypatch):
    """The launched command prints its own error; launch exits with its code, without a traceback."""
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    assert main(["launch", "--num_processes", "1", "--", "run", str(tmp_path / "nope.yaml")]) == 2


def test_other_ranks_keep_progress_lines_out_of_the_console(tmp_path):
    """Under `launch`, a rank other than local rank 0 logs warnings only to the console; its run
    log (which lowers the unirobust logger to INFO) still gets the progress lines."""
    script = ("import logging\n"
              "from pathlib import Path\n"
              "from unirobust.cli import configure_logging\n"
              "from unirobust.runs import LogToFile\n"
              "configure_logging(verbose=False)\n"
              f"with LogToFile(Path({str(tmp_path / 'log.1.txt')!r})):\n"
              "    logging.getLogger('unirobust.train').info('epoch 0: loss 0.5')\n"
              "    logging.getLogger('unirobust.train').warning('a warning')\n")
    for rank, console_has_progress in (("1", False), ("0", True)):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "LOCAL_RANK": rank}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "a warning" in done.stderr
        assert ("epoch 0: loss 0.5" in done.stderr) is console_has_progress, (rank, done.stderr)
        assert "epoch 0: loss 0.5" in (tmp_path / "log.1.txt").read_text()


def test_missing_run_folder_is_named(tmp_path, capsys):
    """A run folder that does not exist was reported as a bad model spec."""
    assert main(["eval", str(tmp_path / "runs" / "nosuch"), "--task", "digits"]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_run_prints_its_word_attack_table(tmp_path, capsys, monkeypatch):
    """A single run's console table shows the word attacks too (a study's has them as columns)."""
    import yaml

    import unirobust.runs

    ev = {"n": 8, "clean_accuracy": 0.75, "robust_accuracy": 0.5, "cascade": [],
          "word_attacks": {"pwws(n=4)": {"n": 4, "clean_accuracy": 0.75, "accuracy_under_attack": 0.25,
                                         "attack_success_rate": 2 / 3, "mean_perturbed_fraction": 0.1,
                                         "mean_queries": 12.0, "seconds_per_example": 0.5}}}
    monkeypatch.setattr(unirobust.runs, "execute", lambda recipe, **kw: {"eval": ev})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"}}))
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "| pwws(n=4) | 4 | 75.0 | 25.0 | 66.7 |" in out


def test_model_spec_is_built_from_the_recipe_seed():
    """`eval timm:<arch> --task ...` builds a randomly initialised model: the same weights on every
    call with one seed (an unseeded build would differ call to call), others with another seed."""
    import torch

    from unirobust.cli import build_parser, load_target, parse_with_late_overrides

    def weights(*overrides):
        args = parse_with_late_overrides(build_parser(), ["eval", "timm:test_resnet", "--task", "digits", *overrides])
        torch.manual_seed(len(overrides) + torch.randint(1000, ()).item())  # whatever the state before
        return torch.cat([p.detach().flatten() for p in load_target(args)[1].parameters()])

    assert torch.equal(weights(), weights())
    assert torch.equal(weights("seed=3"), weights("seed=3")) and not torch.equal(weights(), weights("seed=3"))


def test_first_examples_missing_classes_are_recorded_with_the_results(capsys, tmp_path):
    """A test split sorted by class and ``--max-examples`` that sees only its first class: the
    warning is in eval.json and, for a run, in metrics.json and report.md, not only the console."""
    import json

    import numpy as np
    import yaml

    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.arange(12) % 3)
    np.savez(tmp_path / "test.npz", images=images, labels=np.repeat(np.arange(3), 4))  # sorted by class
    (tmp_path / "sorted.yaml").write_text(yaml.safe_dump({
        "modality": "vision", "labels": list("abc"), "image_shape": [1, 8, 8], "threat": {"eps": 0.1},
        "source": {"loader": "npz", "path": str(tmp_path), "splits": {"train": "train.npz", "test": "test.npz"}}}))
    task = str(tmp_path / "sorted.yaml")
    out = tmp_path / "eval.json"
    assert run_main(capsys, "eval", "timm:test_resnet", "--task", task, "--attack", "fgsm", "--max-examples", "4",
                    "--output", str(out), "eval.check_examples=0")[0] == 0
    assert "miss 2 of the split's classes" in json.loads(out.read_text())["data_warning"]
    assert run_main(capsys, "eval", "timm:test_resnet", "--task", task, "--attack", "fgsm", "--max-examples", "12",
                    "--output", str(out), "eval.check_examples=0")[0] == 0
    assert "data_warning" not in json.loads(out.read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "sorted", "output_dir": str(tmp_path / "runs"), "task": {"name": task},
                                      "model": {"spec": "timm:test_resnet"}, "train": {"epochs": 0},
                                      "eval": {"max_examples": 4, "check_examples": 0, "attacks": [{"name": "fgsm"}]}}))
    assert run_main(capsys, "run", str(recipe))[0] == 0
    run = tmp_path / "runs" / "sorted"
    assert "miss 2 of the split's classes" in json.loads((run / "metrics.json").read_text())["eval"]["data_warning"]
    assert "**Evaluation set:** the first 4 examples miss 2" in (run / "report.md").read_text()


def test_eval_of_a_run_reproduces_its_own_metrics(capsys, tmp_path):
    """The run's evaluation and `unirobust eval <run>` start their random attacks from the same seed:
    the same robust accuracy (the run evaluated with whatever RNG state training left behind)."""
    import json

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "again", "output_dir": str(tmp_path / "runs"), "task": {"name": "digits", "max_train": 64},
        "model": {"spec": "timm:test_resnet"}, "train": {"epochs": 1, "batch_size": 32, "lr": 0.01},
        "eval": {"max_examples": 64, "check_examples": 0,
                 "attacks": [{"name": "random-search", "eps": 0.3, "n_queries": 10}]}}))
    assert run_main(capsys, "run", str(recipe))[0] == 0
    run = tmp_path / "runs" / "again"
    ran = json.loads((run / "metrics.json").read_text())["eval"]
    assert run_main(capsys, "eval", str(run))[0] == 0
    again = json.loads((run / "eval.json").read_text())
    assert 0 < again["robust_accuracy"] < again["clean_accuracy"] or again["clean_accuracy"] == 0
    assert (again["clean_accuracy"], again["robust_accuracy"]) == (ran["clean_accuracy"], ran["robust_accuracy"])


def test_fresh_start_and_resume_without_checkpoint_clear_earlier_results(capsys, tmp_path):
    """Results of the folder's earlier model (eval.json, evaluations on other tasks, per-attack and
    word-attack records) must not sit next to a model trained from the start, --resume or not (with
    --resume: the earlier model was trained with another learning rate, so it is not this recipe's)."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "fresh", "output_dir": str(tmp_path / "runs"), "task": {"name": "digits", "max_train": 32},
        "model": {"spec": "timm:test_resnet"}, "train": {"epochs": 1, "batch_size": 32},
        "eval": {"max_examples": 16, "check_examples": 0, "attacks": [{"name": "fgsm"}]}}))
    run = tmp_path / "runs" / "fresh"
    for argv in (["run", str(recipe)], ["run", str(recipe), "train.lr=0.002", "--resume"]):
        for stale in ("eval.json", "on-other/eval.json", "attacks/textfooler/summary.json"):
            (run / stale).parent.mkdir(parents=True, exist_ok=True)
            (run / stale).write_text("{}")
        assert run_main(capsys, *argv)[0] == 0
        assert not (run / "eval.json").exists() and not (run / "on-other").exists()
        assert not (run / "attacks/textfooler").exists() and (run / "metrics.json").exists()


def test_loading_a_trained_text_run_does_not_ask_to_train_it(tmp_path, make_run):
    """The packaged MiniLM has no classifier: building it says "newly initialized ... TRAIN this model",
    which is wrong for a run whose trained weights load next. Loading a run keeps transformers quiet."""
    import logging

    from transformers.utils import logging as hf_logging

    from unirobust.models.base import build_from_config
    from unirobust.recipe import validate
    from unirobust.runs import load_run

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    spec = {"name": "txt", "task": {"name": "sst2-sample"},
            "model": {"spec": "hf:sentence-transformers/all-MiniLM-L6-v2", "options": {"max_length": 16}}}
    run, _, _ = make_run(tmp_path / "txt", spec)
    collect, root = Collect(), logging.getLogger("transformers")
    root.addHandler(collect)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # whatever other tests left
    try:
        load_run(run)
        assert not any("newly initialized" in m for m in collect.messages)
        assert hf_logging.get_verbosity() == hf_logging.WARNING  # restored
        build_from_config(validate(spec).model, validate(spec).resolved_task)  # a new model: the warning stands
        assert any("newly initialized" in m for m in collect.messages)
    finally:
        root.removeHandler(collect)
        hf_logging.set_verbosity(level)


def test_every_variant_is_checked_before_the_first_runs(capsys, tmp_path):
    """A batch that does not split over `launch`'s processes is refused once, before any process starts;
    a study whose second variant holds a checkpoint of another recipe is refused before the first
    variant is resumed and re-evaluated."""
    import yaml

    raw = {"name": "st", "output_dir": str(tmp_path / "runs"), "task": {"name": "digits", "max_train": 32},
           "model": {"spec": "timm:test_resnet"}, "train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 1},
           "eval": {"max_examples": 8, "check_examples": 0, "attacks": [{"name": "fgsm"}]},
           "variants": [{"name": "a"}, {"name": "b", "seed": 1}]}
    recipe = tmp_path / "st.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, _, err = run_main(capsys, "launch", "--multi_gpu", "--num_processes", "3", "--", "run", str(recipe))
    assert code == 2 and "train.batch_size 16 must be divisible by 3 processes" in err
    assert not (tmp_path / "runs").exists()
    assert run_main(capsys, "run", str(recipe))[0] == 0
    first = (tmp_path / "runs" / "st" / "a" / "metrics.json").read_text()
    code, _, err = run_main(capsys, "run", str(recipe), "--resume", "variants.1.train.lr=0.5")
    assert code == 2 and "another recipe" in err and "st/b" in err
    assert (tmp_path / "runs" / "st" / "a" / "metrics.json").read_text() == first  # variant a was not re-run


def test_a_run_that_cannot_start_says_why_in_its_log(capsys, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bad", "output_dir": str(tmp_path / "runs"), "task": {"name": "digits"},
                                      "model": {"spec": "timm:test_resnet", "options": {"drop_ratee": 0.1}}}))
    assert run_main(capsys, "run", str(recipe))[0] != 0
    log = (tmp_path / "runs" / "bad" / "log.txt").read_text()
    assert "ERROR: stopped:" in log and "drop_ratee" in log


def test_advgen_thresholds_are_checked(capsys, tmp_path):
    for flag, value, says in (("--min-similarity", "2", "a cosine"), ("--max-change", "-1", "a fraction")):
        code, _, err = run_main(capsys, "advgen", str(tmp_path / "no-run"), "--out", str(tmp_path / "a.json"),
                                flag, value)
        assert code == 2 and says in err
