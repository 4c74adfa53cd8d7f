"""Evaluation attacks (APGD-CE / APGD-DLR, loss-alternating PGD, CW-L2) on vision and text adapters."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from unirobust.attacks import build_attack
from unirobust.attacks.alt_pgd import AltPGD
from unirobust.attacks.apgd import APGDCE, APGDDLR, checkpoints, dlr_loss, margin_loss
from unirobust.attacks.cw import CWL2
from unirobust.attacks.pgd import PGD
from unirobust.models.base import unit_norm
from unirobust.tasks import ThreatModel

TOL = 1e-5


def acc(adapter, z, batch) -> float:
    with torch.no_grad():
        return (adapter.logits(z, batch).argmax(-1) == batch["labels"]).float().mean().item()


@pytest.fixture
def batch(digits_test_batch):
    return digits_test_batch


@pytest.fixture
def small_batch(digits_test_batch):
    return {k: v[:48] for k, v in digits_test_batch.items()}


VISION_ATTACKS = {
    "apgd-ce": lambda eps, norm: APGDCE(eps=eps, norm=norm, n_iter=10),
    "apgd-dlr": lambda eps, norm: APGDDLR(eps=eps, norm=norm, n_iter=10, restarts=2),
    "alt-pgd": lambda eps, norm: AltPGD(eps=eps, norm=norm, steps=10),
    "alt-pgd-restart": lambda eps, norm: AltPGD(eps=eps, norm=norm, steps=5, restarts=2, alternate="restart"),
    "cw-l2": lambda eps, norm: CWL2(eps=eps, norm=norm, n_iter=15),
    "cw-l2-search": lambda eps, norm: CWL2(eps=eps, norm=norm, n_iter=10, binary_search_steps=3, c=0.01),
}


# ----------------------------------------------------------------------------- vision: validity


@pytest.mark.parametrize("name", list(VISION_ATTACKS))
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_vision_attack_stays_in_ball_and_box(trained_cnn, small_batch, name, norm, eps):
    z0 = small_batch["pixel_values"]
    torch.manual_seed(0)
    z = VISION_ATTACKS[name](eps, norm)(trained_cnn, small_batch)
    assert z.shape == z0.shape and not z.requires_grad
    size = unit_norm(z - z0, norm, (1, 2, 3)).flatten()
    assert (size <= eps + TOL).all()
    assert z.min() >= 0 and z.max() <= 1
    assert size.max() > 0.3 * eps  # it really moves
    assert acc(trained_cnn, z, small_batch) < acc(trained_cnn, z0, small_batch) - 0.1


@pytest.mark.parametrize("attack", [APGDCE(eps=0.0), APGDDLR(eps=0.1, n_iter=0), AltPGD(eps=0.0),
                                    AltPGD(eps=0.1, steps=0), CWL2(eps=0.0), CWL2(eps=0.5, n_iter=0)])
def test_zero_budget_returns_clean_point(trained_cnn, small_batch, attack):
    assert torch.equal(attack(trained_cnn, small_batch), small_batch["pixel_values"])


@pytest.mark.parametrize("name", ["apgd-ce", "alt-pgd", "cw-l2"])
@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_restored_and_no_parameter_grads(cnn_adapter, small_batch, name, start_training):
    cnn_adapter.train(start_training)
    cnn_adapter.zero_grad(set_to_none=True)
    modes = []
    handle = cnn_adapter.net.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    try:
        VISION_ATTACKS[name](0.1, "linf")(cnn_adapter, small_batch)
    finally:
        handle.remove()
    assert modes and not any(modes)
    assert cnn_adapter.training == start_training
    assert all(p.grad is None for p in cnn_adapter.parameters())


# ----------------------------------------------------------------------------- vision: strength


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.1), ("l2", 0.5)])
def test_apgd_ce_at_least_as_strong_as_pgd(trained_cnn, batch, norm, eps):
    """Same budget, same number of gradient steps (APGD takes one more gradient at its start)."""
    torch.manual_seed(0)
    pgd = acc(trained_cnn, PGD(eps=eps, norm=norm, steps=20)(trained_cnn, batch), batch)
    torch.manual_seed(0)
    apgd = acc(trained_cnn, APGDCE(eps=eps, norm=norm, n_iter=20)(trained_cnn, batch), batch)
    assert apgd <= pgd + 0.01, (apgd, pgd)
    assert apgd < acc(trained_cnn, batch["pixel_values"], batch) - 0.1


def test_apgd_restarts_never_lose_a_success(trained_cnn, batch):
    def broken(restarts):
        torch.manual_seed(7)
        z = APGDCE(eps=0.05, n_iter=5, restarts=restarts)(trained_cnn, batch)
        with torch.no_grad():
            return trained_cnn.logits(z).argmax(-1) != batch["labels"]

    one, three = broken(1), broken(3)
    assert (three | ~one).all() and three.sum() >= one.sum()


class Scaled(nn.Module):
    """Logits times a large factor: CE's gradient rounds to 0 in float32, the margin's does not."""

    def __init__(self, adapter, factor=1e4):
        super().__init__()
        self.adapter, self.factor, self.num_classes = adapter, factor, adapter.num_classes
        self.modality, self.ball_dims = adapter.modality, adapter.ball_dims

    def logits(self, z, batch=None):
        return self.adapter.logits(z) * self.factor

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.adapter, name)


def test_margin_losses_beat_saturated_cross_entropy(trained_cnn, batch):
    """On saturated logits PGD-CE is stuck; AltPGD (margin half) and APGD-DLR still break examples."""
    model = Scaled(trained_cnn).eval()
    torch.manual_seed(0)
    ce = acc(model, PGD(eps=0.1, steps=10, random_start=False)(model, batch), batch)
    alt = acc(model, AltPGD(eps=0.1, steps=10, random_start=False)(model, batch), batch)
    dlr = acc(model, APGDDLR(eps=0.1, n_iter=10)(model, batch), batch)
    assert ce == acc(model, batch["pixel_values"], batch)  # CE never moved
    assert alt < ce - 0.2 and dlr < ce - 0.2, (ce, alt, dlr)


def test_cw_l2_lowers_accuracy(trained_cnn, batch):
    z0 = batch["pixel_values"]
    torch.manual_seed(0)
    z = CWL2(eps=0.8, n_iter=30)(trained_cnn, batch)
    assert acc(trained_cnn, z, batch) < acc(trained_cnn, z0, batch) - 0.3
    assert (unit_norm(z - z0, "l2", (1, 2, 3)) <= 0.8 + TOL).all()


# ----------------------------------------------------------------------------- losses and schedule


def test_dlr_loss_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 1.0, 2.0, 0.0], [0.5, 0.5, 3.5, -1.0]])
    labels = torch.tensor([0, 0, 2])
    # -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
    expected = torch.tensor([-(1 - 3) / (3 - 1), -(4 - 2) / (4 - 1), -(3.5 - 0.5) / (3.5 - 0.5)])
    torch.testing.assert_close(dlr_loss(logits, labels), expected)
    torch.testing.assert_close(margin_loss(logits, labels), torch.tensor([2.0, -2.0, -3.0]))
    # shift and scale invariant
    torch.testing.assert_close(dlr_loss(3 * logits + 7, labels), expected)


def test_dlr_two_classes_falls_back_to_margin():
    logits = torch.tensor([[2.0, 5.0], [1.0, -1.0]])
    labels = torch.tensor([0, 0])
    torch.testing.assert_close(dlr_loss(logits, labels), torch.tensor([3.0, -2.0]))


def test_checkpoint_schedule_matches_autoattack():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == list(range(2, 11))
    assert checkpoints(1) == [1] and checkpoints(0) == []


def test_alt_pgd_schedule():
    it = AltPGD(eps=0.1, period=2)
    assert [it.uses_margin(0, t) for t in range(6)] == [False, False, True, True, False, False]
    rs = AltPGD(eps=0.1, alternate="restart")
    assert [rs.uses_margin(r, 3) for r in range(3)] == [False, True, False]


# ----------------------------------------------------------------------------- build_attack


def test_build_from_registry_with_task_threat():
    threat = ThreatModel(norm="l2", eps=0.5, steps=7, relative=True)
    apgd = build_attack({"name": "apgd-ce"}, threat)
    assert isinstance(apgd, APGDCE) and (apgd.eps, apgd.norm, apgd.relative, apgd.n_iter) == (0.5, "l2", True, 100)
    assert isinstance(build_attack({"name": "apgd-dlr", "n_iter": 5}, threat), APGDDLR)
    alt = build_attack({"name": "alt-pgd"}, threat)
    assert isinstance(alt, AltPGD) and (alt.eps, alt.steps) == (0.5, 7)
    cw = build_attack({"name": "cw-l2", "c": 2.0}, threat)
    assert isinstance(cw, CWL2) and (cw.eps, cw.norm, cw.c, cw.n_iter) == (0.5, "l2", 2.0, 100)
    with pytest.raises(ValidationError):
        APGDCE(eps=0.1, steps=3)  # APGD's budget is n_iter


def test_attack_of_another_norm_takes_no_task_radius():
    linf = ThreatModel(norm="linf", eps=8 / 255, steps=7)
    with pytest.raises(ValueError, match="give eps for the l2 ball"):
        build_attack({"name": "pgd", "norm": "l2"}, linf)  # 8/255 is no L2 radius for an image
    pgd = build_attack({"name": "pgd", "norm": "l2", "eps": 0.5}, linf)
    assert (pgd.norm, pgd.eps, pgd.alpha, pgd.steps) == ("l2", 0.5, None, 7)  # step follows its own eps
    same = build_attack({"name": "pgd", "norm": "linf"}, linf)
    assert (same.eps, same.steps) == (8 / 255, 7)


# ----------------------------------------------------------------------------- text


TEXT_ATTACKS = {
    "apgd-ce": lambda eps, norm, rel: APGDCE(eps=eps, norm=norm, relative=rel, n_iter=4),
    "apgd-dlr": lambda eps, norm, rel: APGDDLR(eps=eps, norm=norm, relative=rel, n_iter=4, restarts=2),
    "alt-pgd": lambda eps, norm, rel: AltPGD(eps=eps, norm=norm, relative=rel, steps=4),
    "cw-l2": lambda eps, norm, rel: CWL2(eps=eps, norm=norm, relative=rel, n_iter=4, lr=0.5),
}


def check_text_point(adapter, batch, z, norm, relative, eps):
    with torch.no_grad():
        z0 = adapter.embed(batch)
    mask = adapter.perturbable(batch)
    assert z.shape == z0.shape and not z.requires_grad
    assert torch.equal(z[~mask], z0[~mask])  # padding and special tokens untouched
    size = unit_norm(z - z0, norm, (-1,)).squeeze(-1)
    radius = eps * z0.norm(dim=-1) if relative else torch.full_like(size, eps)
    assert (size <= radius * (1 + TOL) + TOL).all()
    assert (size[mask] > 0).any()


@pytest.mark.parametrize("name", list(TEXT_ATTACKS))
@pytest.mark.parametrize("norm,relative,eps", [("l2", True, 0.5), ("linf", False, 0.05)])
def test_text_attack_moves_only_perturbable_tokens(text_adapter, sentences, name, norm, relative, eps):
    batch = text_adapter.collate(sentences)
    assert (~batch["attention_mask"].bool()).any()  # the batch has padding
    text_adapter.train()
    torch.manual_seed(0)
    z = TEXT_ATTACKS[name](eps, norm, relative)(text_adapter, batch)
    assert text_adapter.training  # mode restored
    check_text_point(text_adapter, batch, z, norm, relative, eps)


def test_text_apgd_dlr_three_classes_on_pairs(pair_adapter, pairs):
    batch = pair_adapter.collate(pairs)
    torch.manual_seed(0)
    z = APGDDLR(eps=0.5, norm="l2", relative=True, n_iter=5)(pair_adapter, batch)
    check_text_point(pair_adapter.eval(), batch, z, "l2", True, 0.5)
    with torch.no_grad():
        before = dlr_loss(pair_adapter.logits(pair_adapter.embed(batch), batch), batch["labels"])
        after = dlr_loss(pair_adapter.logits(z, batch), batch["labels"])
    assert (after >= before - 1e-6).all() and (after > before).any()


def test_text_attacks_accumulate_no_parameter_grads(text_adapter, sentences):
    batch = text_adapter.collate(sentences)
    text_adapter.zero_grad(set_to_none=True)
    for make in TEXT_ATTACKS.values():
        make(0.5, "l2", True)(text_adapter, batch)
    assert all(p.grad is None for p in text_adapter.parameters())


def test_budgets_written_as_fractions():
    """``eps: 8/255`` as the literature writes it (YAML reads it as a string) is the float 8/255."""
    threat = ThreatModel(eps="8/255", alpha="2 / 255")
    assert (threat.eps, threat.alpha) == (8 / 255, 2 / 255)
    assert build_attack({"name": "pgd", "eps": "4/255", "steps": 3}, threat).eps == 4 / 255
    for bad in ("8/0", "eight/255", "8/255/2"):
        with pytest.raises(ValidationError):
            ThreatModel(eps=bad)


def test_cascade_refuses_points_outside_the_ball_or_the_box(trained_cnn, small_batch):
    """A (registered) attack whose points leave its ball or [0, 1] would give a robust accuracy no one
    can compare: the cascade stops with what moved, and built-in attacks pass."""
    from dataclasses import dataclass

    from unirobust.evaluate import cascade

    @dataclass
    class Overshoot:
        eps: float = 0.1
        norm: str = "linf"
        relative: bool = False
        by: float = 0.3

        def __call__(self, model, batch):
            z0 = model.embed(batch)
            return (z0 + self.by * torch.sign(torch.randn_like(z0))).clamp(0, 1)

    with pytest.raises(RuntimeError, match=r"Overshoot returned points outside its ball \(linf, eps 0.1\)"):
        cascade(trained_cnn, small_batch, [Overshoot()])
    stages, _ = cascade(trained_cnn, small_batch, [Overshoot(by=0.1), PGD(eps=0.1, norm="linf", steps=2)])
    assert stages.shape[0] == 3


def test_cascade_in_bf16_passes_the_ball_check(make_text_adapter, sentences):
    """bf16 embeddings round by ~1e-3: the ball check's tolerance follows the dtype (it stopped bf16
    text runs: 'PGD returned points outside its ball ... by up to 0.000244')."""
    from unirobust.evaluate import cascade

    torch.manual_seed(0)
    adapter = make_text_adapter().to(torch.bfloat16).eval()
    batch = adapter.collate(sentences)
    stages, _ = cascade(adapter, batch, [PGD(eps=0.5, norm="l2", relative=True, steps=3),
                                         PGD(eps=0.5, norm="linf", relative=True, steps=3)])
    assert stages.shape[0] == 3


def test_evaluate_from_python_with_a_list_of_attacks_and_no_accelerator(trained_cnn, digits_data):
    from unirobust.evaluate import evaluate

    examples = [digits_data.test[i] for i in range(40)]
    m = evaluate(trained_cnn, examples, [PGD(eps=0.1, norm="linf", steps=2), PGD(eps=0.2, norm="linf", steps=2)],
                 check_examples=0)
    assert m["n"] == 40 and [s["attack"] for s in m["cascade"]] == ["PGD", "PGD #2"]
    assert m["cascade"][-1]["robust_accuracy"] <= m["cascade"][0]["robust_accuracy"] <= m["clean_accuracy"]


def test_evaluate_without_an_accelerator_leaves_the_callers_accelerate_state_alone(trained_cnn, digits_data):
    """evaluate() from a user's own loop made a default Accelerator, which reset the caller's precision
    and gradient accumulation (a shared state)."""
    from accelerate import Accelerator

    from unirobust.evaluate import evaluate

    mine = Accelerator(cpu=True, gradient_accumulation_steps=4)
    m = evaluate(trained_cnn, [digits_data.test[i] for i in range(16)], [PGD(eps=0.1, norm="linf", steps=1)],
                 check_examples=0)
    assert m["n"] == 16 and mine.gradient_accumulation_steps == 4
