"""Gradient-masking sanity checks (unirobust/checks.py): each fires on a model built to fail it and
stays quiet on a normally trained one."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unirobust import checks
from unirobust.models.base import unit_norm
from unirobust.models.vision import VisionAdapter
from unirobust.tasks import ThreatModel

THREAT = ThreatModel(norm="linf", eps=0.1, steps=10)


class Quantise(nn.Module):
    """Hard rounding input stage: exact zero gradient everywhere (classic gradient masking)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class AlwaysDropout(nn.Module):
    """Dropout that ignores eval mode: a randomized model."""

    def forward(self, x):
        return F.dropout(x, 0.2, training=True)


def variant(trained_cnn, digits_task, pre=None, post=None) -> VisionAdapter:
    """The trained CNN with an extra input stage and / or output layer (weights shared)."""
    layers = [m for m in (pre, trained_cnn.net, post) if m is not None]
    return VisionAdapter(nn.Sequential(*layers), digits_task.num_classes, digits_task.mean, digits_task.std).eval()


@pytest.fixture
def batch(digits_test_batch):
    return {k: v[:64] for k, v in digits_test_batch.items()}


@pytest.fixture
def quantised(trained_cnn, digits_task):
    return variant(trained_cnn, digits_task, pre=Quantise())


# ----------------------------------------------------------------------------- each check alone


def test_quiet_on_normal_model(trained_cnn, batch):
    assert checks.check_randomness(trained_cnn, batch) == []
    assert checks.check_softmax_output(trained_cnn, batch) == []
    assert checks.check_zero_gradients(trained_cnn, batch) == []


def test_randomness_fires_on_dropout_in_eval(trained_cnn, digits_task, batch):
    model = variant(trained_cnn, digits_task, pre=AlwaysDropout())
    warnings = checks.check_randomness(model, batch)
    assert len(warnings) == 1 and "randomness" in warnings[0] and "eval" in warnings[0]


def test_softmax_fires_on_probability_outputs(trained_cnn, digits_task, batch):
    model = variant(trained_cnn, digits_task, post=nn.Softmax(dim=-1))
    warnings = checks.check_softmax_output(model, batch)
    assert len(warnings) == 1 and "logits" in warnings[0]
    # log-probabilities are fine (shift of the logits): no warning
    assert checks.check_softmax_output(variant(trained_cnn, digits_task, post=nn.LogSoftmax(-1)), batch) == []


def test_zero_gradients_fire_on_quantised_input(quantised, batch):
    warnings = checks.check_zero_gradients(quantised, batch)
    assert len(warnings) == 1 and "64/64" in warnings[0] and "BPDA" in warnings[0]


def test_zero_gradients_fire_when_a_few_examples_are_masked(trained_cnn, digits_task, batch):
    """A model that rounds only its brightest inputs masks the gradient of a few percent of them:
    robust accuracy is overstated by about that share, so any zero-gradient example is reported."""

    class QuantiseBright(nn.Module):
        def forward(self, x):  # the 3 brightest inputs of the batch are rounded (no gradient)
            bright = torch.zeros(len(x), dtype=torch.bool)
            bright[x.flatten(1).mean(1).argsort(descending=True)[:3]] = True
            return torch.where(bright.view(-1, 1, 1, 1), torch.round(x * 4) / 4, x)

    warnings = checks.check_zero_gradients(variant(trained_cnn, digits_task, pre=QuantiseBright()), batch)
    assert len(warnings) == 1 and "3/64" in warnings[0]


def test_zero_gradients_tell_saturation_apart(trained_cnn, digits_task, batch):
    class Times(nn.Module):
        def forward(self, x):
            return x * 1e4

    warnings = checks.check_zero_gradients(variant(trained_cnn, digits_task, post=Times()), batch)
    assert len(warnings) == 1 and "saturates" in warnings[0] and "apgd-dlr" in warnings[0]


def test_eps_monotonicity():
    assert checks.check_eps_monotonic({0.0: 0.95, 0.05: 0.6, 0.1: 0.3, 0.2: 0.02}) == []
    rising = checks.check_eps_monotonic({0.0: 0.95, 0.05: 0.4, 0.1: 0.55, 0.2: 0.1})
    assert len(rising) == 1 and "rises" in rising[0] and "eps=0.05" in rising[0] and "eps=0.1" in rising[0]
    flat = checks.check_eps_monotonic({0.05: 0.7, 0.1: 0.71, 0.2: 0.7})
    assert len(flat) == 1 and "hardly falls" in flat[0]
    assert checks.check_eps_monotonic({0.05: 0.0, 0.1: 0.0}) == []  # flat at zero is fine
    assert checks.check_eps_monotonic({0.05: 0.50, 0.1: 0.51, 0.2: 0.2}) == []  # within tolerance


def test_black_box_check():
    assert checks.check_black_box(white_box=0.40, black_box=0.45) == []
    warnings = checks.check_black_box(white_box=0.60, black_box=0.40, n=100, black_only=20)
    assert len(warnings) == 1 and "60.0%" in warnings[0] and "40.0%" in warnings[0] and "20 examples" in warnings[0]
    # close overall accuracies, but two examples only the gradient-free attack breaks: masked on a few inputs
    few = checks.check_black_box(white_box=0.60, black_box=0.59, n=32, black_only=2)
    assert len(few) == 1 and "broke 2 examples that the gradient attack left correct" in few[0]
    assert checks.check_black_box(white_box=0.60, black_box=0.59, n=32, black_only=1) == []  # seen on sound models


def test_random_search_stays_in_ball(trained_cnn, batch):
    z0 = batch["pixel_values"]
    for norm, eps in (("linf", 0.1), ("l2", 0.8)):
        torch.manual_seed(0)
        z = checks.RandomSearch(eps=eps, norm=norm, n_queries=20)(trained_cnn, batch)
        assert (unit_norm(z - z0, norm, (1, 2, 3)) <= eps + 1e-5).all() and z.min() >= 0 and z.max() <= 1
        with torch.no_grad():
            assert (trained_cnn.logits(z).argmax(-1) == batch["labels"]).float().mean() < 1.0


def test_random_search_text_leaves_special_tokens(text_adapter, sentences):
    batch = text_adapter.collate(sentences)
    with torch.no_grad():
        z0 = text_adapter.embed(batch)
    z = checks.RandomSearch(eps=0.5, norm="l2", relative=True, n_queries=5)(text_adapter, batch)
    mask = text_adapter.perturbable(batch)
    assert torch.equal(z[~mask], z0[~mask]) and not torch.equal(z[mask], z0[mask])


# ----------------------------------------------------------------------------- run_checks


def test_run_checks_quiet_on_normal_model(trained_cnn, batch, capsys):
    trained_cnn.train()
    try:
        assert checks.run_checks(trained_cnn, batch, THREAT, n_queries=30) == []
        assert trained_cnn.training  # mode restored
    finally:
        trained_cnn.eval()
    assert capsys.readouterr().out == ""


def test_run_checks_on_masked_model(quantised, batch, caplog, capsys):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="unirobust.checks"):
        warnings = checks.run_checks(quantised, batch, THREAT, n_queries=50)
    text = "\n".join(warnings)
    assert "zero gradients" in text and "hardly falls" in text and "black box beats white box" in text
    assert [r.getMessage() for r in caplog.records] == warnings  # logged, once each
    assert capsys.readouterr().out == ""  # never printed


def test_run_checks_uses_given_accuracies(trained_cnn, batch):
    warnings = checks.run_checks(trained_cnn, batch, THREAT, {0.05: 0.3, 0.1: 0.5}, black_box=False)
    assert len(warnings) == 1 and "rises" in warnings[0]
    given = {"by_eps": {0.05: 0.6, 0.1: 0.3}, "white_box": 0.3, "black_box": 0.1}
    warnings = checks.run_checks(trained_cnn, batch, THREAT, given)
    assert len(warnings) == 1 and "black box" in warnings[0]


def test_run_checks_text(text_adapter, sentences):
    batch = text_adapter.collate(sentences)
    threat = ThreatModel(norm="l2", eps=0.5, steps=2, relative=True)
    assert checks.run_checks(text_adapter, batch, threat, sweep=False, black_box=False) == []
    checks.run_checks(text_adapter, batch, threat, n_queries=3)  # the attack-based checks run on text too


def test_zero_gradients_ignore_examples_with_nothing_to_move(make_text_adapter):
    """An empty text has no perturbable token, so its gradient is 0 by construction, not masking."""
    from unirobust.checks import check_zero_gradients

    adapter = make_text_adapter().eval()
    batch = adapter.collate([{"sentence": "", "label": 0}] * 3 + [{"sentence": "a fine film", "label": 1}])
    assert check_zero_gradients(adapter, batch) == []


def test_checks_and_evaluation_leave_a_training_mode_model_unchanged(digits_task, digits_data):
    """After training the model is still in train mode: checks and evaluation must measure it in eval
    mode (a train-mode forward updates BatchNorm statistics, i.e. changes the model measured next)."""
    from unirobust.attacks import build_attack
    from unirobust.checks import run_checks
    from unirobust.evaluate import evaluate
    from unirobust.models import build_model
    from unirobust.train import make_accelerator

    torch.manual_seed(0)
    model = build_model("timm:test_resnet", digits_task)
    data = digits_data.test.select(range(32))
    batch = model.collate([data[i] for i in range(32)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.eval().logits(model.embed(batch), batch).argmax(-1) == batch["labels"]
    model.train()
    run_checks(model, batch, digits_task.threat, n_queries=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = evaluate(model, data, {"fgsm": build_attack({"name": "fgsm"}, digits_task.threat)}, make_accelerator(),
                       batch_size=16, threat=digits_task.threat, check_examples=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert metrics["clean_accuracy"] == pytest.approx(expected.float().mean().item())
    assert model.training  # its mode is restored


def test_flat_curve_check_reaches_a_budget_that_breaks_a_working_model(trained_cnn, batch):
    """Up to 2 eps a model robust well beyond a small budget is flat (a false alarm on 6 of 11 batches
    of a plain model at eps 0.01); the sweep now reaches the whole pixel range / a unit's own size."""
    assert checks.large_factor(ThreatModel(norm="linf", eps=0.01)) == pytest.approx(100)
    assert checks.large_factor(ThreatModel(norm="l2", eps=0.5)) == 8
    assert checks.large_factor(ThreatModel(norm="l2", eps=0.05, relative=True)) == pytest.approx(20)
    small = ThreatModel(norm="linf", eps=0.002, steps=10)
    assert not [w for w in checks.run_checks(trained_cnn, batch, small, black_box=False) if "monotonicity" in w]
