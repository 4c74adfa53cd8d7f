"""Transfer attacks (unirobust/attacks/transfer.py) and the transfer evaluation (unirobust/transfer_eval.py).

Tiny models: one-conv CNNs trained for a second on a toy 16 x 16 two-class problem (a robust centre
patch plus weak +-0.05 shifts of every pixel), random 2-layer BERTs on the offline MiniLM tokenizer,
and untrained timm ``test_resnet`` run folders on digits for the command line.
"""
from __future__ import annotations

from unirobust.compat import ensure_torchvision

ensure_torchvision()

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import toy_problem
from unirobust.attacks import build_attack
from unirobust.attacks.pgd import FGSM
from unirobust.attacks.transfer import CWA, DIMIFGSM, MIFGSM, input_diversity
from unirobust.models.base import unit_norm
from unirobust.models.ensemble import EnsembleAdapter
from unirobust.models.vision import VisionAdapter
from unirobust.transfer_eval import member_matrix, transfer_matrix, transfer_table

torch.set_num_threads(1)


def as_dataset(batch: dict) -> list[dict]:
    """Items as a vision task split yields them (``image`` array, ``label`` int)."""
    return [{"image": x.numpy(), "label": int(y)} for x, y in zip(batch["pixel_values"], batch["labels"])]


def toy_cnn(seed: int) -> VisionAdapter:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
    return VisionAdapter(net, 2)


def trained_cnn(seed: int) -> VisionAdapter:
    adapter = toy_cnn(seed)
    data = toy_problem(512, 100 + seed)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        perm = torch.randperm(512, generator=g)
        for i in range(0, 512, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(adapter.logits(data["pixel_values"][idx]), data["labels"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return adapter.eval()


@pytest.fixture(scope="module")
def pair():
    return {"A": trained_cnn(0), "B": trained_cnn(1)}


@pytest.fixture(scope="module")
def test_set():
    return toy_problem(96, 7)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from unirobust.offline import resolve_hf_model

    return AutoTokenizer.from_pretrained(resolve_hf_model("sentence-transformers/all-MiniLM-L6-v2"))


def tiny_text(tokenizer, seed: int, max_length: int = 32):
    from transformers import BertConfig, BertForSequenceClassification

    from unirobust.models.text import TextAdapter

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return TextAdapter(BertForSequenceClassification(cfg), tokenizer, 2, ["sentence"], max_length=max_length).eval()


SENTENCES = [
    {"sentence": "a gripping , funny and moving film", "label": 1},
    {"sentence": "dull", "label": 0},
    {"sentence": "the plot never comes together and the actors seem bored by their own lines", "label": 0},
    {"sentence": "an unexpected delight", "label": 1},
]


# ----------------------------------------------------------------------------- attacks


def test_mifgsm_one_step_without_momentum_is_fgsm(pair, test_set):
    batch = {k: v[:32] for k, v in test_set.items()}
    mi = MIFGSM(eps=0.1, steps=1, decay=0.0)
    torch.testing.assert_close(mi(pair["A"], batch), FGSM(eps=0.1)(pair["A"], batch), rtol=0, atol=0)


@pytest.mark.parametrize("attack", [MIFGSM(eps=0.1), DIMIFGSM(eps=0.1), CWA(eps=0.1), MIFGSM(eps=2.0, norm="l2"),
                                    CWA(eps=2.0, norm="l2")], ids=["mi", "di", "cwa", "mi-l2", "cwa-l2"])
def test_vision_transfer_attacks_stay_in_the_ball_and_hurt(pair, test_set, attack):
    torch.manual_seed(0)
    ens = EnsembleAdapter([pair["A"], pair["B"]])
    x = test_set["pixel_values"]
    for model in (pair["A"], ens):
        z = attack(model, test_set)
        delta = (z - x).flatten(1)
        size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        assert torch.all(size <= attack.eps + 1e-5) and z.min() >= 0 and z.max() <= 1
        with torch.no_grad():
            clean = (model.logits(x).argmax(-1) == test_set["labels"]).float().mean()
            adv = (model.logits(z).argmax(-1) == test_set["labels"]).float().mean()
        assert clean > 0.9 and adv < clean - 0.3, (clean, adv)


def test_input_diversity_shrinks_and_pads(test_set):
    x = test_set["pixel_values"][:4]
    assert input_diversity(x, 0.0, 0.9) is x
    torch.manual_seed(0)
    outs = [input_diversity(x, 1.0, 0.5) for _ in range(5)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)
    assert any((o == 0).sum() > (x == 0).sum() for o in outs)  # zero padding appeared


def test_cwa_uses_every_member_gradient(pair, test_set):
    calls = {"A": 0, "B": 0}
    for name, m in pair.items():
        m.net.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    try:
        ens = EnsembleAdapter([pair["A"], pair["B"]])
        CWA(eps=0.1, steps=3)(ens, {k: v[:8] for k, v in test_set.items()})
    finally:
        for m in pair.values():
            m.net._forward_hooks.clear()
    # per step: one ensemble pass for the reverse step (both members) + one pass per member
    assert calls == {"A": 6, "B": 6}


def test_text_transfer_attacks_keep_padding_and_specials(minilm_tokenizer):
    model = tiny_text(minilm_tokenizer, 0)
    batch = model.collate(SENTENCES)
    z0 = model.embed(batch)
    for attack in (MIFGSM(eps=0.5, norm="l2", relative=True, steps=3),
                   CWA(eps=0.5, norm="l2", relative=True, steps=2)):
        z = attack(model, batch)
        delta = z - z0
        frozen = ~model.perturbable(batch)
        assert torch.all(delta[frozen] == 0) and delta[~frozen].abs().sum() > 0
        assert torch.all(unit_norm(delta, "l2", (-1,)).squeeze(-1) <= 0.5 * z0.norm(dim=-1) + 1e-4)


def test_input_diversity_is_skipped_on_text_with_a_warning(minilm_tokenizer, caplog):
    model = tiny_text(minilm_tokenizer, 0)
    batch = model.collate(SENTENCES)
    z = DIMIFGSM(eps=0.5, norm="l2", relative=True, steps=2)(model, batch)
    assert "skipped" in caplog.text
    torch.testing.assert_close(z, MIFGSM(eps=0.5, norm="l2", relative=True, steps=2)(model, batch), rtol=0, atol=0)


def test_transfer_attacks_are_registered():
    from unirobust.tasks import ThreatModel

    threat = ThreatModel(norm="linf", eps=0.1, steps=7)
    for name, cls in (("mi-fgsm", MIFGSM), ("di-fgsm", DIMIFGSM), ("cwa", CWA)):
        a = build_attack({"name": name}, threat)
        assert isinstance(a, cls) and a.eps == 0.1 and a.steps == 7
    assert build_attack({"name": "di-fgsm"}, threat).diversity_prob == 0.5


# ----------------------------------------------------------------------------- transfer matrix


def test_transfer_matrix_2x2_diagonal_is_white_box(pair, test_set):
    from unirobust.evaluate import evaluate
    from unirobust.train import make_accelerator

    data = as_dataset(test_set)
    attack = MIFGSM(eps=0.1, steps=5)
    res = transfer_matrix(pair, pair, data, attack, batch_size=32)
    assert set(res["matrix"]) == {"A", "B"} and all(set(r) == {"A", "B"} for r in res["matrix"].values())
    accelerator = make_accelerator()
    for name, model in pair.items():
        white = evaluate(model, data, {"mi": attack}, accelerator, batch_size=32, check_examples=0)
        assert res["matrix"][name][name] == pytest.approx(white["robust_accuracy"], abs=1e-6)  # same count of 96
        assert res["white_box"][name] == res["matrix"][name][name]
        assert res["clean"][name] == pytest.approx(white["clean_accuracy"], abs=1e-6)
        for other in pair:
            assert 0 <= res["matrix"][other][name] <= res["clean"][name]
    assert res["n"] == len(data) and "| A |" in transfer_table(res)
    # examples are attacked independently: the batch size changes nothing
    again = transfer_matrix(pair, pair, data, attack, batch_size=7)
    assert again["matrix"] == res["matrix"]


def test_a_cell_does_not_depend_on_the_rest_of_the_matrix(pair, test_set):
    """Random starts of one surrogate's attack come from its own seeded stream: the A -> B cell is
    the same alone, beside other surrogates and targets, and after other random numbers were drawn
    (loading models does); another seed gives other starts."""
    data = as_dataset(test_set)
    attack = build_attack({"name": "pgd", "eps": 0.15, "steps": 1, "alpha": 0.15})  # one step from a random start
    alone = transfer_matrix({"A": pair["A"]}, {"B": pair["B"]}, data, attack, batch_size=32)["matrix"]["A"]["B"]
    torch.rand(1000)
    crowded = transfer_matrix({"B": pair["B"], "A": pair["A"]}, {"A": pair["A"], "B": pair["B"]}, data, attack,
                              batch_size=32)
    assert crowded["matrix"]["A"]["B"] == alone
    others = {transfer_matrix({"A": pair["A"]}, {"B": pair["B"]}, data, attack, batch_size=32,
                              seed=k)["matrix"]["A"]["B"] for k in range(1, 6)}
    assert others != {alone}  # the seed reaches the attack


def test_member_rows_sit_under_their_ensemble(pair, test_set):
    data = as_dataset(test_set)
    res = transfer_matrix({"A": pair["A"]}, {"B": pair["B"], "ens": EnsembleAdapter([pair["A"], pair["B"]])},
                          data, MIFGSM(eps=0.1, steps=2), batch_size=32)
    row = next(line for line in transfer_table(res).splitlines() if "members of ens" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "" and " / " in cells[2]  # columns: B, ens


def test_transfer_matrix_restores_modes_even_when_an_attack_fails(pair, test_set):
    def broken(model, batch):
        raise RuntimeError("attack failed")

    for model in pair.values():
        model.train()
    try:
        with pytest.raises(RuntimeError, match="attack failed"):
            transfer_matrix(pair, pair, as_dataset(test_set), broken, batch_size=32, threat=MIFGSM(eps=0.1))
        assert all(model.training for model in pair.values())
    finally:
        for model in pair.values():
            model.eval()


def test_ensemble_target_reports_members_and_member_matrix(pair, test_set):
    data = as_dataset(test_set)
    ens = EnsembleAdapter([pair["A"], pair["B"]])
    attack = MIFGSM(eps=0.1, steps=5)
    res = transfer_matrix({"A": pair["A"]}, {"ens": ens}, data, attack, batch_size=32)
    members = res["member_accuracy"]["A"]["ens"]
    single = transfer_matrix({"A": pair["A"]}, pair, data, attack, batch_size=32)
    # a member's figure counts what a cell counts (correct clean and under attack): the members of the
    # ensemble target score what the same models score as targets of their own
    assert members[0] == pytest.approx(single["matrix"]["A"]["A"]) and members[1] == pytest.approx(single["matrix"]["A"]["B"])
    mm = member_matrix(ens, data, attack, batch_size=32)
    assert mm["matrix"]["member0"]["member0"] == single["matrix"]["A"]["A"]
    assert mm["matrix"]["member1"]["member0"] == pytest.approx(transfer_matrix(
        {"B": pair["B"]}, {"A": pair["A"]}, data, attack, batch_size=32)["matrix"]["B"]["A"])


class Brighter(nn.Module):
    """Class 1 when the image is brighter than mid-grey: wrong on a grey image of class 1, right once
    an attack has brightened it."""

    def forward(self, x):
        s = 100 * (x.mean(dim=(1, 2, 3)) - 0.5 - 1e-3)
        return torch.stack([torch.zeros_like(s), s], dim=-1)


def test_member_accuracy_counts_only_examples_the_member_got_right_clean():
    """A member wrong on a clean example and right under the attack is not robust on it (as in a
    cell): its figure is 0, not 1."""
    grey = [{"image": np.full((1, 4, 4), 0.5, dtype=np.float32), "label": 1} for _ in range(4)]

    class Brighten:
        eps, norm, relative = 0.1, "linf", False

        def __call__(self, adapter, batch):
            return adapter.embed(batch) + 0.1

    member = VisionAdapter(Brighter(), 2)
    res = transfer_matrix({"s": member}, {"ens": EnsembleAdapter([member, VisionAdapter(Brighter(), 2)])}, grey,
                          Brighten(), batch_size=4)
    assert res["clean"]["ens"] == 0.0 and res["matrix"]["s"]["ens"] == 0.0
    assert res["member_accuracy"]["s"]["ens"] == [0.0, 0.0]


def test_text_transfer_moves_the_perturbation_to_the_target(minilm_tokenizer):
    source, target = tiny_text(minilm_tokenizer, 0), tiny_text(minilm_tokenizer, 1)
    batch = source.collate(SENTENCES)
    shift = 0.002 * torch.randn(source.embed(batch).shape[-1])  # well inside every token's ball

    def fixed_attack(model, b):  # a known perturbation on the perturbable tokens
        return model.embed(b) + shift * model.perturbable(b).unsqueeze(-1)

    fixed_attack.eps, fixed_attack.norm, fixed_attack.relative = 0.5, "l2", True
    seen = []
    original = target.logits
    target.logits = lambda z, b: (seen.append(z.detach()), original(z, b))[1]
    try:
        transfer_matrix({"s": source}, {"t": target}, SENTENCES, fixed_attack, batch_size=8)
        z0 = target.embed(batch)
        torch.testing.assert_close(seen[-1], z0 + shift * target.perturbable(batch).unsqueeze(-1))  # own + delta
        shift = 10 * shift / shift.norm()  # far outside: projected onto the target's own ball
        transfer_matrix({"s": source}, {"t": target}, SENTENCES, fixed_attack, batch_size=8)
        moved = (seen[-1] - z0).norm(dim=-1)
        assert torch.all(moved <= 0.5 * z0.norm(dim=-1) + 1e-5) and moved.max() > 0
    finally:
        del target.logits
    short = tiny_text(minilm_tokenizer, 1, max_length=8)  # truncates the long sentence: other token ids
    with pytest.raises(ValueError, match="tokenize differently"):
        transfer_matrix({"s": source}, {"t": short}, SENTENCES, fixed_attack, batch_size=8)


# ----------------------------------------------------------------------------- runs and command line


def _fake_run(root, name: str, seed: int, ensemble=None):
    from conftest import write_run

    model = {"spec": "timm:test_resnet"} if ensemble is None else {"spec": "timm:test_resnet", "ensemble": ensemble}
    return write_run(root / name, {"name": name, "seed": seed, "task": {"name": "digits"}, "model": model,
                                   "eval": {"batch_size": 16, "max_examples": 24}}, seed)[0]


def test_cli_transfer_entry_point(tmp_path, capsys):
    from unirobust.transfer_eval import add_transfer_parser

    a, b, c = _fake_run(tmp_path, "a", 0), _fake_run(tmp_path, "b", 1), _fake_run(tmp_path, "c", 2, ensemble=2)
    parser = argparse.ArgumentParser()
    add_transfer_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "transfer.json"
    args = parser.parse_args(["transfer", "--surrogates", str(a), f"{a}+{b}", "--targets", str(b), str(c),
                              "--attack", "mi-fgsm:steps=2", "--attack", "cwa:steps=1", "--members",
                              "--output", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"mi-fgsm(steps=2)", "cwa(steps=1)"}
    mi = res["mi-fgsm(steps=2)"]
    assert mi["n"] == 24 and set(mi["matrix"]) == {str(a), f"{a}+{b}"} and set(mi["matrix"][str(a)]) == {str(b), str(c)}
    assert len(mi["member_accuracy"][str(a)][str(c)]) == 2 and set(mi["members"]) == {str(c)}
    printed = capsys.readouterr().out
    assert "members of" in printed and "| (clean) |" in printed


def test_evaluate_extras_members_and_missing_surrogate(tmp_path, caplog):
    from unirobust.recipe import validate
    from unirobust.tasks import load_task
    from unirobust.runs import load_run
    from unirobust.transfer_eval import evaluate_extras

    run = _fake_run(tmp_path, "ens", 0, ensemble=2)
    surrogate = _fake_run(tmp_path, "single", 1)
    recipe, adapter = load_run(run)
    raw = json.loads(json.dumps(recipe.model_dump(mode="json")))
    raw["eval"]["transfer"] = {"surrogates": [str(surrogate), str(tmp_path / "nope")],
                               "attacks": [{"name": "mi-fgsm", "steps": 2}], "max_examples": 16}
    recipe = validate(raw)
    data = load_task(recipe.resolved_task).test
    out = evaluate_extras(recipe, adapter, data, None)
    assert out["transfer_skipped"] == [str(tmp_path / "nope")] and "not a finished run" in caplog.text
    title = "mi-fgsm(steps=2)"
    assert out["transfer"][title]["n"] == 16 and out["transfer"][title]["targets"] == ["ens"]
    assert set(out["members"][title]["matrix"]) == {"member0", "member1"}
    from unirobust.transfer_eval import extras_markdown

    text = extras_markdown(out)
    assert "## Ensemble members under" in text and "## Transfer under" in text and "nope" in text
    assert evaluate_extras(validate({**raw, "model": {"spec": "timm:test_resnet"},
                                     "eval": {"attacks": [{"name": "fgsm"}]}}), adapter.members[0], data) == {}
    # a surrogate named runs/<name> (as the shipped recipes do) is found under the recipe's output_dir,
    # where the surrogate recipe run with the same output_dir put it; the warning says where it looked
    raw["output_dir"] = str(tmp_path)
    raw["eval"]["transfer"]["surrogates"] = ["runs/single", "runs/elsewhere"]
    caplog.clear()
    out = evaluate_extras(validate(raw), adapter, data, None)
    assert set(out["transfer"][title]["matrix"]) == {"runs/single"} and out["transfer_skipped"] == ["runs/elsewhere"]
    assert str(tmp_path / "elsewhere") in caplog.text


def test_eval_of_an_ensemble_run_reports_its_members(tmp_path, capsys):
    """`unirobust eval <ensemble run>` adds the member matrix as the run's own evaluation does."""
    from unirobust.cli import main

    run = _fake_run(tmp_path, "ens", 0, ensemble=2)
    assert main(["eval", str(run), "--attack", "fgsm", "--max-examples", "8", "eval.check_examples=0"]) == 0
    assert "## Ensemble members under fgsm" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert set(result["members"]["fgsm"]["matrix"]) == {"member0", "member1"} and result["members"]["fgsm"]["n"] == 8


def test_word_attacks_are_left_to_evaluate_not_to_the_matrices(tmp_path, bert_config, tokenizer, make_run):
    """``eval.attacks: [pgd, pwws]`` on a text ensemble: the member matrix is measured under the
    continuous attack only (a word attack is not a function of the embeddings: it crashed the end of
    the run); ``unirobust transfer --attack pwws`` is a usage error."""
    from transformers import BertForSequenceClassification

    from unirobust.recipe import RecipeError, validate
    from unirobust.tasks import load_task
    from unirobust.transfer_eval import add_transfer_parser, evaluate_extras

    folder = tmp_path / "tiny_bert"
    BertForSequenceClassification(bert_config()).save_pretrained(folder)  # 2 labels by default
    tokenizer.save_pretrained(folder)
    raw = {"name": "ens", "task": {"name": "sst2-sample"},
           "model": {"spec": f"hf:{folder}", "options": {"max_length": 32}, "ensemble": 2},
           "eval": {"batch_size": 8, "attacks": [{"name": "pgd", "steps": 1}, {"name": "pwws"}]}}
    run, recipe, adapter = make_run(tmp_path / "runs" / "ens", raw)
    data = load_task(recipe.resolved_task).test.select(range(8))
    out = evaluate_extras(recipe, adapter, data, None)
    assert list(out["members"]) == ["pgd(steps=1)"]
    raw["eval"]["attacks"] = [{"name": "pwws"}]
    assert evaluate_extras(validate(raw), adapter, data, None) == {}
    parser = argparse.ArgumentParser()
    add_transfer_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["transfer", "--surrogates", str(run), "--targets", str(run), "--attack", "pwws"])
    with pytest.raises(RecipeError, match="pwws substitutes words"):
        args.func(args)


def test_surrogates_of_another_task_or_layout_are_refused_or_skipped(tmp_path, bert_config, tokenizer, make_run,
                                                                      caplog):
    """A surrogate must read the target's examples: a vision run is refused as a surrogate of a text
    run (`unirobust transfer` exits 2), and a prompt-head surrogate of a classifier (another input
    layout) is skipped by a run's eval.transfer with the reason, instead of crashing the finished run."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from unirobust.cli import main
    from unirobust.recipe import validate
    from unirobust.tasks import load_task
    from unirobust.transfer_eval import evaluate_extras

    folder = tmp_path / "tiny_bert"
    BertForSequenceClassification(bert_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mlm = tmp_path / "tiny_mlm"
    BertForMaskedLM(bert_config()).save_pretrained(mlm)
    tokenizer.save_pretrained(mlm)
    text = {"name": "cls", "task": {"name": "sst2-sample"}, "model": {"spec": f"hf:{folder}", "options": {"max_length": 32}},
            "eval": {"batch_size": 8, "attacks": [{"name": "pgd", "steps": 1}]}}
    run, recipe, adapter = make_run(tmp_path / "runs" / "cls", text)
    prompt, _, _ = make_run(tmp_path / "runs" / "prompt", {
        **text, "name": "prompt", "model": {"spec": f"hf:{mlm}", "options": {
            "max_length": 32, "head": "prompt", "templates": ["{sentence} It was [MASK]."],
            "verbalizer": {"negative": ["bad"], "positive": ["good"]}}}})
    vision, _, _ = make_run(tmp_path / "runs" / "digits", {"name": "digits", "task": {"name": "digits"},
                                                           "model": {"spec": "timm:test_resnet"}})
    short, _, _ = make_run(tmp_path / "runs" / "short", {**text, "name": "short", "model": {
        "spec": f"hf:{folder}", "options": {"max_length": 16}}})  # the same tokenizer, truncated earlier
    assert main(["transfer", "--surrogates", str(vision), "--targets", str(run), "--max-examples", "4"]) == 2
    assert main(["transfer", "--surrogates", str(prompt), "--targets", str(run), "--max-examples", "4"]) == 2
    assert main(["transfer", "--surrogates", str(short), "--targets", str(run), "--max-examples", "4"]) == 2
    raw = json.loads(json.dumps(recipe.model_dump(mode="json")))
    raw["eval"]["transfer"] = {"surrogates": [str(prompt), str(vision), str(short)], "max_examples": 4}
    data = load_task(recipe.resolved_task).test.select(range(4))
    with caplog.at_level("WARNING", logger="unirobust.transfer_eval"):
        out = evaluate_extras(validate(raw), adapter, data, None)
    assert out["transfer_skipped"] == [str(prompt), str(vision), str(short)] and "transfer" not in out
    assert "lays out its input" in caplog.text and "was trained on 'digits'" in caplog.text
    assert "reads at most 16 tokens" in caplog.text and "one model.options.max_length" in caplog.text
