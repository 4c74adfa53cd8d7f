"""AdvGLUE (unirobust/advglue.py): the release-format loader and writer, score arithmetic, evaluation."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unirobust.advglue import (GLUE_FIELDS, AdvGLUEError, accuracy_f1, advglue_markdown, advglue_score,
                               evaluate_advglue, group_scores, load_advglue, load_advglue_task, run_advglue_eval,
                               write_advglue)

# a small file in the AdvGLUE release format: one object, keys = tasks, items = idx, label, GLUE fields
RELEASE = {
    "sst2": [{"idx": 0, "label": 0, "sentence": "the film is a dull , lifeless mess"},
             {"idx": 1, "label": 1, "sentence": "a warm and witty delight"},
             {"idx": 7, "label": 1, "sentence": "moving"}],
    "qqp": [{"idx": 0, "label": 1, "question1": "how do i learn python ?", "question2": "how to learn python ?"},
            {"idx": 1, "label": 0, "question1": "what is love ?", "question2": "where is paris ?"}],
    "mnli": [{"idx": 0, "label": 0, "premise": "a man plays a guitar", "hypothesis": "someone makes music"},
             {"idx": 1, "label": 2, "premise": "two dogs run", "hypothesis": "the dogs sleep"}],
    "mnli-mm": [{"idx": 0, "label": 1, "premise": "it rains", "hypothesis": "the game is cancelled"}],
    "qnli": [{"idx": 0, "label": 0, "question": "who wrote hamlet ?", "sentence": "hamlet was written by shakespeare ."}],
    "rte": [{"idx": 0, "label": 1, "sentence1": "the cat sat on the mat .", "sentence2": "the mat is blue ."}],
}


@pytest.fixture
def release_file(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(RELEASE))
    return path


class Constant(nn.Module):
    """A stand-in adapter that always predicts ``cls`` (for exact score arithmetic)."""

    def __init__(self, text_fields, num_classes, cls=0):
        super().__init__()
        self.text_fields, self.num_classes, self.cls = list(text_fields), num_classes, cls
        self.w = nn.Parameter(torch.zeros(1))

    def collate(self, examples):
        return {"labels": torch.tensor([e["label"] for e in examples]), "n": torch.zeros(len(examples))}

    def embed(self, batch):
        return batch["n"]

    def logits(self, z, batch):
        return nn.functional.one_hot(torch.full_like(batch["labels"], self.cls), self.num_classes).float()


# ----------------------------------------------------------------------------- reading / writing


def test_load_release_file(release_file):
    data = load_advglue(release_file)
    assert list(data) == list(RELEASE)
    for key, ds in data.items():
        assert len(ds) == len(RELEASE[key])
        for f in GLUE_FIELDS[key]:
            assert ds[f] == [item[f] for item in RELEASE[key]]
        assert ds["label"] == [item["label"] for item in RELEASE[key]]
        assert ds["idx"] == [item["idx"] for item in RELEASE[key]]
    assert list(load_advglue(release_file.parent, ["rte", "sst2"])) == ["rte", "sst2"]  # a folder holding dev.json


def test_load_errors_say_what_is_wrong(tmp_path, release_file):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sst2": [{"idx": 0, "label": 1, "text": "no sentence field"}]}))
    with pytest.raises(AdvGLUEError, match=r"sst2\[0\] lacks \['sentence'\]"):
        load_advglue(bad)
    bad.write_text(json.dumps({"cola": []}))
    with pytest.raises(AdvGLUEError, match="unknown AdvGLUE task"):
        load_advglue(bad)
    with pytest.raises(AdvGLUEError, match="not found"):
        load_advglue(tmp_path / "missing.json")
    with pytest.raises(AdvGLUEError, match="has no"):
        load_advglue({"sst2": RELEASE["sst2"]}, ["qqp"])
    for item, message in (({"idx": None, "label": 1, "sentence": None}, "not text"),
                          ({"idx": "x", "label": 1, "sentence": "fine"}, "not an integer")):
        bad.write_text(json.dumps({"sst2": [item]}))
        with pytest.raises(AdvGLUEError, match=message):
            load_advglue(bad)
    (tmp_path / "folder").mkdir()  # an existing folder is never taken for a hub id
    with pytest.raises(AdvGLUEError, match="folder without dev.json"):
        load_advglue(tmp_path / "folder")


def test_write_advglue_reloads_identically(tmp_path, release_file):
    out = write_advglue(tmp_path / "gen" / "dev.json", load_advglue(release_file))
    assert json.loads(out.read_text()) == RELEASE  # exactly the release format
    again = load_advglue(out)
    assert {k: v.to_list() for k, v in again.items()} == RELEASE
    assert [p.name for p in out.parent.iterdir()] == ["dev.json"]  # atomic: no temp file left
    # label names are accepted and written as GLUE's integers; extra keys survive
    named = {"sst2": [{"idx": 3, "label": "positive", "sentence": "fine", "method": "typo"}]}
    write_advglue(out, named)
    assert load_advglue(out)["sst2"].to_list() == [{"idx": 3, "label": 1, "sentence": "fine", "method": "typo"}]


# ----------------------------------------------------------------------------- scores


def test_score_arithmetic():
    acc, f1 = accuracy_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])  # tp 2, fp 1, fn 1, tn 1
    assert acc == pytest.approx(0.6) and f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert accuracy_f1([0, 0], [0, 0])[1] == 0.0
    results = {"sst2": {"accuracy": 0.5}, "qqp": {"accuracy": 0.6, "f1": 0.8},
               "mnli": {"accuracy": 0.3}, "mnli-mm": {"accuracy": 0.5}, "qnli": {"accuracy": 0.9}}
    assert group_scores(results) == pytest.approx({"sst2": 0.5, "qqp": 0.7, "mnli": 0.4, "qnli": 0.9})
    assert advglue_score(results) == pytest.approx((0.5 + 0.7 + 0.4 + 0.9) / 4)
    assert advglue_score({"mnli-mm": {"accuracy": 0.2}}) == pytest.approx(0.2)
    assert advglue_score({}) is None


def test_evaluate_constant_models_exactly(release_file):
    adapters = {"sst2": Constant(["sentence"], 2, cls=1), "qqp": Constant(["question1", "question2"], 2, cls=1),
                "mnli": Constant(["premise", "hypothesis"], 3, cls=0)}
    result = evaluate_advglue(adapters, release_file, benign=release_file, batch_size=2)
    t = result["tasks"]
    assert list(t) == ["sst2", "qqp", "mnli", "mnli-mm"]  # the mnli model serves mnli-mm; no model for qnli/rte
    assert t["sst2"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "benign_n": 3, "benign_accuracy": pytest.approx(2 / 3)}
    assert t["qqp"]["accuracy"] == pytest.approx(0.5) and t["qqp"]["f1"] == pytest.approx(2 / 3)
    assert t["mnli"]["accuracy"] == pytest.approx(0.5) and t["mnli-mm"]["accuracy"] == 0.0
    expected = (2 / 3 + (0.5 + 2 / 3) / 2 + (0.5 + 0.0) / 2) / 3
    assert result["score"] == pytest.approx(expected) and result["benign_score"] == pytest.approx(expected)
    table = advglue_markdown(result)
    assert "| qqp | 2 | 50.0 | 66.7 | 58.3 |" in table
    assert f"**{100 * expected:.1f}**" in table


def test_empty_tasks_score_nothing(tmp_path):
    # what advgen writes when no attack passes the filters: a task with an empty list
    path = write_advglue(tmp_path / "empty.json", {"sst2": [], "qqp": []})
    adapters = {"sst2": Constant(["sentence"], 2), "qqp": Constant(["question1", "question2"], 2)}
    result = evaluate_advglue(adapters, path)
    assert result["tasks"]["qqp"] == {"n": 0, "accuracy": None, "f1": None}
    assert result["score"] is None and result["groups"] == {}
    assert "| qqp | 0 | — | — | — |" in advglue_markdown(result)


def test_labels_are_mapped_by_name(release_file):
    task = SimpleNamespace(name="sst2-reversed", text_fields=["sentence"], labels=["positive", "negative"],
                           num_classes=2)
    # class 0 of this model is "positive": 2 of the 3 sst2 items
    result = run_advglue_eval(Constant(["sentence"], 2, cls=0), task, release_file)
    assert list(result["tasks"]) == ["sst2"]
    assert result["tasks"]["sst2"]["accuracy"] == pytest.approx(2 / 3)
    assert result["score"] == pytest.approx(2 / 3) and "AdvGLUE score" in result["markdown"]
    nli = SimpleNamespace(name="mnli", text_fields=["premise", "hypothesis"],
                          labels=["entailment", "neutral", "contradiction"], num_classes=3)
    assert list(run_advglue_eval(Constant(nli.text_fields, 3), nli, release_file)["tasks"]) == ["mnli", "mnli-mm"]
    other = SimpleNamespace(name="ag-news", text_fields=["text"], labels=list("abcd"), num_classes=4)
    with pytest.raises(AdvGLUEError, match="matches no AdvGLUE task"):
        run_advglue_eval(Constant(["text"], 4), other, release_file)


def test_evaluate_real_text_adapters(release_file, make_text_adapter, tokenizer):
    """A tiny BERT (plain head) and a prompt head, through the real collate / forward path."""
    from transformers import BertConfig, BertModel

    from unirobust.models.prompt import PromptAdapter

    sst = make_text_adapter(2, ["sentence"]).eval()
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    nli = PromptAdapter(encoder, tokenizer, 3, ["premise", "hypothesis"], ["{premise} ? [MASK] , {hypothesis}"],
                        [["yes"], ["maybe"], ["no"]], "embedding").eval()
    result = evaluate_advglue(nli, release_file)  # one adapter: the tasks its fields match
    assert list(result["tasks"]) == ["mnli", "mnli-mm"]
    data = load_advglue(release_file)
    for model, key in ((sst, "sst2"), (nli, "mnli")):
        pred = model.predict([tuple(r[f] for f in GLUE_FIELDS[key]) if len(GLUE_FIELDS[key]) > 1 else r["sentence"]
                              for r in data[key]])
        acc = (pred == torch.tensor(data[key]["label"])).float().mean().item()
        got = evaluate_advglue({key: model}, release_file, tasks=[key])["tasks"][key]["accuracy"]
        assert got == pytest.approx(acc)


def test_advglue_task_loader(release_file, tmp_path):
    task = SimpleNamespace(name="advglue-sst2", source=SimpleNamespace(path=str(release_file), name="sst2"),
                           text_fields=["sentence"], labels=["negative", "positive"], num_classes=2,
                           resolve_path=lambda p: __import__("pathlib").Path(p))
    splits = load_advglue_task(task)
    assert len(splits["train"]) == 0 and splits["validation"]["label"] == [0, 1, 1]
    assert splits["test"]["sentence"] == [r["sentence"] for r in RELEASE["sst2"]]
    task.labels = ["positive", "negative"]
    assert load_advglue_task(task)["validation"]["label"] == [1, 0, 0]
    from unirobust.registry import LOADERS

    if "advglue" in LOADERS:  # once the loader is registered, the shipped task files load offline from a file
        from unirobust.tasks import get_task, load_task

        data = load_task(get_task("advglue-sst2", {"source": {"path": str(release_file)}}))
        assert len(data.test) == 3 and len(data.train) == 0


@pytest.mark.parametrize("task,source,message", [
    ("digits", "adv_glue", "matches no AdvGLUE task"),
    ("sst2-sample", "{tmp}/missing.json", "not found"),
    ("sst2-sample", "{tmp}/qqp_only.json", "none of the AdvGLUE tasks"),
    ("sst2-sample", "", "give --advglue too"),  # --advglue-benign alone
    ("sst2-sample", "{tmp}/sst2.json --advglue-benign {tmp}/benign_typo.json", "not found"),
    ("sst2-sample", "{tmp}/sst2.json --advglue-benign {tmp}/qqp_only.json", "none of the AdvGLUE tasks"),
])
def test_eval_checks_advglue_before_attacking(capsys, tmp_path, monkeypatch, task, source, message):
    import unirobust.evaluate
    import unirobust.runs  # noqa: F401  (imported before the patch, so it keeps the real evaluate)
    from unirobust.cli import main

    write_advglue(tmp_path / "qqp_only.json", {"qqp": RELEASE["qqp"]})
    write_advglue(tmp_path / "sst2.json", {"sst2": RELEASE["sst2"]})
    attacked = []
    monkeypatch.setattr(unirobust.evaluate, "evaluate", lambda *a, **k: attacked.append(1) or {})
    spec = "timm:test_resnet" if task == "digits" else "hf:sentence-transformers/all-MiniLM-L6-v2"
    advglue = ["--advglue", *source.format(tmp=tmp_path).split()] if source else ["--advglue-benign", "glue"]
    code = main(["eval", spec, "--task", task, *advglue, "task.max_eval=8"])
    assert code == 2 and message in capsys.readouterr().err
    assert attacked == []
