"""Continuous attacks (unirobust/attacks) and the defenses that hold them (unirobust/defenses)."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from unirobust.attacks import build_attack
from unirobust.attacks.pgd import FGSM, PGD
from unirobust.defenses import build_defense
from unirobust.models.base import unit_norm
from unirobust.tasks import ThreatModel

TOL = 1e-5


def correct(adapter, z, batch):
    with torch.no_grad():
        return adapter.logits(z, batch).argmax(-1) == batch["labels"]


def acc(adapter, z, batch) -> float:
    return correct(adapter, z, batch).float().mean().item()


def image_norms(delta, norm):
    return unit_norm(delta, norm, (1, 2, 3)).flatten()


@pytest.fixture(scope="module")
def batch(digits_test_batch):
    return digits_test_batch


@pytest.fixture
def small_batch(digits_test_batch):
    return {k: v[:64] for k, v in digits_test_batch.items()}


# ----------------------------------------------------------------------------- PGD on vision


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_lowers_accuracy_and_stays_valid(trained_cnn, batch, norm, eps):
    z0 = trained_cnn.embed(batch)
    torch.manual_seed(0)
    z = PGD(eps=eps, norm=norm, steps=10)(trained_cnn, batch)
    assert z.shape == z0.shape and not z.requires_grad
    clean, robust = acc(trained_cnn, z0, batch), acc(trained_cnn, z, batch)
    assert clean > 0.9
    assert robust < clean - 0.3, (clean, robust)
    assert (image_norms(z - z0, norm) <= eps + TOL).all()
    assert z.min() >= 0 and z.max() <= 1
    # the attack really uses its budget (a no-op attack would pass the checks above trivially)
    assert image_norms(z - z0, norm).max() > 0.5 * eps


def test_larger_eps_never_helps(trained_cnn, batch):
    accs = [acc(trained_cnn, PGD(eps=eps, steps=10, random_start=False)(trained_cnn, batch), batch)
            for eps in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0] - 0.5, accs


@pytest.mark.parametrize("attack", [PGD(eps=0.0), PGD(eps=0.0, norm="l2", restarts=2), PGD(eps=0.1, steps=0)])
def test_zero_budget_returns_clean_point(trained_cnn, small_batch, attack):
    z = attack(trained_cnn, small_batch)
    assert torch.equal(z, small_batch["pixel_values"])


def test_restarts_without_random_start_are_identical(trained_cnn, small_batch):
    one = PGD(eps=0.05, steps=5, random_start=False, restarts=1)(trained_cnn, small_batch)
    three = PGD(eps=0.05, steps=5, random_start=False, restarts=3)(trained_cnn, small_batch)
    assert torch.equal(one, three)


def test_restarts_never_worse_than_first_restart(trained_cnn, batch):
    """With the same seed the first restart repeats the single run; more restarts only add chances."""
    def run(restarts):
        torch.manual_seed(123)
        return PGD(eps=0.05, steps=5, restarts=restarts)(trained_cnn, batch)

    z1, z4 = run(1), run(4)
    broken1, broken4 = ~correct(trained_cnn, z1, batch), ~correct(trained_cnn, z4, batch)
    assert (broken4 | ~broken1).all(), "an example broken by one restart survived four"
    # examples broken by both keep the first restart's point (the first success is kept)
    assert torch.equal(z4[broken1], z1[broken1])
    # examples nobody broke keep a loss at least as high
    lost = ~broken4
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        l1 = ce(trained_cnn.logits(z1[lost]), batch["labels"][lost], reduction="none")
        l4 = ce(trained_cnn.logits(z4[lost]), batch["labels"][lost], reduction="none")
    assert (l4 >= l1 - 1e-6).all()


def test_targeted_hits_given_targets(trained_cnn, batch):
    targets = (batch["labels"] + 3) % 10
    tb = dict(batch, target_labels=targets)
    attack = dict(eps=0.2, steps=10, random_start=False)
    z_t = PGD(targeted=True, **attack)(trained_cnn, tb)
    z_u = PGD(**attack)(trained_cnn, tb)
    with torch.no_grad():
        hit_t = (trained_cnn.logits(z_t).argmax(-1) == targets).float().mean().item()
        hit_u = (trained_cnn.logits(z_u).argmax(-1) == targets).float().mean().item()
    assert hit_t > 0.5 and hit_t > hit_u + 0.2, (hit_t, hit_u)
    assert (image_norms(z_t - batch["pixel_values"], "linf") <= 0.2 + TOL).all()


def test_targeted_without_targets_picks_other_classes(trained_cnn, small_batch):
    torch.manual_seed(0)
    z = PGD(eps=0.3, steps=10, targeted=True)(trained_cnn, small_batch)
    assert z.shape == small_batch["pixel_values"].shape
    assert not torch.equal(z, small_batch["pixel_values"])


def test_early_stop(trained_cnn, batch):
    attack = dict(eps=0.1, steps=10, random_start=False)
    z0 = batch["pixel_values"]
    z_full = PGD(**attack)(trained_cnn, batch)
    z_stop = PGD(early_stop=True, **attack)(trained_cnn, batch)
    # already-misclassified examples never move
    wrong = ~correct(trained_cnn, z0, batch)
    assert wrong.any()
    assert torch.equal(z_stop[wrong], z0[wrong])
    # an example frozen at its first success stays broken: early stopping never loses a success
    broken_full, broken_stop = ~correct(trained_cnn, z_full, batch), ~correct(trained_cnn, z_stop, batch)
    assert (broken_stop | ~broken_full).all()
    # and it does stop: some examples are frozen before reaching the ball's edge (steps of 0.025
    # reach eps = 0.1 after 4 steps, where every example of the full run ends)
    both = broken_full & broken_stop & ~wrong
    linf_stop, linf_full = image_norms(z_stop - z0, "linf")[both], image_norms(z_full - z0, "linf")[both]
    assert torch.allclose(linf_full, torch.tensor(0.1), atol=TOL)
    assert (linf_stop < 0.1 - 1e-3).any()


class ModeRecorder:
    def __init__(self, module):
        self.modes = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.modes.append(m.training))


@pytest.mark.parametrize("start_training", [True, False])
def test_attack_runs_in_eval_and_restores_mode(cnn_adapter, small_batch, start_training):
    cnn_adapter.train(start_training)
    rec = ModeRecorder(cnn_adapter.net)
    try:
        PGD(eps=0.1, steps=3)(cnn_adapter, small_batch)
    finally:
        rec.handle.remove()
    assert rec.modes and not any(rec.modes)  # every forward of the attack ran in eval mode
    assert cnn_adapter.training == start_training
    assert all(m.training == start_training for m in cnn_adapter.modules())


def test_attack_restores_mode_on_error(cnn_adapter):
    cnn_adapter.train()
    with pytest.raises(KeyError):
        PGD(eps=0.1)(cnn_adapter, {"pixel_values": torch.rand(2, 1, 8, 8)})  # no labels
    assert cnn_adapter.training


def test_attack_accumulates_no_parameter_grads(cnn_adapter, small_batch):
    cnn_adapter.zero_grad(set_to_none=True)
    PGD(eps=0.1, steps=3)(cnn_adapter, small_batch)
    assert all(p.grad is None for p in cnn_adapter.parameters())


def test_fgsm_is_one_pgd_step(trained_cnn, batch):
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        fgsm = FGSM(eps=eps, norm=norm)(trained_cnn, batch)
        pgd = PGD(eps=eps, norm=norm, steps=1, alpha=eps, random_start=False)(trained_cnn, batch)
        assert torch.equal(fgsm, pgd)
    z0 = batch["pixel_values"]
    fgsm = FGSM(eps=0.1)(trained_cnn, batch)
    interior = (z0 > 0.1) & (z0 < 0.9)
    # Linf FGSM moves every interior pixel by exactly eps (sign of the gradient)
    moved = (fgsm - z0).abs()[interior]
    assert torch.allclose(moved[moved > 0], torch.tensor(0.1), atol=TOL)
    assert acc(trained_cnn, fgsm, batch) < acc(trained_cnn, z0, batch) - 0.2


def test_fgsm_zero_eps_returns_clean_point(trained_cnn, small_batch):
    z = FGSM(eps=0.0)(trained_cnn, small_batch)
    assert torch.equal(z, small_batch["pixel_values"])


def test_pgd_rejects_bad_budgets():
    with pytest.raises(ValidationError):
        PGD(eps=-0.1)
    with pytest.raises(ValidationError):
        PGD(eps=0.1, norm="l1")
    with pytest.raises(ValidationError):
        PGD(eps=0.1, restarts=0)
    with pytest.raises(ValidationError):
        PGD(eps=0.1, stepz=3)  # typo: extra keys are refused


def test_pgd_default_step_size():
    assert PGD(eps=0.1, steps=10).step_size == pytest.approx(0.025)
    assert PGD(eps=0.1, steps=10, alpha=0.01).step_size == 0.01


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("norm,relative,eps", [("l2", True, 0.5), ("linf", False, 0.05), ("l2", False, 0.5)])
def test_text_pgd_moves_only_perturbable_tokens(text_adapter, sentences, norm, relative, eps):
    batch = text_adapter.collate(sentences)
    with torch.no_grad():
        z0 = text_adapter.embed(batch)
    torch.manual_seed(0)
    z = PGD(eps=eps, norm=norm, relative=relative, steps=3)(text_adapter, batch)
    mask = text_adapter.perturbable(batch)
    assert torch.equal(z[~mask], z0[~mask])
    size = unit_norm(z - z0, norm, (-1,)).squeeze(-1)
    radius = eps * z0.norm(dim=-1) if relative else torch.full_like(size, eps)
    assert (size[mask] > 0).all()
    assert (size <= radius * (1 + TOL) + TOL).all()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        text_adapter.eval()
        assert ce(text_adapter.logits(z, batch), batch["labels"]) > ce(text_adapter.logits(z0, batch), batch["labels"])


def test_text_pgd_pairs(pair_adapter, pairs):
    batch = pair_adapter.collate(pairs)
    with torch.no_grad():
        z0 = pair_adapter.embed(batch)
    z = PGD(eps=0.5, norm="l2", relative=True, steps=2, random_start=False)(pair_adapter, batch)
    mask = pair_adapter.perturbable(batch)
    assert torch.equal(z[~mask], z0[~mask]) and not torch.equal(z[mask], z0[mask])


# ----------------------------------------------------------------------------- build_attack


def test_build_attack_fills_budget_from_threat():
    threat = ThreatModel(norm="l2", eps=0.5, steps=7, relative=True)
    pgd = build_attack({"name": "pgd"}, threat)
    assert isinstance(pgd, PGD)
    assert (pgd.eps, pgd.norm, pgd.steps, pgd.relative) == (0.5, "l2", 7, True)
    explicit = build_attack({"name": "pgd", "eps": 0.1, "norm": "linf", "steps": 2, "relative": False}, threat)
    assert (explicit.eps, explicit.norm, explicit.steps, explicit.relative) == (0.1, "linf", 2, False)
    fgsm = build_attack({"name": "fgsm"}, threat)  # no `steps` field: not passed
    assert isinstance(fgsm, FGSM) and (fgsm.eps, fgsm.norm) == (0.5, "l2")
    assert build_attack({"name": "pgd", "eps": 0.3}).eps == 0.3  # no threat: spec alone


def test_build_attack_does_not_mutate_spec():
    spec = {"name": "pgd", "steps": 3}
    build_attack(spec, ThreatModel(eps=0.1))
    assert spec == {"name": "pgd", "steps": 3}


def test_build_attack_unknown_name_lists_valid():
    from unirobust.registry import UnknownName

    with pytest.raises(UnknownName) as err:
        build_attack({"name": "nope"})
    assert "nope" in str(err.value) and "pgd" in str(err.value) and "fgsm" in str(err.value)


def test_fgsm_step_is_eps_even_when_task_sets_pgd_alpha(trained_cnn, small_batch):
    threat = ThreatModel(eps=0.1, alpha=0.01, steps=10)
    fgsm = build_attack({"name": "fgsm"}, threat)
    z = fgsm(trained_cnn, small_batch)
    expected = FGSM(eps=0.1)(trained_cnn, small_batch)
    assert torch.equal(z, expected)


# ----------------------------------------------------------------------------- defenses


def test_erm_loss(cnn_adapter, small_batch):
    cnn_adapter.train()
    out = build_defense({"name": "erm"}).loss(cnn_adapter, small_batch)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    assert out["logits"].shape == (64, 10)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn_adapter.parameters())


def test_pgd_at_loss_vision(trained_cnn, small_batch):
    defense = build_defense({"name": "pgd-at", "attack": {"name": "pgd", "steps": 3}}, ThreatModel(eps=0.1))
    assert defense.attack.eps == 0.1 and defense.attack.steps == 3
    try:
        with torch.no_grad():
            clean = torch.nn.functional.cross_entropy(trained_cnn.logits(small_batch["pixel_values"]),
                                                      small_batch["labels"])
        trained_cnn.train()
        torch.manual_seed(0)
        out = defense.loss(trained_cnn, small_batch)
        assert trained_cnn.training  # the attack switched to eval and back
        assert torch.isfinite(out["loss"]) and out["logits"].shape == (64, 10)
        assert out["loss"] > clean + 0.5  # the loss is taken at the adversarial point
        out["loss"].backward()
        grads = [p.grad for p in trained_cnn.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        trained_cnn.eval()
        trained_cnn.zero_grad(set_to_none=True)


def test_pgd_at_clean_weight_mixes_losses(trained_cnn, small_batch):
    attack = PGD(eps=0.1, steps=3, random_start=False)
    from unirobust.defenses.pgd_at import PGDAT

    adv = PGDAT(attack=attack).loss(trained_cnn, small_batch)
    mixed = PGDAT(attack=attack, clean_weight=0.5).loss(trained_cnn, small_batch)
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(trained_cnn.logits(small_batch["pixel_values"]), small_batch["labels"])
    torch.testing.assert_close(mixed["loss"].detach(), 0.5 * adv["loss"].detach() + 0.5 * clean)


def test_pgd_at_text_reaches_embedding_matrix(text_adapter, sentences):
    defense = build_defense({"name": "pgd-at", "attack": {"name": "pgd", "steps": 2}},
                            ThreatModel(norm="l2", eps=0.5, relative=True))
    batch = text_adapter.collate(sentences)
    text_adapter.train()
    text_adapter.zero_grad(set_to_none=True)
    out = defense.loss(text_adapter, batch)
    assert text_adapter.training
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (4, 2)
    out["loss"].backward()
    emb = text_adapter.model.get_input_embeddings().weight.grad
    assert emb is not None
    used = batch["input_ids"].unique()
    assert emb[used].abs().sum() > 0
    head = text_adapter.model.classifier.weight.grad
    assert head is not None and head.abs().sum() > 0


def test_text_attack_accumulates_no_parameter_grads(text_adapter, sentences):
    batch = text_adapter.collate(sentences)
    text_adapter.zero_grad(set_to_none=True)
    PGD(eps=0.5, norm="l2", relative=True, steps=2)(text_adapter, batch)
    assert all(p.grad is None or not p.grad.any() for p in text_adapter.parameters())


def test_defense_without_attack_refuses_one():
    with pytest.raises(ValueError, match="attack"):
        build_defense({"name": "erm", "attack": {"name": "pgd"}})


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "mi-fgsm"])
def test_float16_text_model_with_padding_gives_finite_points(make_text_adapter, sentences, name):
    """Padding tokens have a zero gradient; in float16 a 1e-12 norm floor rounds to 0, and 0 / 0 made
    NaN points that the cascade then counted as successful attacks."""
    adapter = make_text_adapter().half().eval()
    batch = adapter.collate(sentences)
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    budget = {"pgd": {"steps": 3}, "apgd-ce": {"n_iter": 3}, "mi-fgsm": {}}[name]
    attack = build_attack({"name": name, "eps": 0.05, "norm": "l2", "relative": True, **budget})
    z = attack(adapter, batch)
    assert z.dtype == torch.float16 and torch.isfinite(z).all()
    with torch.no_grad():
        assert torch.isfinite(adapter.logits(z, batch)).all()


def test_task_step_size_only_for_the_task_budget():
    """A task's ``alpha`` is the step size of its own PGD (its eps and steps); an attack given another
    eps or number of steps takes its own default step size instead."""
    threat = ThreatModel(norm="linf", eps=0.1, steps=10, alpha=0.02)
    assert build_attack({"name": "pgd"}, threat).alpha == 0.02
    assert build_attack({"name": "pgd", "eps": 0.3}, threat).alpha is None
    assert build_attack({"name": "pgd", "steps": 3}, threat).alpha is None
    assert build_attack({"name": "pgd", "eps": 0.3, "alpha": 0.05}, threat).alpha == 0.05
    # CWA's alpha is its outer step (default eps / 5), not a PGD step size
    small = ThreatModel(norm="linf", eps=0.1, steps=10, alpha=0.01)
    cwa = build_attack({"name": "cwa"}, small)
    assert cwa.alpha is None and cwa.step_size == pytest.approx(0.02)  # eps / 5, by its own default
    assert build_attack({"name": "cwa", "alpha": 0.05}, small).alpha == 0.05
    assert build_attack({"name": "mi-fgsm"}, small).alpha == 0.01  # MI-FGSM's alpha is its step size


def test_attack_parameters_record_the_step_size_used():
    """metrics.json / eval.json record each attack's parameters: a default step size is recorded as
    the value the attack used, not null."""
    from unirobust.attacks import attack_parameters
    from unirobust.attacks.pgd import FGSM, PGD

    assert attack_parameters(PGD(eps=0.1, steps=10))["alpha"] == pytest.approx(0.025)
    assert attack_parameters(PGD(eps=0.1, steps=10, alpha=0.01))["alpha"] == 0.01
    assert attack_parameters(FGSM(eps=0.1))["alpha"] == 0.1


def test_attacks_and_predict_restore_every_submodule_mode():
    """A user's model in eval mode inside a new adapter (in train mode), or a frozen BatchNorm kept
    in eval while fine-tuning, came back from an attack in train mode (the wrapper's flag was
    restored onto every submodule)."""
    from torch import nn

    from unirobust.evaluate import cascade
    from unirobust.models.vision import VisionAdapter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 3)).eval()
    adapter = VisionAdapter(net, 3)
    batch = {"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}
    PGD(eps=0.1, norm="linf", steps=2)(adapter, batch)
    assert adapter.training and not any(m.training for m in net.modules())
    adapter.train()
    net[1].eval()  # frozen statistics while fine-tuning
    modes = {name: m.training for name, m in adapter.named_modules()}
    PGD(eps=0.1, norm="linf", steps=2)(adapter, batch)
    cascade(adapter, batch, [PGD(eps=0.1, norm="linf", steps=1)])
    adapter.predict(batch["pixel_values"].numpy())
    assert {name: m.training for name, m in adapter.named_modules()} == modes and not net[1].training


def test_attacks_refuse_pixels_outside_unit_range_and_evaluation_refuses_bad_labels():
    """Normalised (or 0-255) pixels were clamped into [0, 1] by the attack's projection: points far
    outside the ball, silently (PGD at eps 1e-6 cost 12 points); labels outside the classes were
    counted as wrong and left out of the per-class figures."""
    from torch import nn

    from unirobust.evaluate import cascade
    from unirobust.models.vision import VisionAdapter

    torch.manual_seed(0)
    adapter = VisionAdapter(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 3)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"pixel_values must lie in \[0, 1\], found -0.7"):
        PGD(eps=0.1, norm="linf", steps=1)(adapter, {"pixel_values": x * 2.25 - 0.75, "labels": y})
    PGD(eps=0.1, norm="linf", steps=1)(adapter, {"pixel_values": x, "labels": y})  # fine
    with pytest.raises(ValueError, match=r"labels must be class indices 0..2, found -1..3"):
        cascade(adapter, {"pixel_values": x, "labels": torch.tensor([0, -1, 3, 1])}, [])
