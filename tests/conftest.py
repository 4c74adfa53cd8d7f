"""Shared fixtures: tiny vision and text adapters, digits data and one tiny CNN trained on digits.

Everything is built offline and small: a random tiny BERT (2 layers, hidden 32) on the packaged
MiniLM tokenizer, a plain CNN and ``timm:test_resnet`` on scikit-learn's 8x8 digits.
"""
from __future__ import annotations

from pathlib import Path

from unirobust.compat import ensure_torchvision

ensure_torchvision()  # before anything imports timm / transformers (PyPI torchvision is a CUDA build)

import pytest
import torch
from torch import nn

# One intra-op thread: the models are tiny, and on 2 shared cores a second thread competing with
# other processes makes each step orders of magnitude slower (measured: 0.4 s vs 37 s to train).
torch.set_num_threads(1)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- text


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from unirobust.offline import resolve_hf_model

    return AutoTokenizer.from_pretrained(resolve_hf_model(MINILM))


def tiny_bert_config(tokenizer, **extra):
    """A 2-layer, hidden-32 BERT configuration on the tokenizer's vocabulary (a new object per call)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, **extra)


@pytest.fixture(scope="session")
def bert_config(tokenizer):
    """``bert_config()`` -> a new tiny BERT configuration (for BertModel / BertForMaskedLM in tests)."""
    return lambda: tiny_bert_config(tokenizer)


def tiny_bert(tokenizer, num_labels: int = 2, seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(tokenizer, num_labels=num_labels))


@pytest.fixture(scope="session")
def make_text_adapter(tokenizer):
    """``make_text_adapter(num_labels, text_fields, max_length, seed)`` -> a new tiny-BERT TextAdapter."""
    from unirobust.models.text import TextAdapter

    def make(num_labels=2, text_fields=("sentence",), max_length=128, seed=0):
        return TextAdapter(tiny_bert(tokenizer, num_labels, seed), tokenizer, num_labels, list(text_fields), max_length)

    return make


@pytest.fixture
def text_adapter(tokenizer):
    """Single-sentence adapter (field ``sentence``), fresh per test (tests may change its mode / grads)."""
    from unirobust.models.text import TextAdapter

    return TextAdapter(tiny_bert(tokenizer), tokenizer, 2, ["sentence"], max_length=128)


@pytest.fixture
def pair_adapter(tokenizer):
    """Sentence-pair adapter (fields ``premise`` / ``hypothesis``), 3 classes."""
    from unirobust.models.text import TextAdapter

    return TextAdapter(tiny_bert(tokenizer, num_labels=3, seed=1), tokenizer, 3, ["premise", "hypothesis"],
                       max_length=128)


SENTENCES = [
    {"sentence": "a gripping , funny and moving film", "label": 1},
    {"sentence": "dull", "label": 0},
    {"sentence": "the plot never comes together and the actors seem bored by their own lines", "label": 0},
    {"sentence": "an unexpected delight", "label": 1},
]

#: Six labelled sentences for the defense and ensemble tests (balanced classes).
SIX_SENTENCES = [
    {"sentence": "a gripping , funny and moving film", "label": 1},
    {"sentence": "dull", "label": 0},
    {"sentence": "the plot never comes together and the actors seem bored", "label": 0},
    {"sentence": "an unexpected delight", "label": 1},
    {"sentence": "warm , witty and wise", "label": 1},
    {"sentence": "a tedious mess", "label": 0},
]

PAIRS = [
    {"premise": "a man is playing a guitar on stage", "hypothesis": "someone makes music", "label": 0},
    {"premise": "two dogs run", "hypothesis": "the animals are asleep in a basket by the fire", "label": 2},
    {"premise": "it rains", "hypothesis": "it is wet", "label": 1},
]


@pytest.fixture
def sentences():
    return [dict(e) for e in SENTENCES]


@pytest.fixture
def pairs():
    return [dict(e) for e in PAIRS]


# ----------------------------------------------------------------------------- vision


@pytest.fixture(scope="session")
def digits_task():
    from unirobust.tasks import get_task

    return get_task("digits")


@pytest.fixture(scope="session")
def digits_data(digits_task):
    from unirobust.tasks import load_task

    return load_task(digits_task)


def toy_problem(n: int, seed: int) -> dict:
    """A separable two-class image batch (1 x 16 x 16): the class shows faintly everywhere and
    strongly in a central 4 x 4 patch, so a small CNN learns it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float().view(-1, 1, 1, 1)
    x = 0.5 + 0.05 * s + 0.05 * torch.randn(n, 1, 16, 16, generator=g)
    x[:, :, 6:10, 6:10] = 0.5 + 0.3 * s + 0.05 * torch.randn(n, 1, 4, 4, generator=g)
    return {"pixel_values": x.clamp(0, 1), "labels": y}


def small_cnn(num_classes: int = 10, channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )


@pytest.fixture
def cnn_adapter(digits_task):
    """An untrained CNN adapter with the digits task's normalisation (fresh per test)."""
    from unirobust.models.vision import VisionAdapter

    torch.manual_seed(0)
    return VisionAdapter(small_cnn(), digits_task.num_classes, digits_task.mean, digits_task.std)


@pytest.fixture(scope="session")
def timm_adapter(digits_task):
    from unirobust.models import build_model

    torch.manual_seed(0)
    adapter = build_model("timm:test_resnet", digits_task)
    return adapter.eval()


def _collate_images(examples: list[dict]) -> dict:
    from unirobust.models.vision import VisionAdapter

    return VisionAdapter(nn.Identity(), 10).collate(examples)


@pytest.fixture(scope="session")
def digits_train_batch(digits_data):
    return _collate_images([digits_data.train[i] for i in range(len(digits_data.train))])


@pytest.fixture(scope="session")
def digits_test_batch(digits_data):
    """200 test images as one batch (enough for stable accuracy, cheap to attack)."""
    return _collate_images([digits_data.test[i] for i in range(200)])


@pytest.fixture(scope="session")
def trained_cnn(digits_task, digits_train_batch, digits_test_batch):
    """A CNN trained for a few seconds on digits (about 97% clean test accuracy), in eval mode.

    Session-scoped: tests must not train it further or leave it in train mode.
    """
    from unirobust.models.vision import VisionAdapter

    torch.manual_seed(0)
    adapter = VisionAdapter(small_cnn(), digits_task.num_classes, digits_task.mean, digits_task.std)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    x, y = digits_train_batch["pixel_values"], digits_train_batch["labels"]
    gen = torch.Generator().manual_seed(0)
    adapter.train()
    for _ in range(8):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(adapter.logits(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    adapter.eval()
    adapter.zero_grad(set_to_none=True)
    with torch.no_grad():
        acc = (adapter.logits(digits_test_batch["pixel_values"]).argmax(-1) == digits_test_batch["labels"]).float().mean()
    assert acc > 0.9, f"the tiny digits CNN did not train (test accuracy {acc:.2f})"
    return adapter



# ----------------------------------------------------------------------------- run folders


def write_run(run_dir: Path, raw: dict, seed: int = 0):
    """A finished run folder without training: the validated recipe ``raw`` and its model's initial
    weights (seeded). Returns (run_dir, recipe, adapter)."""
    from unirobust.models.base import build_from_config
    from unirobust.recipe import validate
    from unirobust.report import atomic_write, save_weights

    recipe = validate(raw)
    torch.manual_seed(seed)
    adapter = build_from_config(recipe.model, recipe.resolved_task)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "recipe.yaml", recipe.to_yaml())
    save_weights(adapter, run_dir / "model.safetensors")
    return run_dir, recipe, adapter


@pytest.fixture(scope="session")
def make_run():
    """``make_run(run_dir, raw_recipe, seed=0)`` -> (run_dir, recipe, adapter), see :func:`write_run`."""
    return write_run
