"""Adversarial-training defenses (unirobust/defenses): TRADES, MART, FAT, FGSM-AT (+ GradAlign / AAER),
Free-AT, FreeLB, embedding AT, IAT and the re-weighting helpers, on both modalities.

Models are tiny and built here: a one-conv CNN on a toy two-class 16 x 16 problem (a strong, robust
centre patch plus weak, non-robust +-0.05 shifts of every pixel: ERM uses the weak features and is
not robust at Linf eps 0.1; adversarial training learns the patch), and a random 2-layer BERT
(hidden 32, no dropout) on the offline MiniLM tokenizer.
"""
from __future__ import annotations

from unirobust.compat import ensure_torchvision

ensure_torchvision()  # before transformers is imported

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SIX_SENTENCES, toy_problem
from unirobust.attacks.pgd import PGD
from unirobust.defenses import build_defense
from unirobust.defenses.reweight import ClassConfusion, class_weights, dro_instance_weights
from unirobust.models.base import unit_norm
from unirobust.models.vision import VisionAdapter
from unirobust.tasks import ThreatModel

torch.set_num_threads(1)  # tiny models on shared cores: one thread is much faster

VISION_THREAT = ThreatModel(norm="linf", eps=0.1, steps=3)
TEXT_THREAT = ThreatModel(norm="l2", eps=0.5, relative=True, steps=2)

# cheap settings of every defense (attack budgets come from the threat above)
SPECS = {
    "pgd-at-reweighted": {"name": "pgd-at", "instance_reweight": 1.0, "class_reweight": True},
    "trades": {"name": "trades"},
    "trades-reweighted": {"name": "trades", "instance_reweight": 1.0, "class_reweight": True},
    "mart": {"name": "mart"},
    "mart-reweighted": {"name": "mart", "instance_reweight": 0.5, "class_reweight": True},
    "fat": {"name": "fat"},
    "fat-reweighted": {"name": "fat", "tau": 1, "instance_reweight": 1.0, "class_reweight": True},
    "fgsm-at": {"name": "fgsm-at"},
    "fgsm-at-gradalign": {"name": "fgsm-at", "guard": "gradalign"},
    "fgsm-at-aaer": {"name": "fgsm-at", "guard": "aaer"},
    "free-at": {"name": "free-at"},
    "freelb": {"name": "freelb"},
    "embedding-at": {"name": "embedding-at", "steps": 3, "alpha": 0.5, "away_weight": 0.5},
    "iat": {"name": "iat"},
}


# ----------------------------------------------------------------------------- models and data


def toy_cnn(seed: int = 0) -> VisionAdapter:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
    return VisionAdapter(net, 2)


@pytest.fixture(scope="module")
def toy_train():
    return toy_problem(512, 0)


@pytest.fixture(scope="module")
def toy_test():
    return toy_problem(256, 1)


@pytest.fixture
def vision_batch(toy_train):
    return {k: v[:32] for k, v in toy_train.items()}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from unirobust.offline import resolve_hf_model

    return AutoTokenizer.from_pretrained(resolve_hf_model("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.fixture
def tiny_text(minilm_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    from unirobust.models.text import TextAdapter

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return TextAdapter(BertForSequenceClassification(cfg), minilm_tokenizer, 2, ["sentence"], max_length=32)


SENTENCES = SIX_SENTENCES


@pytest.fixture
def text_batch(tiny_text):
    return tiny_text.collate(SENTENCES)


# ----------------------------------------------------------------------------- instruments


class CountingView:
    """A training view (like train.TrainView) that counts and records its ``logits`` calls."""

    def __init__(self, adapter):
        self.unwrapped = adapter
        self.calls = 0
        self.inputs: list[torch.Tensor] = []

    def logits(self, z, batch):
        self.calls += 1
        self.inputs.append(z.detach().clone())
        return self.unwrapped.logits(z, batch)

    def __getattr__(self, name):
        return getattr(self.unwrapped, name)


class BackwardReach:
    """Counts the forward passes (through the last Linear layer) that a backward pass goes through."""

    def __init__(self, adapter):
        last = [m for m in adapter.modules() if isinstance(m, nn.Linear)][-1]
        self.fired = 0
        self.forwards = 0
        self.handle = last.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.forwards += 1
        if output.requires_grad:
            output.register_hook(self._count)

    def _count(self, grad):
        self.fired += 1

    def close(self):
        self.handle.remove()


def run_defense(defense, view, batch) -> dict:
    """One training step of a defense, as train.defense_step does (step if it has one)."""
    if hasattr(defense, "step"):
        return defense.step(view, batch, lambda loss: loss.backward())
    out = defense.loss(view, batch)
    out["loss"].backward()
    return out


def robust_accuracy(adapter, batch) -> float:
    adapter.eval()
    torch.manual_seed(0)
    z = PGD(eps=0.1, steps=10)(adapter, batch)
    with torch.no_grad():
        return (adapter.logits(z, batch).argmax(-1) == batch["labels"]).float().mean().item()


def train_toy(spec: dict, data: dict, steps: int = 20) -> VisionAdapter:
    adapter = toy_cnn()
    defense = build_defense(spec, VISION_THREAT)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    replays = int(getattr(defense, "replays", 1))
    adapter.train()
    torch.manual_seed(1)
    for i in range(max(1, steps // replays)):
        idx = torch.arange(i * 64, i * 64 + 64) % len(data["labels"])
        batch = {k: v[idx] for k, v in data.items()}
        for _ in range(replays):
            opt.zero_grad()
            run_defense(defense, adapter, batch)
            opt.step()
    return adapter.eval()


# ----------------------------------------------------------------------------- every defense, both modalities


@pytest.mark.parametrize("modality", ["vision", "text"])
@pytest.mark.parametrize("key", list(SPECS))
def test_loss_finite_and_gradients_reach_the_model(key, modality, request):
    if modality == "vision":
        adapter, batch, threat = toy_cnn(), request.getfixturevalue("vision_batch"), VISION_THREAT
    else:
        fixture = request.getfixturevalue
        adapter, batch, threat = fixture("tiny_text"), fixture("text_batch"), TEXT_THREAT
    defense = build_defense(SPECS[key], threat)
    view = CountingView(adapter)
    reach = BackwardReach(adapter)
    adapter.train()
    adapter.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    try:
        if hasattr(defense, "step"):
            out = defense.step(view, batch, lambda loss: loss.backward())
            assert reach.fired == view.calls == defense.steps
        else:
            out = defense.loss(view, batch)
            # the inner attack took input gradients only: no parameter gradient leaked out of it
            assert all(p.grad is None for p in adapter.parameters())
            reach.fired = 0
            out["loss"].backward()
            # backward runs through the training-view forwards only, never through the attack's
            # (detached) forwards; GradAlign's double backward may revisit fewer hooks
            if key == "fgsm-at-gradalign":
                assert 1 <= reach.fired <= view.calls
            else:
                assert reach.fired == view.calls
    finally:
        reach.close()
    assert adapter.training, "the attack must restore training mode"
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["logits"].shape == (len(batch["labels"]), 2)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.get("stats", {}).values())
    grads = [p.grad for p in adapter.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    head = [m for m in adapter.modules() if isinstance(m, nn.Linear)][-1].weight.grad
    assert head is not None and head.abs().sum() > 0
    first = next(p for p in adapter.parameters() if p.requires_grad).grad
    assert first is not None and first.abs().sum() > 0  # gradients reach the input layer
    if modality == "text":
        emb = adapter.model.get_input_embeddings().weight.grad
        assert emb is not None and emb[batch["input_ids"].unique()].abs().sum() > 0


@pytest.fixture(scope="module")
def erm_robust(toy_train, toy_test):
    adapter = train_toy({"name": "erm"}, toy_train)
    with torch.no_grad():
        clean = (adapter.logits(toy_test["pixel_values"]).argmax(-1) == toy_test["labels"]).float().mean().item()
    assert clean > 0.95, "the toy problem should be easy for ERM"
    return robust_accuracy(adapter, toy_test)


@pytest.mark.parametrize("key", [k for k in SPECS if not k.endswith("reweighted")] + ["trades-reweighted"])
def test_training_beats_erm_under_pgd(key, toy_train, toy_test, erm_robust):
    adapter = train_toy(SPECS[key], toy_train)
    robust = robust_accuracy(adapter, toy_test)
    assert erm_robust < 0.5
    assert robust > erm_robust + 0.3, (key, robust, erm_robust)


# ----------------------------------------------------------------------------- TRADES, MART


def test_trades_inner_attack_maximises_kl(vision_batch):
    from unirobust.defenses.trades import kl_per_example, kl_pgd

    adapter = toy_cnn().eval()
    attack = PGD(eps=0.1, steps=5)
    torch.manual_seed(0)
    z = kl_pgd(adapter, vision_batch, attack)
    z0 = vision_batch["pixel_values"]
    assert not z.requires_grad
    assert (unit_norm(z - z0, "linf", (1, 2, 3)) <= 0.1 + 1e-6).all() and z.min() >= 0 and z.max() <= 1
    with torch.no_grad():
        clean = adapter.logits(z0)
        kl_adv = kl_per_example(clean, adapter.logits(z)).mean()
        kl_rand = kl_per_example(clean, adapter.logits((z0 + 0.1 * torch.randn_like(z0).sign()).clamp(0, 1))).mean()
    assert kl_adv > 2 * kl_rand > 0


def test_trades_beta_zero_is_clean_cross_entropy(vision_batch):
    adapter = toy_cnn().eval()
    out = build_defense({"name": "trades", "beta": 0.0}, VISION_THREAT).loss(adapter, vision_batch)
    with torch.no_grad():
        clean = F.cross_entropy(adapter.logits(vision_batch["pixel_values"]), vision_batch["labels"])
    torch.testing.assert_close(out["loss"].detach(), clean)


def test_mart_boosted_ce_penalises_the_runner_up():
    from unirobust.defenses.mart import boosted_ce

    labels = torch.tensor([0, 0])
    confident = torch.tensor([[5.0, 0.0, 0.0], [5.0, 4.9, 0.0]])
    b = boosted_ce(confident, labels)
    ce = F.cross_entropy(confident, labels, reduction="none")
    assert (b > ce).all() and (b - ce)[1] > (b - ce)[0]  # a close runner-up costs more


# ----------------------------------------------------------------------------- FAT


def test_fat_stops_early(toy_train, vision_batch, text_batch, tiny_text):
    from unirobust.defenses.fat import early_stopped_pgd

    erm = train_toy({"name": "erm"}, toy_train, steps=10)  # non-robust: PGD breaks it in a few steps
    attack = PGD(eps=0.1, steps=10)
    torch.manual_seed(0)
    out = build_defense({"name": "fat", "attack": {"name": "pgd", "steps": 10}}, VISION_THREAT).loss(erm, vision_batch)
    mean_steps = out["stats"]["fat_steps"] / out["stats"]["n_examples"]
    assert mean_steps < 0.6 * attack.steps, mean_steps
    torch.manual_seed(0)
    _, steps_tau0 = early_stopped_pgd(erm, vision_batch, attack, tau=0)
    torch.manual_seed(0)
    _, steps_tau3 = early_stopped_pgd(erm, vision_batch, attack, tau=3)
    assert steps_tau3.float().mean() > steps_tau0.float().mean()
    assert (steps_tau3 <= attack.steps).all()
    # stopped points are misclassified (tau = 0: the first misclassified point is kept)
    torch.manual_seed(0)
    z, steps = early_stopped_pgd(erm, vision_batch, attack, tau=0, omega=0.0)
    with torch.no_grad():
        wrong = erm.logits(z).argmax(-1) != vision_batch["labels"]
    assert wrong[steps < attack.steps].all()
    # text: step counts are bounded and the points stay in the per-token ball
    torch.manual_seed(0)
    tattack = PGD(eps=0.5, norm="l2", relative=True, steps=4)
    zt, st = early_stopped_pgd(tiny_text, text_batch, tattack)
    z0 = tiny_text.embed(text_batch).detach()
    assert st.shape == (len(SENTENCES),) and (st <= 4).all()
    assert (unit_norm(zt - z0, "l2", (-1,)) <= 0.5 * unit_norm(z0, "l2", (-1,)) + 1e-5).all()


# ----------------------------------------------------------------------------- FGSM-AT and its guards


class Oscillator(nn.Module):
    """logit_1 = 4 cos(60 * sum(x)): the loss oscillates faster than the FGSM step, so the step often lowers it."""

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), 4 * torch.cos(60 * s)], dim=-1)


def test_aae_counter_fires_on_a_curved_model():
    torch.manual_seed(0)
    batch = {"pixel_values": torch.full((64, 1, 2, 2), 0.5), "labels": torch.zeros(64, dtype=torch.long)}
    curved = VisionAdapter(Oscillator(), 2)
    out = build_defense({"name": "fgsm-at", "guard": "aaer"}, VISION_THREAT).loss(curved, batch)
    assert out["stats"]["n_examples"] == 64
    assert 5 <= out["stats"]["aae_count"] < 64, out["stats"]
    assert "aaer" in out and out["aaer"] > 0  # the regulariser is on when AAEs exist
    # counted with guard none too
    torch.manual_seed(0)
    plain = build_defense({"name": "fgsm-at"}, VISION_THREAT).loss(curved, batch)
    assert plain["stats"]["aae_count"] > 0 and "aaer" not in plain
    # a linear model has a convex loss in the input: one projected signed step never lowers it
    linear = VisionAdapter(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 2)
    torch.manual_seed(0)
    batch["labels"] = torch.randint(0, 2, (64,))
    assert build_defense({"name": "fgsm-at"}, VISION_THREAT).loss(linear, batch)["stats"]["aae_count"] == 0


class LearnedOscillator(Oscillator):
    """Oscillator with a learnable amplitude, so the loss has a parameter gradient."""

    def __init__(self):
        super().__init__()
        self.amplitude = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        return super().forward(x) * self.amplitude / 4


def test_aaer_loss_drop_term_has_no_gradient_as_in_the_reference_code():
    # the reference code detaches both losses of lambda_aae_loss x (CE(start) - CE(adv)): with the
    # variation term off, AAER trains exactly as plain FGSM-RS (a gradient through CE(adv) there
    # would push the abnormal examples' loss up)
    batch = {"pixel_values": torch.full((64, 1, 2, 2), 0.5), "labels": torch.zeros(64, dtype=torch.long)}
    grads = {}
    for guard in ("none", "aaer"):
        model = VisionAdapter(LearnedOscillator(), 2)
        torch.manual_seed(0)
        defense = build_defense({"name": "fgsm-at", "guard": guard, "lambda_aae_variation": 0.0}, VISION_THREAT)
        out = defense.loss(model, batch)
        out["loss"].backward()
        grads[guard] = model.net.amplitude.grad.clone()
        if guard == "aaer":
            assert 0 < out["stats"]["aae_count"] < 64 and out["aaer"] > 0  # the term is there, in the value
    assert grads["none"].abs() > 0
    assert torch.allclose(grads["aaer"], grads["none"])


def test_gradalign_penalises_misaligned_gradients(vision_batch):
    adapter = toy_cnn().train()
    torch.manual_seed(0)
    out = build_defense({"name": "fgsm-at", "guard": "gradalign", "lambda_gradalign": 1.0}, VISION_THREAT).loss(
        adapter, vision_batch)
    cos = out["stats"]["gradalign_cos_sum"] / out["stats"]["n_examples"]
    assert -1 <= cos <= 1
    torch.testing.assert_close(out["gradalign"], torch.tensor(1 - cos), atol=1e-4, rtol=1e-4)
    # the penalty has a parameter gradient of its own (double backpropagation)
    adapter.zero_grad(set_to_none=True)
    (out["loss"] - out["adv_loss"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_fgsm_step_size_and_ball(vision_batch):
    """alpha = 1.25 eps from a random start, projected back to the eps ball and [0, 1]."""
    from unirobust.defenses.fgsm_at import FGSMAT

    adapter = toy_cnn().train()
    view = CountingView(adapter)
    torch.manual_seed(0)
    FGSMAT(attack=PGD(eps=0.1)).loss(view, vision_batch)
    z_adv, z0 = view.inputs[-1], vision_batch["pixel_values"]
    assert (unit_norm(z_adv - z0, "linf", (1, 2, 3)) <= 0.1 + 1e-6).all()
    assert ((z_adv - z0).abs() > 0.099).float().mean() > 0.5  # the 1.25 eps step mostly ends on the boundary


# ----------------------------------------------------------------------------- Free-AT


def test_free_at_perturbation_persists_and_moves(toy_train, tiny_text, text_batch):
    from unirobust.defenses.free_at import FreeAT

    adapter = toy_cnn().train()
    defense = FreeAT(attack=PGD(eps=0.1))
    assert defense.replays == 4
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    batch = {k: v[:32] for k, v in toy_train.items()}
    z0 = batch["pixel_values"]
    deltas, grads = [], []
    for _ in range(3):
        out = defense.loss(adapter, batch)
        deltas.append(defense.delta.clone())
        used = (z0 + defense.delta).clamp(0, 1).requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(adapter.logits(used), batch["labels"]), used)[0])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert deltas[0].abs().sum() == 0  # starts at zero
    assert not torch.equal(deltas[1], deltas[0]) and not torch.equal(deltas[2], deltas[1])
    # each replay moves delta by eps * sign(input gradient of the previous replay's own backward)
    for k in (1, 2):
        expected = (deltas[k - 1] + 0.1 * grads[k - 1].sign()).clamp(-0.1, 0.1)
        torch.testing.assert_close(deltas[k], expected)
    # carried to the next batch of the same shape, reset when the shape changes
    nxt = {k: v[32:64] for k, v in toy_train.items()}
    defense.loss(adapter, nxt)
    torch.testing.assert_close(defense.delta, (deltas[2] + 0.1 * grads[2].sign()).clamp(-0.1, 0.1))
    defense.loss(adapter, {k: v[:16] for k, v in toy_train.items()})
    assert defense.delta.abs().sum() == 0
    # text: the perturbation only moves real, non-special tokens
    tdef = FreeAT(attack=PGD(eps=0.5, norm="l2", relative=True))
    tiny_text.train()
    for _ in range(2):
        out = tdef.loss(tiny_text, text_batch)
        out["loss"].backward()
    tdef.loss(tiny_text, text_batch)
    moved = tdef.delta.abs().sum(-1) > 0
    assert moved.any() and not moved[~tiny_text.perturbable(text_batch)].any()


# ----------------------------------------------------------------------------- FreeLB


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_freelb_accumulates_k_backward_passes(modality, vision_batch, request):
    if modality == "vision":
        adapter, batch, threat = toy_cnn(), vision_batch, VISION_THREAT
    else:
        fixture = request.getfixturevalue
        adapter, batch, threat = fixture("tiny_text"), fixture("text_batch"), TEXT_THREAT
    defense = build_defense({"name": "freelb"}, threat)
    assert defense.steps == 3
    adapter.train()
    adapter.zero_grad(set_to_none=True)
    view = CountingView(adapter)
    reach = BackwardReach(adapter)
    losses = []

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    torch.manual_seed(0)
    try:
        out = defense.step(view, batch, backward)
    finally:
        reach.close()
    assert len(losses) == 3 and reach.forwards == 3  # exactly K forward and K backward passes
    torch.testing.assert_close(out["loss"], torch.stack(losses).sum())  # mean of the K losses (each / K)
    # the K perturbed points differ (delta ascends) and stay in the ball
    z0 = adapter.embed(batch).detach()
    assert not torch.equal(view.inputs[0], view.inputs[1]) and not torch.equal(view.inputs[1], view.inputs[2])
    radius = adapter.radius(z0, batch, defense.attack)
    for z in view.inputs:
        assert (unit_norm(z - z0, threat.norm, adapter.ball_dims) <= radius + 1e-5).all()
    # accumulated parameter gradients = sum over the recorded points of grad(CE / K)
    got = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad(set_to_none=True)
    for z in view.inputs:
        z_in = adapter.embed(batch) + (z - z0)
        (F.cross_entropy(adapter.logits(z_in, batch), batch["labels"]) / 3).backward()
    want = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)
    # loss() (for callers without backward) has the same objective
    adapter.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    assert torch.isfinite(defense.loss(adapter, batch)["loss"])


def test_freelb_passes_of_one_batch_share_one_dropout_mask(make_text_adapter, text_batch):
    # FreeLB's reference code reuses the first pass's dropout masks in all K passes: with the
    # perturbation held still (zero start, tiny step), the K losses of one batch are then equal; the
    # next batch draws new masks (the random stream moves on)
    adapter = make_text_adapter(max_length=32).train()  # dropout 0.1
    defense = build_defense({"name": "freelb", "init": 0.0, "alpha": 1e-9}, TEXT_THREAT)
    batch = {k: v for k, v in text_batch.items()}
    calls = []
    for _ in range(2):
        losses = []
        defense.step(adapter, batch, lambda loss: (losses.append(loss.item()), loss.backward()))
        calls.append(losses)
    for losses in calls:
        assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[1] == pytest.approx(losses[2], abs=1e-6)
    assert calls[0][0] != pytest.approx(calls[1][0], abs=1e-6)  # masks differ between batches
    # same_dropout: false draws a mask per pass (the K losses differ)
    independent = build_defense({"name": "freelb", "init": 0.0, "alpha": 1e-9, "same_dropout": False}, TEXT_THREAT)
    losses = []
    independent.step(adapter, batch, lambda loss: (losses.append(loss.item()), loss.backward()))
    assert losses[0] != pytest.approx(losses[1], abs=1e-6)
    # loss() (no backward) shares the mask too: its mean equals one pass's loss
    first = defense.loss(adapter, batch)
    assert first["loss"].item() == pytest.approx(F.cross_entropy(first["logits"], batch["labels"]).item(), abs=1e-6)


# ----------------------------------------------------------------------------- embedding AT, IAT


def test_embedding_at_ball_is_relative_per_token(tiny_text, text_batch):
    from unirobust.defenses.embedding_at import sign_pgd

    defense = build_defense({"name": "embedding-at", "steps": 4}, TEXT_THREAT)
    z = sign_pgd(tiny_text, text_batch, defense.ball(), steps=4, alpha=0.5)
    z0 = tiny_text.embed(text_batch).detach()
    dist = unit_norm(z - z0, "l2", (-1,)).squeeze(-1)
    bound = 0.5 * unit_norm(z0, "l2", (-1,)).squeeze(-1)
    movable = tiny_text.perturbable(text_batch)
    assert (dist <= bound + 1e-5).all() and (dist[~movable] == 0).all()
    assert (dist[movable] > 0.9 * bound[movable]).all()  # 4 steps of half the radius reach the boundary


def test_iat_mixes_text_attention_masks(tiny_text, text_batch):
    from unirobust.defenses.iat import mix_batch

    perm = torch.arange(len(SENTENCES)).flip(0)
    mixed = mix_batch(text_batch, perm)
    assert torch.equal(mixed["attention_mask"], torch.maximum(text_batch["attention_mask"],
                                                              text_batch["attention_mask"][perm]))
    assert mix_batch({"pixel_values": torch.zeros(2, 1, 2, 2), "labels": torch.zeros(2)}, perm[:2]).keys() == \
        {"pixel_values", "labels"}


# ----------------------------------------------------------------------------- re-weighting


def test_dro_instance_weights():
    losses = torch.tensor([0.1, 0.5, 2.0, 1.0])
    w = dro_instance_weights(losses, kl_coef=1.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.softmax(losses, 0) * 4)
    assert torch.equal(w.argsort(), losses.argsort())  # harder examples weigh more
    flat = dro_instance_weights(losses, kl_coef=1e4)
    torch.testing.assert_close(flat, torch.ones(4), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        dro_instance_weights(losses, 0.0)


def test_class_weights_upweight_the_most_confused_pair():
    confusion = torch.tensor([[80.0, 20.0, 0.0, 0.0],
                              [30.0, 70.0, 0.0, 0.0],
                              [0.0, 0.0, 95.0, 5.0],
                              [0.0, 0.0, 0.0, 100.0]])
    w = class_weights(confusion)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert w[0] == w[1] and w[0] > w[2] == w[3]
    torch.testing.assert_close(class_weights(torch.eye(4) * 50), torch.ones(4))
    tracker = ClassConfusion(4, momentum=0.0)
    tracker.update(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 0, 0, 1, 2]))
    lw = tracker.weights(torch.tensor([0, 1, 2, 3]))
    assert lw[0] == lw[1] > lw[2] == lw[3]


def test_reweighting_changes_the_loss_only_when_on(vision_batch):
    adapter = toy_cnn().eval()
    torch.manual_seed(0)
    plain = build_defense({"name": "mart"}, VISION_THREAT).loss(adapter, vision_batch)["loss"]
    torch.manual_seed(0)
    weighted = build_defense({"name": "mart", "instance_reweight": 0.1}, VISION_THREAT).loss(adapter, vision_batch)
    assert weighted["loss"] > plain  # focusing on the hardest examples raises the batch loss


# ----------------------------------------------------------------------------- construction and the loop


def test_defaults_follow_the_papers():
    d = {name: build_defense({"name": name}, VISION_THREAT) for name in
         ("trades", "mart", "fat", "fgsm-at", "free-at", "freelb", "embedding-at", "iat")}
    assert d["trades"].beta == 6.0 and d["trades"].attack.eps == 0.1 and d["trades"].attack.steps == 3
    assert d["mart"].lam == 6.0
    assert d["fat"].tau == 0
    assert d["fgsm-at"].alpha == 1.25 and d["fgsm-at"].random_start and d["fgsm-at"].guard == "none"
    assert d["free-at"].replays == 4 and not callable(getattr(d["free-at"], "step", None))
    assert d["freelb"].steps == 3 and callable(d["freelb"].step)
    assert d["embedding-at"].steps == 10 and d["embedding-at"].utility_weight == 1.0
    assert d["iat"].alpha == 1.0
    with pytest.raises(Exception):
        build_defense({"name": "fgsm-at", "guard": "magic"}, VISION_THREAT)
    with pytest.raises(Exception):
        build_defense({"name": "trades", "gamma": 1.0}, VISION_THREAT)


def test_train_loop_defense_step_dispatch(vision_batch):
    from unirobust.train import defense_step

    class Accel:
        def __init__(self):
            self.calls = 0

        def backward(self, loss):
            self.calls += 1
            loss.backward()

    adapter = toy_cnn().train()
    for spec, calls in (({"name": "freelb"}, 3), ({"name": "free-at"}, 1), ({"name": "trades"}, 1)):
        accel = Accel()
        adapter.zero_grad(set_to_none=True)
        out = defense_step(build_defense(spec, VISION_THREAT), adapter, vision_batch, accel)
        assert accel.calls == calls and torch.isfinite(out["loss"])
