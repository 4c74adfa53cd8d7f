"""Training loop: resume after a crash, run folders, and multi-process runs (slow, end to end)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from unirobust.recipe import RecipeError

TINY = {
    "name": "tiny",
    "seed": 0,
    "task": {"name": "digits", "max_train": 192, "max_eval": 96},
    "model": {"spec": "timm:test_resnet"},
    "defense": {"name": "pgd-at", "attack": {"name": "pgd", "steps": 2}},  # random starts exercise RNG restore
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.003, "schedule": "cosine", "checkpoint_every": 4},
    "eval": {"batch_size": 32, "attacks": [{"name": "pgd", "steps": 5, "random_start": False}]},
}


def write_recipe(path: Path, **changes) -> Path:
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_after_crash_ends_with_same_weights(tmp_path, monkeypatch):
    """6 steps per epoch, checkpoint every 4: the crash lands mid-epoch, so resume must skip batches,
    restore optimizer, schedule and RNG (PGD random starts) exactly."""
    from unirobust import train
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    recipe_file = write_recipe(tmp_path / "tiny.yaml")
    full = load_recipes(recipe_file, [f"output_dir={tmp_path / 'full'}"])[0]
    execute(full, evaluate_after=False)

    crashed = load_recipes(recipe_file, [f"output_dir={tmp_path / 'crashed'}"])[0]
    original = train.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash("simulated crash after the first checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        execute(crashed, evaluate_after=False)
    run_dir = tmp_path / "crashed" / "tiny"
    assert not (run_dir / "model.safetensors").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_4"]
    monkeypatch.setattr(train, "save_checkpoint", original)
    other = load_recipes(recipe_file, [f"output_dir={tmp_path / 'crashed'}", "train.lr=0.001"])[0]
    written = (run_dir / "recipe.yaml").read_text()
    with pytest.raises(RecipeError, match="another recipe"):  # a checkpoint of another recipe is not resumed
        execute(other, resume=True, evaluate_after=False)
    assert (run_dir / "recipe.yaml").read_text() == written  # ... nor does it rewrite the run's recipe
    metrics = execute(crashed, resume=True, evaluate_after=False)
    assert metrics["train"]["steps"] == 12
    # the history of the epoch the crash cut in two is whole again (its sums are in the checkpoint)
    reference = json.loads((tmp_path / "full" / "tiny" / "metrics.json").read_text())["train"]["history"]
    assert [h["epoch"] for h in metrics["train"]["history"]] == [0, 1]
    for ours, theirs in zip(metrics["train"]["history"], reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["train_accuracy"] == theirs["train_accuracy"]

    a = load_file(tmp_path / "full" / "tiny" / "model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_last_step_is_checkpointed_so_resume_of_a_finished_run_trains_nothing(tmp_path, caplog):
    """6 steps, a checkpoint every 4: the last step is saved too, so --resume after the run finished (or
    crashed in its evaluation) evaluates the same model instead of training steps 5-6 again."""
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    recipe_file = write_recipe(tmp_path / "tiny.yaml", task={"name": "digits", "max_train": 64, "max_eval": 32},
                               train={"epochs": 3, "batch_size": 32, "lr": 0.003, "checkpoint_every": 4})
    recipe = load_recipes(recipe_file, [f"output_dir={tmp_path}", "eval.check_examples=0"])[0]
    first = execute(recipe)
    run_dir = tmp_path / "tiny"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_4", "step_6"]
    weights = load_file(run_dir / "model.safetensors")
    with caplog.at_level("INFO", logger="unirobust"):
        again = execute(recipe, resume=True)
    assert "resumed from" in caplog.text and "(step 6 of 6)" in caplog.text
    assert again["train"]["history"] == first["train"]["history"] and again["processes"] == 1
    assert again["eval"]["robust_accuracy"] == first["eval"]["robust_accuracy"]
    for k, v in load_file(run_dir / "model.safetensors").items():
        assert torch.equal(v, weights[k])


def test_checkpoints_ignore_half_written_folders(tmp_path):
    from unirobust.train import checkpoints, latest_checkpoint

    for name in ("step_2", "step_10", "step_12.tmp", "step_x", "step_4"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_4" / "trainer_state.json").unlink()  # killed before its state
    assert [p.name for p in checkpoints(tmp_path)] == ["step_2", "step_10"]
    assert latest_checkpoint(tmp_path).name == "step_10"


def test_fresh_run_starts_clean_and_grad_accum_keeps_every_epoch(tmp_path):
    """4 batches per epoch with grad_accum 3: 2 optimizer steps per epoch (accelerate syncs at the end
    of the loader), so 2 epochs are 4 steps. A fresh run into a used folder drops its checkpoints
    and results (they would pass for this run's)."""
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints" / "step_99").mkdir(parents=True)
    (run / "checkpoints" / "step_99" / "trainer_state.json").write_text('{"step": 99}')
    (run / "metrics.json").write_text("{}")
    (run / "eval.json").write_text("{}")
    (run / "on-other").mkdir()
    (run / "on-other" / "eval.json").write_text("{}")
    recipe_file = write_recipe(tmp_path / "tiny.yaml", output_dir=str(tmp_path / "runs"))
    recipe = load_recipes(recipe_file, ["task.max_train=128", "train.grad_accum=3", "train.checkpoint_every=2",
                                        "defense.name=erm", "defense.attack=null"])[0]
    metrics = execute(recipe, evaluate_after=False)
    assert metrics["train"]["steps"] == 4
    assert [h["epoch"] for h in metrics["train"]["history"]] == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not (run / "eval.json").exists() and not (run / "on-other").exists()

    # resuming from the checkpoint at the end of an epoch (step 2), or at the very end (step 4), gives
    # the same history: the epoch the checkpoint closed is written as the run wrote it
    import shutil

    final = run / "checkpoints" / "step_4"
    shutil.copytree(final, tmp_path / "step_4")
    for remove in (True, False):
        if remove:
            shutil.rmtree(final)
        elif not final.exists():
            shutil.copytree(tmp_path / "step_4", final)
        again = execute(recipe, resume=True, evaluate_after=False)
        assert again["train"]["history"] == metrics["train"]["history"]

    # a fresh run that trains nothing (train.epochs=0) drops the old checkpoints too
    untrained = load_recipes(recipe_file, ["task.max_train=128", "train.epochs=0", "defense.name=erm",
                                           "defense.attack=null"])[0]
    execute(untrained, evaluate_after=False)
    assert not (run / "checkpoints").exists() and (run / "model.safetensors").exists()


@pytest.mark.slow
def test_run_folder_and_eval_of_saved_run(tmp_path):
    from unirobust.cli import main

    recipe = write_recipe(tmp_path / "tiny.yaml", output_dir=str(tmp_path / "runs"))
    assert main(["run", str(recipe), "train.epochs=1", "train.checkpoint_every=null"]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in ("recipe.yaml", "metrics.json", "report.md", "model.safetensors", "log.txt", "per_class.png"):
        assert (run / name).exists(), name
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["defense"]["attack"]["steps"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seed"] == 0 and metrics["environment"]["packages"]["torch"]
    assert metrics["environment"]["packages"]["pydantic"]
    assert metrics["eval"]["n"] == 96 and len(metrics["eval"]["per_class"]) == 10
    log = (run / "log.txt").read_text()
    assert "timm:test_resnet" in log and "clean accuracy" in log

    # Evaluating the saved run reproduces the run's own evaluation (deterministic attack).
    out = tmp_path / "again.json"
    assert main(["eval", str(run), "--output", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["clean_accuracy"] == metrics["eval"]["clean_accuracy"]
    assert again["robust_accuracy"] == metrics["eval"]["robust_accuracy"]

    # Random starts are seeded: the same numbers on every call; eval.json says what was run.
    random_start = ["--attack", "pgd:eps=0.1,steps=1", "--attack", "pgd:eps=0.1,steps=1"]
    results = []
    for i in range(2):
        assert main(["eval", str(run), *random_start, "--output", str(tmp_path / f"r{i}.json")]) == 0
        results.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    assert results[0]["robust_accuracy"] == results[1]["robust_accuracy"]
    assert results[0]["seed"] == 0 and results[0]["threat"]["eps"] == 0.1 and results[0]["environment"]["packages"]
    assert list(results[0]["attacks"]) == ["pgd(eps=0.1, steps=1)", "pgd(eps=0.1, steps=1) #2"]  # both ran
    pgd = results[0]["attacks"]["pgd(eps=0.1, steps=1)"]  # every parameter, defaults included
    assert pgd["eps"] == 0.1 and pgd["steps"] == 1 and pgd["norm"] == "linf" and pgd["random_start"] is True
    (recipe_pgd,) = metrics["eval"]["attacks"].values()  # the run's own evaluation records them too
    assert recipe_pgd["eps"] == resolved["task"]["threat"]["eps"] and recipe_pgd["random_start"] is False

    # Bad input is a usage error (exit 2) before any work, not a traceback.
    assert main(["eval", str(run), "--attack", "pgd:eps=-1"]) == 2
    assert main(["eval", str(run), "--task", "sst2-sample"]) == 2  # a vision run on a text task
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run), "--max-examples", "-5"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_two_processes_report_the_same_metrics(tmp_path):
    """A real 2-process gloo job (accelerate launch --multi_gpu) on CPU: its evaluation of a trained
    run equals the 1-process evaluation (sharding, padding duplicates and gathering are exact), and a
    2-process training run finishes and evaluates every example once."""
    recipe = write_recipe(tmp_path / "tiny.yaml", output_dir=str(tmp_path / "runs"))
    cli = [sys.executable, "-m", "unirobust.cli"]
    subprocess.run([*cli, "run", str(recipe), "train.epochs=1"], check=True, capture_output=True)
    single = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["eval"]

    launch = [*cli, "launch", "--multi_gpu", "--num_processes", "2", "--"]
    out = tmp_path / "two.json"
    # 96 examples in batches of 40: uneven shards, so the padding duplicates must be dropped
    res = subprocess.run([*launch, "eval", str(tmp_path / "runs" / "tiny"), "--batch-size", "40", "--output", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["n"] == single["n"] == 96
    for key in ("clean_accuracy", "robust_accuracy", "per_class"):
        assert two[key] == single[key], key

    # 200 training examples in batches of 32: the last batch (8) is filled up with 24 repeated ones
    res = subprocess.run([*launch, "run", str(recipe), f"output_dir={tmp_path / 'ddp'}", "train.epochs=1",
                          "task.max_train=200"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "tiny" / "metrics.json").read_text())
    assert ddp["eval"]["n"] == 96 and ddp["train"]["steps"] == 7
    epoch = ddp["train"]["history"][0]
    assert epoch["examples"] == 200  # the repeated examples are not counted
    assert abs(epoch["train_accuracy"] * 200 - round(epoch["train_accuracy"] * 200)) < 1e-6
    assert res.stdout.count("| tiny |") == 1  # the summary table is printed once, by the main process


def test_monitor_measures_in_eval_mode_and_leaves_batchnorm_alone():
    """The per-epoch monitor must score like evaluation: BatchNorm running statistics unchanged,
    the model's training mode and the global RNG restored."""
    from torch import nn

    from unirobust.models.vision import VisionAdapter
    from unirobust.monitor import RobustMonitor
    from unirobust.tasks import ThreatModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    adapter = VisionAdapter(net, 3, [0.5], [0.5])
    data = [{"image": torch.rand(1, 8, 8).numpy(), "label": i % 3} for i in range(12)]
    monitor = RobustMonitor(data, adapter.collate, 12, ThreatModel(eps=0.1, steps=2), "cpu")
    adapter.train()
    before = net[1].running_mean.clone(), net[1].num_batches_tracked.clone()
    rng = torch.get_rng_state()
    out = monitor.check(adapter, epoch=0)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is not shifted by measuring
    assert adapter.training
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].num_batches_tracked, before[1])
    assert {"monitor_pgd_accuracy", "monitor_fgsm_accuracy"} <= set(out)


def test_recipe_hash_names_what_training_depends_on(tmp_path):
    """``--resume`` accepts the run's own recipe.yaml (task written out) and changed evaluation or
    checkpointing settings, and refuses anything that changes training."""
    from unirobust.recipe import load_recipes, validate
    from unirobust.train import recipe_hash

    recipe_file = write_recipe(tmp_path / "tiny.yaml")
    base = recipe_hash(load_recipes(recipe_file)[0])
    saved = validate(yaml.safe_load(load_recipes(recipe_file)[0].to_yaml()))
    assert recipe_hash(saved) == base
    for same in (["task.max_eval=10"], ["train.checkpoint_every=7"], ["eval.batch_size=8"], ["output_dir=elsewhere"],
                 ["train.num_workers=2"]):
        assert recipe_hash(load_recipes(recipe_file, same)[0]) == base, same
    for other in (["train.lr=0.1"], ["seed=1"], ["task.max_train=100"], ["defense.attack.steps=3"],
                  ["task.threat.eps=0.2"]):
        assert recipe_hash(load_recipes(recipe_file, other)[0]) != base, other


def test_atomic_writes_keep_the_umask_mode_and_leave_nothing_behind(tmp_path):
    import os

    from unirobust.report import atomic_path, atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
        with pytest.raises(Crash):
            with atomic_path(tmp_path / "a.json") as tmp:
                Path(tmp).write_text("half")
                raise Crash("interrupted")
        assert (tmp_path / "a.json").read_text() == "{}"  # the old file stands
        assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left
    finally:
        os.umask(old)


def test_study_summary_tables_and_plots_every_variant(tmp_path):
    """A recipe with variants on two tasks: summary.md holds one row per run with its own metrics,
    names each run's task, and links the bar chart it wrote."""
    from unirobust.cli import main

    import numpy as np

    rng = np.random.default_rng(0)  # a second task: 20 random 1 x 8 x 8 images of 4 classes
    np.savez(tmp_path / "noise.npz", images=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), labels=np.arange(20) % 4)
    (tmp_path / "noise.yaml").write_text(yaml.safe_dump({
        "name": "noise", "modality": "vision", "labels": list("abcd"), "image_shape": [1, 8, 8],
        "threat": {"eps": 0.1}, "source": {"loader": "npz", "path": str(tmp_path / "noise.npz"),
                                           "holdout": {"test": 0.5}}}))
    raw = json.loads(json.dumps(TINY))
    raw.update(output_dir=str(tmp_path), train={"epochs": 0},
               eval={"batch_size": 32, "check_examples": 0, "attacks": [{"name": "fgsm"}]},
               variants=[{"name": "digits"},
                         {"name": "noise", "task": {"name": str(tmp_path / "noise.yaml")}}])
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe)]) == 0
    summary = (tmp_path / "tiny" / "summary.md").read_text()
    for variant, task in (("digits", "digits"), ("noise", "noise")):
        ev = json.loads((tmp_path / "tiny" / variant / "metrics.json").read_text())["eval"]
        flag = " ⚠" if ev.get("prediction_warning") else ""  # an untrained model may give every image one class
        row = next(line for line in summary.splitlines() if line.startswith(f"| tiny/{variant}{flag} | "))
        assert row.startswith(f"| tiny/{variant}{flag} | {task} | {ev['n']} | {100 * ev['clean_accuracy']:.1f} | "
                              f"{100 * ev['robust_accuracy']:.1f} | ")
        assert (f"- ⚠ tiny/{variant}: the model predicts" in summary) == bool(flag)
    assert "![clean and robust accuracy of every run](summary.png)" in summary
    assert (tmp_path / "tiny" / "summary.png").stat().st_size > 0


def test_real_examples_leave_out_the_last_batch_padding():
    """accelerate fills a multi-process epoch's last global batch up with repeated examples; the
    real ones come first, and rank r holds slice r. 200 examples, global batch 32 on 2 ranks: the
    last batch holds 8 real ones, all on rank 0."""
    from types import SimpleNamespace

    from unirobust.train import real_examples

    def acc(rank, world, last, remainder):
        return SimpleNamespace(num_processes=world, process_index=rank,
                               gradient_state=SimpleNamespace(end_of_dataloader=last, remainder=remainder))

    assert [real_examples(acc(r, 2, True, 8), 16) for r in (0, 1)] == [8, 0]
    assert [real_examples(acc(r, 2, True, 24), 16) for r in (0, 1)] == [16, 8]
    assert [real_examples(acc(r, 2, False, 24), 16) for r in (0, 1)] == [16, 16]  # not the last batch
    assert [real_examples(acc(r, 4, True, 0), 8) for r in range(4)] == [8] * 4  # an even split: no padding
    assert real_examples(acc(0, 1, True, 8), 8) == 8  # one process: the last batch is just short


@pytest.mark.parametrize("bad", ["model option", "data"])
def test_a_run_that_cannot_start_leaves_the_earlier_run_whole(tmp_path, bad):
    """A bad model option or unreadable data is found before the folder is cleared: the earlier
    run's weights, metrics and recipe stay."""
    import numpy as np

    from unirobust.models.base import ModelSpecError
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute
    from unirobust.tasks import TaskError

    recipe_file = write_recipe(tmp_path / "tiny.yaml", output_dir=str(tmp_path))
    execute(load_recipes(recipe_file, ["train.epochs=0", "eval.check_examples=0"])[0])
    run_dir = tmp_path / "tiny"
    before = {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "metrics.json", "recipe.yaml")}
    if bad == "model option":
        overrides, error = ["model.options.drop_rat=0.1"], ModelSpecError
    else:  # a file that exists (validation passes) without the arrays the loader reads
        np.savez(tmp_path / "x.npz", pictures=np.zeros((4, 8, 8), np.uint8))
        task = {"name": "mine", "modality": "vision", "labels": list("0123456789"), "image_shape": [1, 8, 8],
                "threat": {"norm": "linf", "eps": 0.1}, "source": {"loader": "npz", "path": str(tmp_path / "x.npz")}}
        overrides, error = [f"task={json.dumps(task)}"], TaskError
    with pytest.raises(error):
        execute(load_recipes(recipe_file, ["train.epochs=0", *overrides])[0])
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_batch_that_does_not_split_over_the_processes_is_a_recipe_error():
    from types import SimpleNamespace

    from unirobust.recipe import validate
    from unirobust.train import check_batch_split

    recipe = validate(dict(TINY, train={"batch_size": 33}))
    check_batch_split(recipe, SimpleNamespace(num_processes=1))
    with pytest.raises(RecipeError, match="batch_size 33 must be divisible by 2 processes"):
        check_batch_split(recipe, SimpleNamespace(num_processes=2))


@pytest.mark.slow
def test_image_files_train_the_same_with_loader_workers(tmp_path, monkeypatch):
    """``loader: imagefolder`` decodes files as batches are read; ``train.num_workers`` reads them in
    other processes, and the trained model must be the same as with none."""
    import os

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    digits = load_digits()
    for i in range(96):
        path = tmp_path / "photos" / str(digits.target[i]) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
    task = {"name": "photos", "modality": "vision", "labels": [f"d{k}" for k in range(10)], "image_shape": [1, 8, 8],
            "threat": {"eps": 0.1}, "source": {"loader": "imagefolder", "path": str(tmp_path / "photos"),
                                               "holdout": {"validation": 0.25}}}
    (tmp_path / "photos.yaml").write_text(yaml.safe_dump(task))
    recipe_file = write_recipe(tmp_path / "tiny.yaml", task={"name": str(tmp_path / "photos.yaml")})
    import unirobust.tasks

    readers = tmp_path / "readers.txt"
    read_image = unirobust.tasks.read_image

    def recorded_read(*args):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read_image(*args)

    monkeypatch.setattr(unirobust.tasks, "read_image", recorded_read)
    weights = {}
    for workers in (0, 2):
        readers.unlink(missing_ok=True)
        recipe = load_recipes(recipe_file, [f"output_dir={tmp_path / str(workers)}", f"train.num_workers={workers}",
                                            "defense.name=erm", "defense.attack=null"])[0]
        metrics = execute(recipe, evaluate_after=False)
        assert metrics["train"]["history"][-1]["examples"] == 72
        weights[workers] = load_file(tmp_path / str(workers) / "tiny" / "model.safetensors")
        other_processes = set(readers.read_text().split()) - {str(os.getpid())}
        assert len(other_processes) == workers
    assert weights[0].keys() == weights[2].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[2][name], rtol=0, atol=0)


def test_monitor_on_a_task_with_one_held_out_split_warns_it_watches_the_test_set(tmp_path, caplog):
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute
    from unirobust.tasks import get_task, load_task

    assert load_task(get_task("sst2-sample", {"max_eval": 8})).one_held_out  # dev is validation and test
    assert not load_task(get_task("digits")).one_held_out
    recipe_file = write_recipe(tmp_path / "tiny.yaml", task={"name": "digits", "max_train": 32, "max_eval": 16},
                               train={"epochs": 1, "batch_size": 32, "monitor_examples": 8})
    for holdout, warned in (({"validation": 0.2, "test": 0.2}, False), ({"validation": None, "test": 0.2}, True)):
        caplog.clear()
        recipe = load_recipes(recipe_file, [f"output_dir={tmp_path}", "eval.attacks=[]",
                                            f"task.source.holdout={json.dumps(holdout)}"])[0]
        with caplog.at_level("WARNING", logger="unirobust"):
            execute(recipe, evaluate_after=False)
        assert ("watches the test set" in caplog.text) == warned


def test_accelerators_of_other_precisions_in_one_process_and_fp16_on_cpu(caplog):
    """A study's variants may ask for other precisions in one process (accelerate refused a second
    precision); fp16 on CPU computes in fp32 (accelerate turns autocast off): warned, and the precision
    recorded is the one used."""
    from types import SimpleNamespace

    from unirobust.train import make_accelerator, precision_used

    def recipe(precision):
        return SimpleNamespace(train=SimpleNamespace(grad_accum=1, mixed_precision=precision))

    assert precision_used(make_accelerator(recipe("no"))) == "no"
    bf16 = make_accelerator(recipe("bf16"))
    assert precision_used(bf16) == "bf16" and bf16.native_amp
    with caplog.at_level("WARNING"):
        fp16 = make_accelerator(recipe("fp16"))
    if fp16.device.type == "cpu":
        assert precision_used(fp16) == "no" and "mixed_precision=fp16 has no effect on cpu" in caplog.text
    assert precision_used(make_accelerator(recipe("no"))) == "no"

    from unirobust.recipe import TrainConfig

    assert TrainConfig(mixed_precision=False).mixed_precision == "no"  # `train.mixed_precision=no`, as YAML reads it


def test_resume_of_a_run_finished_without_checkpoints_evaluates_it_again(tmp_path, monkeypatch):
    """A study resumed with --resume retrained its finished variants when they kept no checkpoint; now
    a run trained to the end with the same training recipe is evaluated again, not retrained, while
    a run with another training recipe still trains from the start."""
    from unirobust import train
    from unirobust.recipe import load_recipes
    from unirobust.runs import execute

    recipe_file = write_recipe(tmp_path / "tiny.yaml", train={"epochs": 1, "batch_size": 64, "lr": 0.003})
    first = execute(load_recipes(recipe_file, [f"output_dir={tmp_path}"])[0])
    weights = load_file(tmp_path / "tiny" / "model.safetensors")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "fit", no_training)
    other_eval = load_recipes(recipe_file, [f"output_dir={tmp_path}", "eval.max_examples=48"])[0]
    again = execute(other_eval, resume=True)  # evaluation settings may differ
    assert again["train"] == first["train"] and again["eval"]["n"] == 48
    for k, v in load_file(tmp_path / "tiny" / "model.safetensors").items():
        assert torch.equal(v, weights[k])
    with pytest.raises(AssertionError, match="trained again"):  # another learning rate: trained from the start
        execute(load_recipes(recipe_file, [f"output_dir={tmp_path}", "train.lr=0.001"])[0], resume=True)
