"""Recipes (unirobust/recipe.py): shipped files validate, overrides are typed, variants, readable errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unirobust.recipe import RecipeError, apply_overrides, load_recipes, parse_override
from unirobust.registry import ATTACKS, DEFENSES, MODELS
from unirobust.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
TASKS = sorted((REPO / "tasks").glob("*.yaml"))
DIGITS = REPO / "recipes" / "digits_pgd_at.yaml"


def test_something_is_shipped():
    assert len(RECIPES) >= 2 and len(TASKS) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipe_validates(path):
    recipes = load_recipes(path)
    assert recipes
    for r in recipes:
        assert r.resolved_task.name == r.task.name
    # first line names the command that runs it
    first = path.read_text().splitlines()[0]
    assert first == f"# unirobust run {path.relative_to(REPO)}"


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_shipped_task_validates(path):
    task = get_task(path.stem)
    assert task.name == path.stem
    assert task == get_task(str(path))
    assert task.threat.eps > 0


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipes(DIGITS)[0]
    saved = tmp_path / "recipe.yaml"
    saved.write_text(recipe.to_yaml())
    again = load_recipes(saved)[0]
    assert again.model_dump(exclude={"task"}) == recipe.model_dump(exclude={"task"})
    assert again.resolved_task == recipe.resolved_task
    assert again.to_yaml() == recipe.to_yaml()  # a fixed point: saving the reloaded recipe changes nothing


# ----------------------------------------------------------------------------- overrides


def test_resolved_recipe_holds_the_whole_task(tmp_path, monkeypatch):
    """A run folder's recipe.yaml means the same task and threat model from any directory, even when
    a task file of the same name there says otherwise (task files are looked up in ./tasks first)."""
    from unirobust.recipe import validate

    recipe = load_recipes(REPO / "recipes" / "digits_pgd_at.yaml", ["task.threat.eps=0.05"])[0]
    saved = yaml.safe_load(recipe.to_yaml())
    assert saved["task"]["threat"]["eps"] == 0.05 and saved["task"]["modality"] == "vision"
    other = tmp_path / "tasks"
    other.mkdir()
    task_file = yaml.safe_load((REPO / "tasks" / "digits.yaml").read_text())
    task_file["threat"]["eps"] = 0.3
    (other / "digits.yaml").write_text(yaml.safe_dump(task_file))
    monkeypatch.chdir(tmp_path)
    assert get_task("digits").threat.eps == 0.3  # the local file wins for a recipe naming the task
    again = validate(saved)
    assert again.resolved_task == recipe.resolved_task and again.resolved_task.threat.eps == 0.05


def test_run_folder_with_another_task_name_reads_that_task(tmp_path, monkeypatch, make_run):
    """``unirobust eval runs/x task.name=advglue-sst2`` (as the AdvGLUE task files say): the run's
    recorded task is replaced by the named task's own file, not kept under the new name; other
    ``task.*`` overrides still apply."""
    from unirobust.runs import load_run

    run, _, _ = make_run(tmp_path / "runs" / "r", {"name": "r", "task": {"name": "digits", "threat": {"eps": 0.05}},
                                                   "model": {"spec": "timm:test_resnet"}})
    (tmp_path / "tasks").mkdir()
    other = yaml.safe_load((REPO / "tasks" / "digits.yaml").read_text())
    other["name"], other["threat"]["eps"] = "digits-other", 0.2
    other["source"]["seed"] = 7
    (tmp_path / "tasks" / "digits-other.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)
    same, _ = load_run(run, ["task.max_eval=9"])
    assert same.resolved_task.name == "digits" and same.resolved_task.threat.eps == 0.05
    moved, _ = load_run(run, ["task.name=digits-other", "task.max_eval=9"])
    task = moved.resolved_task
    assert (task.name, task.threat.eps, task.source.seed, task.max_eval) == ("digits-other", 0.2, 7, 9)
    with pytest.raises(RecipeError, match=r"trained on 'digits', which differs from 'sst2-sample' in modality "
                                          r"\(vision vs text\)"):
        load_run(run, ["task.name=sst2-sample"])
    reversed_labels = dict(other, name="digits-reversed", labels=list(reversed(other["labels"])))
    (tmp_path / "tasks" / "digits-reversed.yaml").write_text(yaml.safe_dump(reversed_labels))
    with pytest.raises(RecipeError, match="differs from .digits-reversed. in labels"):  # same count, other order
        load_run(run, ["task.name=digits-reversed"])
    bigger = dict(other, name="digits-big", image_shape=[1, 16, 16])
    (tmp_path / "tasks" / "digits-big.yaml").write_text(yaml.safe_dump(bigger))
    with pytest.raises(RecipeError, match="in image_shape"):
        load_run(run, ["task.name=digits-big"])


def test_run_folder_on_another_task_keeps_its_prompt_and_needs_no_training_data(tmp_path, monkeypatch, bert_config,
                                                                                 tokenizer, make_run):
    """A prompt head built from the trained task's templates and verbalizer keeps them on another task
    (which may have none, or others); the trained task's data need not exist any more."""
    from transformers import BertModel

    from unirobust.runs import load_run

    folder = tmp_path / "tiny"
    BertModel(bert_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "data").mkdir()
    rows = "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(8))
    (tmp_path / "data" / "train.tsv").write_text(rows)
    (tmp_path / "data" / "dev.tsv").write_text(rows)
    mine = {"name": "mine", "modality": "text", "text_fields": ["sentence"], "labels": ["negative", "positive"],
            "threat": {"eps": 0.05},
            "templates": ["{sentence} It was [MASK]."], "verbalizer": {"negative": ["terrible"], "positive": ["great"]},
            "source": {"loader": "local", "path": str(tmp_path / "data"),
                       "splits": {"train": "train.tsv", "validation": "dev.tsv"}}}
    run, _, _ = make_run(tmp_path / "runs" / "p", {"name": "p", "task": mine,
                                                   "model": {"spec": f"hf:{folder}", "options": {"head": "prompt"}}})
    (tmp_path / "data" / "train.tsv").unlink()  # the training data is gone
    monkeypatch.chdir(REPO)
    moved, adapter = load_run(run, ["task.name=sst2-sample"])  # sst2-sample has no templates or verbalizer
    assert moved.resolved_task.name == "sst2-sample"
    assert adapter.templates == ["{sentence} It was [MASK]."] and adapter.verbalizer == [["terrible"], ["great"]]


def test_overrides_are_typed():
    r = load_recipes(DIGITS, ["train.epochs=1", "defense.attack.eps=0.1", "train.lr=0.01",
                              "eval.attacks=[{name: fgsm}, {name: pgd, steps: 3, label: strong}]",
                              "model.options.drop_rate=0.2", "task.max_eval=50"])[0]
    assert r.train.epochs == 1 and isinstance(r.train.epochs, int)
    assert r.defense.attack.eps == 0.1 and isinstance(r.defense.attack.eps, float)
    assert r.train.lr == 0.01
    assert [a.name for a in r.eval.attacks] == ["fgsm", "pgd"]
    assert r.eval.attacks[1].steps == 3 and r.eval.attacks[1].title() == "strong"
    assert r.model.options == {"drop_rate": 0.2}
    assert r.resolved_task.max_eval == 50
    # untouched fields keep the file's values
    assert r.defense.attack.steps == 7 and r.train.batch_size == 64


def test_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-2 as a string; recipes, overrides and --attack read it as a number."""
    from unirobust.cli import parse_attack

    assert parse_override("defense.attack.eps=1e-2") == (["defense", "attack", "eps"], 0.01)
    assert parse_attack("pgd:eps=2E-3,steps=3") == {"name": "pgd", "eps": 0.002, "steps": 3}
    assert parse_override("name=run1e5x")[1] == "run1e5x" and parse_override("seed=12")[1] == 12
    recipe = load_recipes(DIGITS, ["defense.attack.alpha=1e-2"])[0]
    assert yaml.safe_load(recipe.to_yaml())["defense"]["attack"]["alpha"] == 0.01


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=text") == (["a"], "text")
    assert parse_override("a=") == (["a"], "")
    for bad in ("noequals", "=3"):
        with pytest.raises(RecipeError, match="key.sub=value"):
            parse_override(bad)


def test_apply_overrides_does_not_mutate():
    raw = {"train": {"epochs": 3}, "name": "x"}
    out = apply_overrides(raw, ["train.epochs=1", "eval.split=validation"])
    assert out == {"train": {"epochs": 1}, "name": "x", "eval": {"split": "validation"}}
    assert raw == {"train": {"epochs": 3}, "name": "x"}


# ----------------------------------------------------------------------------- variants


def write(tmp_path, raw: dict, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BASE = {"name": "cmp", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"},
        "train": {"epochs": 2}}


def test_variants_expand_into_named_runs(tmp_path):
    raw = dict(BASE, variants=[{"name": "erm"},
                               {"name": "pgd-at", "defense": {"name": "pgd-at", "attack": {"name": "pgd", "steps": 3}}},
                               {"name": "short", "train": {"epochs": 1}}])
    recipes = load_recipes(write(tmp_path, raw), ["train.batch_size=16"])
    assert [r.name for r in recipes] == ["cmp/erm", "cmp/pgd-at", "cmp/short"]
    assert [r.defense.name for r in recipes] == ["erm", "pgd-at", "erm"]
    assert recipes[1].defense.attack.steps == 3
    assert [r.train.epochs for r in recipes] == [2, 2, 1]  # nested keys merge, the rest is kept
    assert all(r.train.batch_size == 16 for r in recipes)  # overrides apply to every variant


def test_single_unnamed_variant_keeps_name(tmp_path):
    recipes = load_recipes(write(tmp_path, dict(BASE, variants=[{"seed": 3}])))
    assert [(r.name, r.seed) for r in recipes] == [("cmp", 3)]


def test_variants_need_names(tmp_path):
    with pytest.raises(RecipeError, match="every variant needs a name"):
        load_recipes(write(tmp_path, dict(BASE, variants=[{"name": "a"}, {"seed": 1}])))
    with pytest.raises(RecipeError, match="variants must be a list"):
        load_recipes(write(tmp_path, dict(BASE, variants={"a": {}})))
    with pytest.raises(RecipeError, match="variant name.s. eps used twice"):  # one run folder, one summary row
        load_recipes(write(tmp_path, dict(BASE, variants=[{"name": "eps"}, {"name": "eps", "seed": 1}])))


def test_seed_range_is_checked_before_the_run(tmp_path):
    for bad in (-1, 2**32):
        with pytest.raises(RecipeError, match="seed"):
            load_recipes(write(tmp_path, dict(BASE, seed=bad)))
        with pytest.raises(RecipeError, match="task.source.seed"):
            load_recipes(write(tmp_path, dict(BASE, task={"name": "digits", "source": {"seed": bad}})))
    assert load_recipes(write(tmp_path, dict(BASE, seed=2**32 - 1)))[0].seed == 2**32 - 1


def test_bad_variant_is_named(tmp_path):
    raw = dict(BASE, variants=[{"name": "ok"}, {"name": "broken", "train": {"epochs": -1}}])
    with pytest.raises(RecipeError) as err:
        load_recipes(write(tmp_path, raw))
    assert "broken" in str(err.value) and "train.epochs" in str(err.value)


# ----------------------------------------------------------------------------- errors


def error_of(overrides, path=DIGITS) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipes(path, overrides)
    msg = str(err.value)
    assert "Traceback" not in msg and str(path) in msg.splitlines()[0]
    return msg


@pytest.mark.parametrize("overrides,expected", [
    (["colour=blue"], ["colour", "Extra inputs are not permitted"]),
    (["name=../elsewhere"], ["name", "inside output_dir"]),
    (["name=/tmp/x"], ["name", "inside output_dir"]),
    (["train.epochs=abc"], ["train.epochs", "valid integer", "'abc'"]),
    (["train.optimizer=adam"], ["train.optimizer", "adamw", "sgd"]),
    (["train.epoch=3"], ["train.epoch", "Extra inputs"]),
    (["defense.attack.eps=-0.1"], ["eps", "greater than or equal to 0", "-0.1"]),
    (["eval.attacks=[{name: pgd, eps: -0.5}]"], ["eps", "greater than or equal to 0", "-0.5"]),
    (["eval.attacks=[{name: pgd, stepz: 3}]"], ["stepz"]),
    (["task.name=nosuchtask"], ["unknown task 'nosuchtask'", "digits", "sst2-sample", "animal-mnist"]),
    (["eval.attacks=[{name: no-such-attack}]"], ["unknown attack 'no-such-attack'", *ATTACKS.names()]),
    (["defense.attack.name=no-such-attack"], ["unknown attack 'no-such-attack'", *ATTACKS.names()]),
    (["defense.name=no-such-defense"], ["unknown defense 'no-such-defense'", *DEFENSES.names()]),
    (["task.name=animal-mnist", "task.source.path=/nonexistent.npz"], ["data file not found", "/nonexistent.npz"]),
    (["model.spec=nosource:resnet"], ["unknown model source 'nosource'", *MODELS.names()]),
    (["task.threat.eps=-1"], ["eps", "greater than or equal to 0"]),
    (["name=has space"], ["name", "pattern"]),
])
def test_bad_recipe_message(overrides, expected):
    assert {"fgsm", "pgd"} <= set(ATTACKS.names()) and {"erm", "pgd-at"} <= set(DEFENSES.names())
    msg = error_of(overrides)
    for piece in expected:
        assert piece in msg, f"{piece!r} not in:\n{msg}"
    assert len(msg.splitlines()) <= 4, msg


def test_all_field_errors_reported_at_once():
    msg = error_of(["colour=blue", "train.epochs=abc"])
    assert "colour" in msg and "train.epochs" in msg


def test_attack_budget_error_names_field_path():
    assert "defense.attack.eps" in error_of(["defense.attack.eps=-0.1"])
    assert "eval.attacks.0.eps" in error_of(["eval.attacks=[{name: pgd, eps: -0.5}]"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipes(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipes(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipes(bad)


def test_missing_required_fields(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipes(write(tmp_path, {"name": "x", "task": {"name": "digits"}}))
    assert "model" in str(err.value) and "Field required" in str(err.value)


def test_defense_without_attack_given_one():
    msg = error_of(["defense.name=erm"])
    assert "takes no attack" in msg


def test_checks_of_built_objects_against_the_task_come_before_the_run(tmp_path):
    """ADP's log-det term on 2 classes and a relative budget on pixels fail validation, not the first
    training step (after a fresh run has cleared its folder) or the evaluation after training."""
    adp = {"name": "a", "task": {"name": "sst2-sample"}, "model": {"spec": "hf:sentence-transformers/all-MiniLM-L6-v2",
                                                                   "ensemble": 2}, "defense": {"name": "adp"}}
    with pytest.raises(RecipeError, match=r"defense.*constant with 2 classes"):
        load_recipes(write(tmp_path, adp))
    assert load_recipes(write(tmp_path, dict(adp, defense={"name": "adp", "beta": 0.0})))
    for where in ({"eval": {"attacks": [{"name": "pgd", "norm": "l2", "eps": 0.5, "relative": True}]}},
                  {"defense": {"name": "pgd-at", "attack": {"name": "pgd", "relative": True}}}):
        with pytest.raises(RecipeError, match="relative budgets .* is vision"):
            load_recipes(write(tmp_path, dict(BASE, **where)))


def test_override_slips_are_named(tmp_path):
    """``{name:fgsm}`` (no space: YAML's one key 'name:fgsm'), a misspelt attack parameter, and
    ``variants=null`` (the base recipe alone, not an unknown field)."""
    path = write(tmp_path, dict(BASE, variants=[{"name": "a"}, {"name": "b", "seed": 3}]))
    with pytest.raises(RecipeError, match=r"eval.attacks.0.name: Field required \(YAML read 'name:fgsm' as one key"):
        load_recipes(path, ["eval.attacks=[{name:fgsm}]"])
    with pytest.raises(RecipeError, match="eval.attacks.0: pgd has no parameter epss; its parameters: alpha, .*eps,"):
        load_recipes(path, ["eval.attacks=[{name: pgd, epss: 0.1}]"])
    assert [r.name for r in load_recipes(path)] == ["cmp/a", "cmp/b"]
    assert [r.name for r in load_recipes(path, ["variants=null", "seed=5"])] == ["cmp"]
    assert [(r.name, r.seed) for r in load_recipes(path, ["variants.1.seed=4"])] == [("cmp/a", 0), ("cmp/b", 4)]


def test_gradient_word_importance_on_a_prompt_head_is_refused_before_the_run(tmp_path):
    """discrete-at's A2T ranks words by gradient, which a prompt head (its input rewritten by a
    template) cannot give: the recipe is refused, not the first training step after the folder was cleared."""
    prompt = {"spec": "hf:sentence-transformers/all-MiniLM-L6-v2",
              "options": {"head": "prompt", "templates": ["{sentence} It was [MASK]."],
                          "verbalizer": {"negative": ["terrible"], "positive": ["great"]}}}
    raw = {"name": "p", "task": {"name": "sst2-sample"}, "model": prompt, "defense": {"name": "discrete-at"}}
    with pytest.raises(RecipeError, match="defense.wir: gradient word importance needs a plain classifier head"):
        load_recipes(write(tmp_path, raw))
    assert load_recipes(write(tmp_path, dict(raw, defense={"name": "discrete-at", "attack": {"name": "a2t",
                                                                                           "wir": "delete"}})))
    with pytest.raises(RecipeError, match=r"eval.attacks.0.wir: gradient"):
        load_recipes(write(tmp_path, dict(raw, defense={"name": "erm"}, eval={"attacks": [{"name": "a2t"}]})))


def test_a_variant_with_another_kind_of_model_does_not_take_the_base_model_options(tmp_path):
    """Text options of the base (max_length) reached a timm variant, which then failed only after the
    other variants had run; variants of the same kind still merge the base's options."""
    from unirobust.recipe import load_recipes

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "study", "task": {"name": "sst2-sample"},
        "model": {"spec": "hf:sentence-transformers/all-MiniLM-L6-v2", "options": {"max_length": 48}},
        "variants": [{"name": "text", "model": {"options": {"head": "prompt"}}},
                     {"name": "vision", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"}},
                     {"name": "vision_own", "task": {"name": "digits"},
                      "model": {"spec": "timm:test_resnet", "options": {"drop_rate": 0.1}}}]}))
    text, vision, own = load_recipes(path)
    assert text.model.options == {"max_length": 48, "head": "prompt"}
    assert vision.model.options == {} and own.model.options == {"drop_rate": 0.1}
