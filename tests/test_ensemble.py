"""Ensembles (unirobust/models/ensemble.py) and ensemble defenses (DVERGE, ADP, GAL, independent).

Tiny models built here: one-conv CNNs on a toy 16 x 16 two-class problem, timm ``test_resnet`` on
digits, and random 2-layer BERTs (hidden 32, no dropout) on the offline MiniLM tokenizer — each text
member with its *own* embedding matrix, so the shared-perturbation input space is exercised.
"""
from __future__ import annotations

from unirobust.compat import ensure_torchvision

ensure_torchvision()

import math

import pytest
from conftest import SIX_SENTENCES
import torch
import torch.nn.functional as F
from torch import nn

from unirobust.attacks.distill import FeatureDistillation, feature_distance
from unirobust.defenses import build_defense
from unirobust.models import ModelAdapter, build_model
from unirobust.models.base import build_from_config, unit_norm
from unirobust.models.ensemble import EnsembleAdapter
from unirobust.models.vision import VisionAdapter
from unirobust.tasks import ThreatModel

torch.set_num_threads(1)

VISION_THREAT = ThreatModel(norm="linf", eps=0.1, steps=3)
TEXT_THREAT = ThreatModel(norm="l2", eps=0.5, relative=True, steps=2)
SENTENCES = SIX_SENTENCES


def toy_batch(n: int = 32, seed: int = 0, classes: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    s = (2 * y - 1).float().view(-1, 1, 1, 1)
    x = 0.5 + 0.05 * s + 0.05 * torch.randn(n, 1, 16, 16, generator=g)
    x[:, :, 6:10, 6:10] = 0.5 + 0.3 * s
    return {"pixel_values": x.clamp(0, 1), "labels": y}


def toy_cnn(seed: int, classes: int = 2) -> VisionAdapter:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, classes))
    return VisionAdapter(net, classes, feature_layer=2)  # features: the conv block's output (first 2 children)


def vision_ensemble(n: int = 3, combine: str = "logits") -> EnsembleAdapter:
    return EnsembleAdapter([toy_cnn(i) for i in range(n)], combine=combine)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from unirobust.offline import resolve_hf_model

    return AutoTokenizer.from_pretrained(resolve_hf_model("sentence-transformers/all-MiniLM-L6-v2"))


def tiny_text(tokenizer, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    from unirobust.models.text import TextAdapter

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return TextAdapter(BertForSequenceClassification(cfg), tokenizer, 2, ["sentence"], max_length=32, feature_layer=1)


@pytest.fixture
def text_ensemble(minilm_tokenizer):
    return EnsembleAdapter([tiny_text(minilm_tokenizer, s) for s in range(3)]).eval()


# ----------------------------------------------------------------------------- the adapter contract


def test_vision_ensemble_contract_and_combination():
    ens = vision_ensemble().eval()
    batch = toy_batch(8)
    assert isinstance(ens, ModelAdapter) and ens.modality == "vision" and ens.num_classes == 2
    z = ens.embed(batch)
    assert z is batch["pixel_values"]
    with torch.no_grad():
        plain = torch.stack([m.net((z - m.mean) / m.std) for m in ens.members])
        torch.testing.assert_close(ens.logits(z, batch), plain.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(ens.logits([z] * 3, batch), plain, rtol=0, atol=1e-6)
        probs = EnsembleAdapter(list(ens.members), combine="probs")
        expected = torch.log(F.softmax(plain, -1).mean(0))
        torch.testing.assert_close(probs.logits(z, batch), expected, rtol=0, atol=1e-5)
        assert ens.features(z, batch).shape == (8, 3 * 8 * 8 * 8)
    assert ens.ball_dims == (1, 2, 3)
    assert torch.equal(ens.perturbable(batch), ens.members[0].perturbable(batch))


def test_text_ensemble_members_keep_their_own_embeddings(text_ensemble):
    ens = text_ensemble
    batch = ens.collate(SENTENCES)
    z0 = ens.embed(batch)
    with torch.no_grad():
        plain = torch.stack([m.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
                             for m in ens.members])
        torch.testing.assert_close(ens.logits(z0, batch), plain.mean(0), rtol=0, atol=1e-5)
        # a point in the shared space reaches member i as its own embedding plus the same delta
        delta = 0.01 * torch.randn_like(z0)
        for i, m in enumerate(ens.members):
            own = m.embed(batch) + delta
            torch.testing.assert_close(ens.member_logit(i, z0 + delta, batch), m.logits(own, batch), rtol=0, atol=1e-5)
    assert ens.text_fields == ["sentence"] and ens.tokenizer is ens.members[0].tokenizer  # shared attributes
    preds = ens.predict([e["sentence"] for e in SENTENCES], batch_size=4)
    torch.testing.assert_close(preds, ens.logits(z0, batch).argmax(-1))
    with pytest.raises(AttributeError):
        ens.model  # member-specific: never silently the first member's


def test_ensemble_parameters_move_with_to_and_modes():
    ens = vision_ensemble()
    ens.to(torch.float64)
    assert all(p.dtype == torch.float64 for m in ens.members for p in m.parameters())
    assert all(b.dtype == torch.float64 for m in ens.members for b in m.buffers())
    assert len(list(ens.parameters())) == 3 * len(list(ens.members[0].parameters()))
    ens.eval()
    assert not any(mod.training for mod in ens.modules())
    ens.train()
    assert all(mod.training for mod in ens.modules())
    batch = {k: v.double() if v.is_floating_point() else v for k, v in toy_batch(4).items()}
    assert ens.eval().logits(ens.embed(batch), batch).dtype == torch.float64


def test_ensemble_rejects_mixed_members(minilm_tokenizer):
    from unirobust.models.base import ModelSpecError

    with pytest.raises(ModelSpecError, match="modality"):
        EnsembleAdapter([toy_cnn(0), tiny_text(minilm_tokenizer, 0)])
    with pytest.raises(ModelSpecError, match="combine"):
        EnsembleAdapter([toy_cnn(0)], combine="vote")


def test_text_ensemble_members_share_one_tokenizer_and_layout(minilm_tokenizer):
    """Member 0 tokenizes for all: another vocabulary (``runA+runB`` surrogates are built directly,
    not through build_ensemble) or another layout (a prompt head next to a classifier) would feed a
    member token ids or positions it does not read that way."""
    import copy

    from transformers import BertModel

    from unirobust.models.base import ModelSpecError
    from unirobust.models.prompt import PromptAdapter

    grown = copy.deepcopy(minilm_tokenizer)
    grown.add_tokens(["zzqxv"])
    with pytest.raises(ModelSpecError, match="share one tokenizer"):
        EnsembleAdapter([tiny_text(minilm_tokenizer, 0), tiny_text(grown, 1)])
    twin = copy.deepcopy(minilm_tokenizer)  # an equal vocabulary in another object is fine
    assert len(EnsembleAdapter([tiny_text(minilm_tokenizer, 0), tiny_text(twin, 1)])) == 2
    first = tiny_text(minilm_tokenizer, 0)
    encoder = BertModel(first.model.config, add_pooling_layer=False)
    prompt = PromptAdapter(encoder, minilm_tokenizer, 2, ["sentence"], ["{sentence} It was [MASK]."],
                           [["terrible"], ["great"]], "embedding", max_length=32)
    with pytest.raises(ModelSpecError, match="share one layout"):
        EnsembleAdapter([prompt, first])
    # nested ensembles (runA+runB surrogates where a run is an ensemble) compare their members' layout
    plain_pair = EnsembleAdapter([tiny_text(minilm_tokenizer, 2), tiny_text(minilm_tokenizer, 3)])
    assert len(EnsembleAdapter([plain_pair, first])) == 2
    with pytest.raises(ModelSpecError, match="share one layout"):
        EnsembleAdapter([EnsembleAdapter([prompt]), plain_pair])


# ----------------------------------------------------------------------------- building from recipes


def test_build_ensemble_from_spec_and_member_list(digits_task):
    torch.manual_seed(0)
    ens = build_model("timm:test_resnet", digits_task, ensemble=3)
    assert isinstance(ens, EnsembleAdapter) and len(ens) == 3
    w = [m.net.conv1[0].weight if isinstance(m.net.conv1, nn.Sequential) else m.net.conv1.weight for m in ens.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # different initialisations
    mixed = build_model("timm:test_resnet", digits_task, ensemble={
        "members": [{"options": {"feature_layer": 2}}, {"spec": "timm:test_efficientnet", "seed": 5}],
        "combine": "probs"})
    assert mixed.combine == "probs" and mixed.members[0].feature_layer == 2
    assert type(mixed.members[1].net).__name__ == "EfficientNet"
    again = build_model("timm:test_resnet", digits_task, ensemble=[{"spec": "timm:test_efficientnet", "seed": 5}])
    for a, b in zip(mixed.members[1].parameters(), again.members[0].parameters()):
        assert torch.equal(a, b)  # a member's seed pins its initialisation


def test_members_that_start_identical_are_warned_about(digits_task, caplog):
    torch.manual_seed(3)
    with caplog.at_level("WARNING", logger="unirobust.models.ensemble"):
        build_model("timm:test_resnet", digits_task, ensemble=[{}, {}, {"seed": 3}])
    warned = [r.getMessage() for r in caplog.records if "identical weights" in r.getMessage()]
    assert len(warned) == 1 and "members 0 and 2" in warned[0]  # seeded like the first unseeded member
    caplog.clear()
    with caplog.at_level("WARNING", logger="unirobust.models.ensemble"):
        build_model("timm:test_resnet", digits_task, ensemble=[{}, {}, {"seed": 4}])
    assert not [r for r in caplog.records if "identical weights" in r.getMessage()]


def test_recipe_ensemble_field_forms(digits_task):
    from unirobust.recipe import RecipeError, validate

    base = {"name": "e", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"}}
    for form, members in ((3, 3), ([{}, {"options": {"drop_rate": 0.1}}], 2), ({"members": 2, "combine": "probs"}, 2)):
        r = validate({**base, "model": {**base["model"], "ensemble": form}})
        n = r.model.ensemble.members if isinstance(r.model.ensemble.members, int) else len(r.model.ensemble.members)
        assert n == members
        assert len(build_from_config(r.model, digits_task)) == members
    assert validate(base).model.ensemble is None
    for bad, message in ((0, "at least one"), ([{"spec": "nope:x"}], "unknown model source"),
                         ({"members": 2, "combine": "vote"}, "combine")):
        with pytest.raises(RecipeError, match=message):
            validate({**base, "model": {**base["model"], "ensemble": bad}})


def test_text_ensemble_of_cut_frozen_minilm():
    """The SST-2 ensemble recipes' model: MiniLM cut to 1 layer here, word embeddings frozen."""
    from unirobust.tasks import get_task

    task = get_task("sst2-sample")
    torch.manual_seed(0)
    ens = build_model("hf:sentence-transformers/all-MiniLM-L6-v2", task, ensemble=2, max_length=32,
                      num_hidden_layers=1, freeze_embeddings=True)
    embeddings = [m.model.get_input_embeddings().weight for m in ens.members]
    assert not any(w.requires_grad for w in embeddings) and torch.equal(embeddings[0], embeddings[1])
    assert ens.members[0].model.config.num_hidden_layers == 1
    assert all(p.requires_grad for p in ens.members[1].model.classifier.parameters())
    batch = ens.collate(SENTENCES[:2])
    with pytest.raises(ValueError, match="hidden states 0..1"):
        ens.member_features(0, ens.embed(batch), batch, layer=2)


def test_ensemble_weights_round_trip(tmp_path, digits_task):
    from unirobust.report import load_weights, save_weights

    torch.manual_seed(0)
    ens = build_model("timm:test_resnet", digits_task, ensemble=2)
    save_weights(ens, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = build_model("timm:test_resnet", digits_task, ensemble=2)
    load_weights(other, tmp_path / "model.safetensors")
    for a, b in zip(ens.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_vision_feature_layers(timm_adapter, digits_test_batch):
    z = digits_test_batch["pixel_values"][:4]
    with torch.no_grad():
        shapes = [timm_adapter.features(z, None, layer=k).shape for k in range(5)]
        assert all(s[0] == 4 and len(s) == 2 for s in shapes) and len(set(shapes)) > 1
        torch.testing.assert_close(timm_adapter.features(z, None, layer=-1), timm_adapter.features(z, None, layer=4))
    cnn = toy_cnn(0)
    x = toy_batch(4)["pixel_values"]
    torch.testing.assert_close(cnn.features(x), cnn.net[:2]((x - cnn.mean) / cnn.std).flatten(1))


# ----------------------------------------------------------------------------- feature distillation


def test_distillation_lowers_feature_distance_inside_the_ball_vision():
    ens = vision_ensemble().eval()
    batch = toy_batch(16)
    target = {k: v.flip(0) for k, v in batch.items()}
    distil = FeatureDistillation(eps=0.1, steps=10)
    for i in range(3):
        z0 = ens.embed(batch)
        z = distil(ens, batch, target, member=i)
        with torch.no_grad():
            f_t = ens.member_features(i, ens.embed(target), target)
            before = feature_distance(ens.member_features(i, z0, batch), f_t)
            after = feature_distance(ens.member_features(i, z, batch), f_t)
        assert (after < before).float().mean() > 0.9 and after.mean() < 0.8 * before.mean()
        assert (z - z0).abs().max() <= 0.1 + 1e-6 and z.min() >= 0 and z.max() <= 1
    assert not ens.training  # eval mode restored (it was eval)
    ens.train()
    distil(ens, batch, target, member=0)
    assert ens.training  # and train mode restored too


def test_distillation_lowers_feature_distance_inside_the_ball_text(text_ensemble):
    ens = text_ensemble
    batch = ens.collate(SENTENCES)
    target = {k: v.roll(1, 0) for k, v in batch.items()}
    distil = FeatureDistillation(eps=0.5, norm="l2", relative=True, steps=8)
    z0 = ens.embed(batch)
    z = distil(ens, batch, target, member=1)
    with torch.no_grad():
        f_t = ens.member_features(1, ens.embed(target), target)
        before = feature_distance(ens.member_features(1, z0, batch), f_t)
        after = feature_distance(ens.member_features(1, z, batch), f_t)
    assert after.mean() < 0.9 * before.mean()
    delta = z - z0
    norms = unit_norm(delta, "l2", (-1,)).squeeze(-1)
    assert torch.all(norms <= 0.5 * z0.norm(dim=-1) + 1e-4)  # per-token relative ball
    frozen = ~ens.perturbable(batch)
    assert frozen.any() and torch.all(delta[frozen] == 0)  # padding and [CLS]/[SEP] never move
    assert delta[~frozen].abs().sum() > 0


# ----------------------------------------------------------------------------- defenses


def _step(defense, model, batch):
    out = defense.loss(model, batch)
    out["loss"].backward()
    return out


def test_dverge_round_robin_trains_each_member_on_the_others_distilled_inputs(monkeypatch):
    """Member i must learn from x'_j for every j != i and never from its own x'_i."""
    from unirobust.defenses import dverge as dverge_module

    ens = vision_ensemble()
    batch = toy_batch(8)
    shift = {0: 0.011, 1: 0.022, 2: 0.033}

    class Marked:
        def __call__(self, model, batch, target_batch, member=None):
            return (batch["pixel_values"] + shift[member]).detach()

    monkeypatch.setattr(dverge_module.DVERGE, "distiller", lambda self, layer: Marked())
    seen = {i: [] for i in range(3)}
    for i, m in enumerate(ens.members):
        m.net.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach().clone()))
    defense = build_defense({"name": "dverge"}, VISION_THREAT)
    out = defense.loss(ens, batch)
    x = batch["pixel_values"]
    for i in range(3):
        rows = seen[i][-1]
        assert rows.shape[0] == 3 * 8  # two distilled copies + the clean batch
        offsets = {round(float((rows[k * 8:(k + 1) * 8] - x).mean()), 3) for k in range(3)}
        assert offsets == {shift[j] for j in range(3) if j != i} | {0.0}
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (8, 2)


def test_dverge_trains_tiny_vision_ensemble():
    ens = vision_ensemble()
    batch = toy_batch(32)
    defense = build_defense({"name": "dverge", "steps": 3, "clean_weight": 0.5}, VISION_THREAT)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    ens.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = _step(defense, ens, batch)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert ens.training and losses[-1] < losses[0]
    assert set(out) >= {"loss", "logits", "distill_loss", "clean_loss"}


def test_dverge_stats_are_counts_and_a_single_example_batch_warns(caplog):
    """``distilled_correct`` / ``distilled_seen`` are counts (summed over steps and processes like the
    other defenses' stats); a batch of one has no other example to distil toward, which is said."""
    ens = vision_ensemble()
    defense = build_defense({"name": "dverge", "steps": 1}, VISION_THREAT)
    stats = defense.loss(ens, toy_batch(8))["stats"]
    assert stats["distilled_seen"] == 3 * 2 * 8  # each member, the other two's copies of 8 examples
    assert stats["distilled_correct"] == int(stats["distilled_correct"]) <= stats["distilled_seen"]
    assert "no other example" not in caplog.text
    defense.loss(ens, toy_batch(1))
    defense.loss(ens, toy_batch(1))
    assert caplog.text.count("no other example to distil toward") == 1


def test_dverge_trains_tiny_text_ensemble(text_ensemble):
    ens = text_ensemble.train()
    batch = ens.collate(SENTENCES)
    for layer in (None, [1, 2]):  # each member's feature_layer, then a random layer per step
        defense = build_defense({"name": "dverge", "steps": 2, "layer": layer}, TEXT_THREAT)
        ens.zero_grad()
        out = _step(defense, ens, batch)
        assert torch.isfinite(out["loss"])
        for m in ens.members:  # every member learns, its own embedding matrix included
            emb = m.model.get_input_embeddings().weight.grad
            assert emb is not None and emb.abs().sum() > 0
            assert m.model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ensemble-erm", "adp", "gal"])
def test_baseline_ensemble_defenses_run_on_both_modalities(name, text_ensemble):
    for ens, batch, threat in ((vision_ensemble(), toy_batch(16), VISION_THREAT),
                               (text_ensemble, text_ensemble.collate(SENTENCES), TEXT_THREAT)):
        ens.train()
        ens.zero_grad()
        config = {"name": name, "beta": 0.0} if name == "adp" else {"name": name}  # 2 classes: no log-det term
        out = _step(build_defense(config, threat), ens, batch)
        assert torch.isfinite(out["loss"]) and out["logits"].shape == (len(batch["labels"]), 2)
        assert all(p.grad is not None for m in ens.members for p in m.parameters() if p.requires_grad)


def test_ensemble_erm_is_independent_training():
    """The sum of per-member CE gives member i exactly the gradient of its own CE."""
    ens = vision_ensemble()
    batch = toy_batch(16)
    _step(build_defense({"name": "ensemble-erm"}, VISION_THREAT), ens, batch)
    joint = [p.grad.clone() for p in ens.members[1].parameters()]
    ens.zero_grad()
    F.cross_entropy(ens.members[1].logits(batch["pixel_values"]), batch["labels"]).backward()
    for a, p in zip(joint, ens.members[1].parameters()):
        torch.testing.assert_close(a, p.grad)


def test_adp_and_gal_regularisers_point_the_right_way():
    batch4 = toy_batch(16, classes=4)
    adp = build_defense({"name": "adp"}, VISION_THREAT).loss(EnsembleAdapter([toy_cnn(0, 4), toy_cnn(1, 4)]), batch4)
    assert adp["log_det"] <= 1e-4 and adp["ensemble_entropy"] <= math.log(4) + 1e-6
    # identical members: the non-true-class vectors coincide, the Gram matrix is singular
    same = EnsembleAdapter([toy_cnn(0, 4), toy_cnn(0, 4)])
    assert build_defense({"name": "adp"}, VISION_THREAT).loss(same, batch4)["log_det"] < adp["log_det"] - 5
    batch = toy_batch(16)
    twins = EnsembleAdapter([toy_cnn(0), toy_cnn(0)])
    gal = build_defense({"name": "gal"}, VISION_THREAT).loss(twins, batch)
    torch.testing.assert_close(gal["mean_cosine"], torch.tensor(1.0), rtol=0, atol=1e-5)  # aligned gradients
    gal["loss"].backward()
    assert twins.members[0].net[0].weight.grad.abs().sum() > 0  # double backprop reaches the weights


def test_adp_diversity_term_needs_three_classes():
    """With 2 classes each member's non-maximal prediction is one number, normalised to 1: the log-det
    is a constant and beta would silently do nothing. With 4 classes beta changes the gradient."""
    def grads(beta, classes):
        ens = EnsembleAdapter([toy_cnn(i, classes) for i in range(3)])
        build_defense({"name": "adp", "beta": beta}, VISION_THREAT).loss(ens, toy_batch(16, classes=classes))["loss"].backward()
        return torch.cat([p.grad.flatten() for p in ens.parameters()])

    assert (grads(0.5, 4) - grads(0.0, 4)).abs().sum() > 1e-3
    with pytest.raises(ValueError, match="constant with 2 classes; set beta: 0"):
        grads(0.5, 2)
    assert torch.isfinite(grads(0.0, 2)).all()


@pytest.mark.parametrize("name", ["dverge", "adp", "gal", "ensemble-erm"])
def test_ensemble_defenses_explain_a_missing_ensemble(name):
    with pytest.raises(ValueError, match="model.ensemble"):
        build_defense({"name": name}, VISION_THREAT).loss(toy_cnn(0), toy_batch(4))


def test_dverge_recipe_trains_through_the_loop(tmp_path):
    """A DVERGE recipe end to end through train.fit (Accelerate prepare, training view)."""
    from accelerate.utils import set_seed

    from unirobust.recipe import validate
    from unirobust.tasks import load_task
    from unirobust.train import fit, make_accelerator

    recipe = validate({"name": "tiny_dverge", "seed": 0, "task": {"name": "digits", "max_train": 64},
                       "model": {"spec": "timm:test_resnet", "ensemble": 2},
                       "defense": {"name": "dverge", "layer": [1, 2], "steps": 2},
                       "train": {"epochs": 1, "batch_size": 32}})
    set_seed(0)
    adapter = build_from_config(recipe.model, recipe.resolved_task)
    before = [p.detach().clone() for p in adapter.parameters()]
    result = fit(recipe, adapter, load_task(recipe.resolved_task).train, make_accelerator(recipe), tmp_path)
    assert result["steps"] == 2 and math.isfinite(result["history"][-1]["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))
