"""The adapter contract (unirobust/models): embed/logits round trip, projection, masks, collate, predict."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unirobust.models import ModelAdapter
from unirobust.models.base import unit_norm

TOL = 1e-5


def threat(eps, norm="linf", relative=False):
    return SimpleNamespace(eps=eps, norm=norm, relative=relative)


def per_image_norm(delta, norm):
    return unit_norm(delta, norm, (1, 2, 3)).flatten()


def per_token_norm(delta, norm):
    return unit_norm(delta, norm, (-1,)).squeeze(-1)


# ----------------------------------------------------------------------------- vision


@pytest.fixture(params=["cnn", "timm"])
def vision(request, cnn_adapter, timm_adapter):
    adapter = cnn_adapter if request.param == "cnn" else timm_adapter
    return adapter.eval()


@pytest.fixture
def image_batch(digits_test_batch):
    return {k: v[:16] for k, v in digits_test_batch.items()}


def test_adapters_satisfy_protocol(cnn_adapter, timm_adapter, text_adapter):
    for adapter in (cnn_adapter, timm_adapter, text_adapter):
        assert isinstance(adapter, ModelAdapter)
    assert cnn_adapter.modality == "vision" and text_adapter.modality == "text"


def test_vision_logits_of_embed_equal_plain_net(vision, image_batch, digits_task):
    x = image_batch["pixel_values"]
    z = vision.embed(image_batch)
    assert torch.equal(z, x)  # the continuous point is the [0, 1] pixels themselves
    mean = torch.tensor(digits_task.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits_task.std).view(1, -1, 1, 1)
    with torch.no_grad():
        ours = vision.logits(z, image_batch)
        plain = vision.net((x - mean) / std)
    assert ours.shape == (16, digits_task.num_classes)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    # the normalisation really matters (the comparison above would catch a missing one)
    with torch.no_grad():
        assert not torch.allclose(vision.net(x), plain, atol=1e-3)


def test_timm_model_sized_for_task(timm_adapter, digits_task):
    net = timm_adapter.net
    assert net.num_classes == digits_task.num_classes
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == digits_task.image_shape[0]
    torch.testing.assert_close(timm_adapter.mean.flatten(), torch.tensor(digits_task.mean))
    torch.testing.assert_close(timm_adapter.std.flatten(), torch.tensor(digits_task.std))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_vision_project_ball_and_pixel_range(vision, image_batch, norm, eps):
    z0 = vision.embed(image_batch)
    torch.manual_seed(0)
    z = z0 + torch.randn_like(z0)  # far outside both the ball and [0, 1]
    p = vision.project(z, z0, image_batch, threat(eps, norm))
    assert p.shape == z0.shape
    assert (per_image_norm(p - z0, norm) <= eps + TOL).all()
    assert p.min() >= 0.0 and p.max() <= 1.0
    # a projection: points already valid do not move
    torch.testing.assert_close(vision.project(p, z0, image_batch, threat(eps, norm)), p, rtol=0, atol=1e-6)
    inside = (z0 + 0.2 * (p - z0)).clamp(0, 1)
    torch.testing.assert_close(vision.project(inside, z0, image_batch, threat(eps, norm)), inside, rtol=0, atol=1e-6)


def test_vision_refuses_a_relative_budget(vision, image_batch):
    """A relative budget scales by token embedding norms; on pixels it was silently absolute."""
    z0 = vision.embed(image_batch)
    with pytest.raises(ValueError, match="relative budgets"):
        vision.project(z0, z0, image_batch, threat(0.05, "l2", relative=True))


def test_vision_project_linf_saturates_where_pixels_allow(cnn_adapter, image_batch):
    z0 = cnn_adapter.embed(image_batch)
    z = z0 + 1.0  # push every pixel up by far more than eps
    p = cnn_adapter.project(z, z0, image_batch, threat(0.1, "linf"))
    torch.testing.assert_close(p, (z0 + 0.1).clamp(max=1.0))


def test_vision_project_l2_keeps_direction(cnn_adapter):
    # interior pixels (no clamping): L2 projection is a rescaling of delta to norm eps
    z0 = torch.full((2, 1, 8, 8), 0.5)
    batch = {"pixel_values": z0, "labels": torch.zeros(2, dtype=torch.long)}
    delta = torch.randn_like(z0) * 0.01
    delta = delta / per_image_norm(delta, "l2").view(-1, 1, 1, 1) * torch.tensor([0.4, 2.0]).view(-1, 1, 1, 1)
    p = cnn_adapter.project(z0 + delta, z0, batch, threat(1.0, "l2"))
    torch.testing.assert_close(p[0], (z0 + delta)[0])            # inside: unchanged
    torch.testing.assert_close(p[1], (z0 + delta / 2.0)[1])      # outside: scaled onto the sphere


def test_vision_perturbable_everything(vision, image_batch):
    mask = vision.perturbable(image_batch)
    assert mask.dtype == torch.bool and mask.shape == image_batch["pixel_values"].shape and mask.all()


def test_vision_features_shape(cnn_adapter, timm_adapter, image_batch):
    z = image_batch["pixel_values"]
    with torch.no_grad():
        f = timm_adapter.features(z, image_batch)
        assert f.shape == (16, timm_adapter.net.num_features)
        assert cnn_adapter.eval().features(z, image_batch).shape[0] == 16
        assert cnn_adapter.features(z, image_batch).dim() == 2


def test_vision_collate(cnn_adapter, digits_data):
    examples = [digits_data.test[i] for i in range(5)]
    batch = cnn_adapter.collate(examples)
    assert batch["pixel_values"].shape == (5, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [e["label"] for e in examples]


def test_vision_predict_is_argmax_and_keeps_mode(vision, image_batch):
    x = image_batch["pixel_values"]
    with torch.no_grad():
        expected = vision.logits(x, image_batch).argmax(-1)
    vision.train()
    try:
        pred = vision.predict(x.numpy(), batch_size=5)  # several chunks, numpy input
        assert vision.training
    finally:
        vision.eval()
    assert pred.dtype == torch.long and torch.equal(pred, expected)
    assert vision.predict(np.zeros((0, 1, 8, 8), dtype=np.float32)).numel() == 0


# ----------------------------------------------------------------------------- text


def plain_logits(adapter, batch):
    kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
    return adapter.model(input_ids=batch["input_ids"], **kwargs).logits


def test_text_logits_of_embed_equal_plain_model(text_adapter, sentences):
    text_adapter.eval()
    batch = text_adapter.collate(sentences)
    with torch.no_grad():
        z = text_adapter.embed(batch)
        assert z.shape == (*batch["input_ids"].shape, 32)
        torch.testing.assert_close(text_adapter.logits(z, batch), plain_logits(text_adapter, batch), rtol=0, atol=1e-5)


def test_text_pair_logits_use_token_type_ids(pair_adapter, pairs):
    pair_adapter.eval()
    batch = pair_adapter.collate(pairs)
    assert "token_type_ids" in batch and batch["token_type_ids"].max() == 1  # the second segment is marked
    with torch.no_grad():
        ours = pair_adapter.logits(pair_adapter.embed(batch), batch)
        torch.testing.assert_close(ours, plain_logits(pair_adapter, batch), rtol=0, atol=1e-5)
        # sanity of the comparison: segment ids change the output, so dropping them would be caught
        zeros = pair_adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   token_type_ids=torch.zeros_like(batch["token_type_ids"])).logits
        assert not torch.allclose(ours, zeros, atol=1e-4)


def test_text_collate_pads_to_longest(text_adapter, sentences, tokenizer, monkeypatch):
    batch = text_adapter.collate(sentences)
    lengths = batch["attention_mask"].sum(1)
    # on CPU exactly the longest in the batch: no multiple-of-8 rounding, not max_length (128)
    assert batch["input_ids"].shape[1] == lengths.max().item()
    assert batch["labels"].tolist() == [e["label"] for e in sentences]
    short = text_adapter.collate([sentences[1], sentences[3]])
    assert short["input_ids"].shape[1] == short["attention_mask"].sum(1).max().item() < batch["input_ids"].shape[1]
    # on an accelerator, widths round up to a multiple of 8
    monkeypatch.setattr(text_adapter, "special_ids", text_adapter.special_ids.to("meta"))
    wide = text_adapter.tokenize([e["sentence"] for e in sentences])
    assert wide["input_ids"].shape[1] == math.ceil(lengths.max().item() / 8) * 8
    # the real tokens are exactly the tokenizer's, the rest is padding
    for i, e in enumerate(sentences):
        ids = tokenizer(e["sentence"])["input_ids"]
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        assert (batch["input_ids"][i, len(ids):] == tokenizer.pad_token_id).all()
        assert lengths[i] == len(ids)


def test_text_collate_truncates_to_max_length(make_text_adapter, tokenizer, sentences):
    adapter = make_text_adapter(max_length=16)
    batch = adapter.collate(sentences)
    assert batch["input_ids"].shape[1] == 16
    assert batch["input_ids"][2, -1] == tokenizer.sep_token_id  # truncated, still closed by [SEP]


def test_text_pair_collate(pair_adapter, pairs, tokenizer):
    batch = pair_adapter.collate(pairs)
    ids = tokenizer(pairs[1]["premise"], pairs[1]["hypothesis"])
    n = len(ids["input_ids"])
    assert batch["input_ids"][1, :n].tolist() == ids["input_ids"]
    assert batch["token_type_ids"][1, :n].tolist() == ids["token_type_ids"]
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] == math.ceil(batch["attention_mask"].sum(1).max().item() / 8) * 8


def special_or_pad(batch, tokenizer):
    ids = batch["input_ids"]
    special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    return torch.isin(ids, special) | (batch["attention_mask"] == 0)


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_text_perturbable_masks_special_and_padding(kind, text_adapter, pair_adapter, sentences, pairs, tokenizer):
    adapter, examples = (text_adapter, sentences) if kind == "single" else (pair_adapter, pairs)
    batch = adapter.collate(examples)
    mask = adapter.perturbable(batch)
    assert mask.shape == batch["input_ids"].shape and mask.dtype == torch.bool
    assert torch.equal(mask, ~special_or_pad(batch, tokenizer))
    assert (~mask[:, 0]).all()  # [CLS]
    if kind == "pair":  # the [SEP] between the two segments is frozen too
        assert ((batch["input_ids"] == tokenizer.sep_token_id).sum(1) == 2).all()


def test_unknown_word_is_perturbable(text_adapter, tokenizer):
    """[UNK] is in the tokenizer's special tokens, but it stands for a real input word."""
    batch = text_adapter.collate([{"sentence": "a \u2603 film", "label": 1}])
    ids = batch["input_ids"][0]
    assert tokenizer.unk_token_id in ids.tolist()
    mask = text_adapter.perturbable(batch)[0]
    assert mask[ids == tokenizer.unk_token_id].all()
    assert not mask[ids == tokenizer.cls_token_id].any() and not mask[ids == tokenizer.sep_token_id].any()
    # a tokenizer whose unknown token is also its separator keeps it frozen
    from unirobust.models.text import TextAdapter

    shared = copy.deepcopy(tokenizer)
    shared.unk_token = shared.sep_token
    adapter = TextAdapter(text_adapter.model, shared, 2, ["sentence"])
    assert shared.sep_token_id in adapter.special_ids.tolist()


@pytest.mark.parametrize("kind", ["single", "pair"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("relative", [False, True])
def test_text_project(kind, norm, relative, text_adapter, pair_adapter, sentences, pairs, tokenizer):
    adapter, examples = (text_adapter, sentences) if kind == "single" else (pair_adapter, pairs)
    batch = adapter.collate(examples)
    eps = 0.3 if relative else 0.05
    with torch.no_grad():
        z0 = adapter.embed(batch)
    torch.manual_seed(0)
    z = z0 + 10 * torch.randn_like(z0)
    p = adapter.project(z, z0, batch, threat(eps, norm, relative))
    frozen = special_or_pad(batch, tokenizer)
    assert torch.equal(p[frozen], z0[frozen])  # exactly untouched, not merely small
    radius = eps * per_token_norm(z0, "l2") if relative else torch.full(frozen.shape, eps)
    size = per_token_norm(p - z0, norm)
    assert (size <= radius * (1 + TOL) + TOL).all()
    # the noise is huge, so every movable token ends on the ball's boundary: the radius is the right one
    torch.testing.assert_close(size[~frozen], radius[~frozen], rtol=1e-4, atol=1e-6)
    # points inside the ball do not move
    inside = z0 + 0.5 * (p - z0)
    torch.testing.assert_close(adapter.project(inside, z0, batch, threat(eps, norm, relative)), inside)


def test_text_radius_relative_scales_with_token_norm(text_adapter, sentences):
    batch = text_adapter.collate(sentences)
    with torch.no_grad():
        z0 = text_adapter.embed(batch)
    r = text_adapter.radius(z0, batch, threat(0.5, "l2", relative=True))
    torch.testing.assert_close(r.squeeze(-1), 0.5 * z0.norm(dim=-1))
    r_abs = text_adapter.radius(z0, batch, threat(0.5, "l2"))
    assert torch.all(r_abs == 0.5)


def test_text_features_shape_and_padding_invariance(text_adapter, sentences):
    text_adapter.eval()
    batch = text_adapter.collate(sentences)
    with torch.no_grad():
        f = text_adapter.features(text_adapter.embed(batch), batch)
        assert f.shape == (len(sentences), 32)
        alone = text_adapter.collate([sentences[1]])  # much less padding than in the batch
        f1 = text_adapter.features(text_adapter.embed(alone), alone)
    torch.testing.assert_close(f[1], f1[0], rtol=0, atol=1e-5)  # mean over real tokens only


def test_text_predict_is_argmax_and_keeps_mode(text_adapter, pair_adapter, sentences, pairs):
    for adapter, examples, fields in ((text_adapter, sentences, ["sentence"]),
                                      (pair_adapter, pairs, ["premise", "hypothesis"])):
        adapter.eval()
        batch = adapter.collate(examples)
        with torch.no_grad():
            expected = adapter.logits(adapter.embed(batch), batch).argmax(-1)
        inputs = [e[fields[0]] for e in examples] if len(fields) == 1 else [(e[fields[0]], e[fields[1]]) for e in examples]
        adapter.train()  # dropout on: predict must switch to eval itself, and switch back
        pred = adapter.predict(inputs, batch_size=2)
        assert adapter.training
        assert pred.dtype == torch.long and torch.equal(pred, expected)


def save_checkpoint(tmp_path, tokenizer, id2label: dict, always: int):
    """A fine-tuned-looking sequence classifier in ``tmp_path`` whose head always predicts ``always``."""
    from transformers import BertForSequenceClassification

    from conftest import tiny_bert_config

    cfg = tiny_bert_config(tokenizer, num_labels=len(id2label), id2label=id2label,
                           label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[always] = 5.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def nli_task(labels):
    return SimpleNamespace(name="nli", labels=list(labels), num_classes=len(labels), text_fields=["premise", "hypothesis"])


def test_checkpoint_head_is_put_in_the_task_label_order(tmp_path, tokenizer):
    from unirobust.models.text import build_hf

    # roberta-large-mnli's order, upper case; the checkpoint always says ENTAILMENT (its output 2)
    path = save_checkpoint(tmp_path, tokenizer, {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}, always=2)
    adapter = build_hf(str(path), nli_task(["entailment", "neutral", "contradiction"]))
    assert adapter.predict([("a cat sleeps", "an animal sleeps")]).tolist() == [0]  # the task's entailment
    assert adapter.model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}


def test_checkpoint_head_with_other_label_names_keeps_its_order(tmp_path, tokenizer, caplog):
    from unirobust.models.text import build_hf

    path = save_checkpoint(tmp_path, tokenizer, {0: "neg", 1: "pos"}, always=1)
    with caplog.at_level("WARNING"):
        adapter = build_hf(str(path), nli_task(["negative", "positive"]))
    assert adapter.predict([("a", "b")]).tolist() == [1]
    assert "not the task's" in caplog.text


def test_checkpoint_head_for_another_number_of_labels_is_replaced(tmp_path, tokenizer, caplog):
    from unirobust.models.text import build_hf

    path = save_checkpoint(tmp_path, tokenizer, {0: "contradiction", 1: "neutral", 2: "entailment"}, always=2)
    with caplog.at_level("WARNING"):
        adapter = build_hf(str(path), nli_task(["entailment", "not_entailment"]))
    assert adapter.model.classifier.out_features == 2
    assert "the head is new" in caplog.text


def test_unknown_model_option_is_a_model_spec_error(digits_task):
    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError

    with pytest.raises(ModelSpecError, match="does not take an option.*drop_rat"):
        build_model("timm:test_resnet", digits_task, drop_rat=0.1)


def test_options_the_task_sets_are_a_model_spec_error(digits_task):
    """num_classes and in_chans come from the task; giving them too was a TypeError traceback."""
    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError

    for option in ("in_chans", "num_classes"):
        with pytest.raises(ModelSpecError, match=f"{option} come from the task"):
            build_model("timm:test_resnet", digits_task, **{option: 1})


def test_model_of_the_other_modality_is_a_model_spec_error(digits_task, tmp_path):
    """A text model on a vision task (or the reverse) was a traceback from deep inside collate or
    the timm builder; a path given as a timm architecture names the way to load weights."""
    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError

    with pytest.raises(ModelSpecError, match="is a text model and task 'digits' is a vision task; use a timm:"):
        build_model("hf:sentence-transformers/all-MiniLM-L6-v2", digits_task)
    with pytest.raises(ModelSpecError, match="checkpoint_path"):
        build_model(f"timm:{tmp_path}", digits_task)


def test_timm_checkpoint_path_loads_weights_and_names_what_does_not_fit(digits_task, tmp_path):
    """Weights saved from the same architecture load exactly; a missing file, weights of another head
    and a whole pickled model are model spec errors naming the file (timm raised bare errors)."""
    from safetensors.torch import save_file

    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError

    source = build_model("timm:test_resnet", digits_task)
    save_file(source.net.state_dict(), tmp_path / "w.safetensors")
    loaded = build_model("timm:test_resnet", digits_task, checkpoint_path=str(tmp_path / "w.safetensors"))
    for a, b in zip(source.net.state_dict().values(), loaded.net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ModelSpecError, match="no file .*nope.pth"):
        build_model("timm:test_resnet", digits_task, checkpoint_path=str(tmp_path / "nope.pth"))
    other = {k: v[:3] if k.startswith("fc.") else v for k, v in source.net.state_dict().items()}  # 3 classes
    torch.save(other, tmp_path / "three.pth")
    with pytest.raises(ModelSpecError, match=r"three.pth does not fit timm:test_resnet with 10 classes.*fc.weight"):
        build_model("timm:test_resnet", digits_task, checkpoint_path=str(tmp_path / "three.pth"))
    torch.save(source.net, tmp_path / "whole.pth")
    with pytest.raises(ModelSpecError, match="whole.pth holds pickled objects"):
        build_model("timm:test_resnet", digits_task, checkpoint_path=str(tmp_path / "whole.pth"))


def test_hf_folder_without_tokenizer_is_a_model_spec_error(tmp_path, bert_config):
    """`model.save_pretrained(folder)` alone writes no tokenizer: a clean error that says how to add it
    (it was a TypeError from deep inside AutoTokenizer)."""
    from transformers import BertForSequenceClassification

    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError
    from unirobust.tasks import get_task

    BertForSequenceClassification(bert_config()).save_pretrained(tmp_path / "mine")
    with pytest.raises(ModelSpecError, match=r"has no tokenizer files .*tokenizer.save_pretrained"):
        build_model(f"hf:{tmp_path / 'mine'}", get_task("sst2-sample"))


def test_a_trained_head_with_default_label_names_is_kept_with_a_warning(tmp_path, bert_config, tokenizer, caplog):
    """A fine-tuned checkpoint saved without id2label (LABEL_0, LABEL_1) keeps its head, read in the
    task's order, and says so (its order cannot be checked); a bare encoder's new head says nothing."""
    from transformers import BertForSequenceClassification

    from unirobust.models import build_model
    from unirobust.tasks import get_task

    trained = BertForSequenceClassification(bert_config())
    trained.save_pretrained(tmp_path / "mine")
    tokenizer.save_pretrained(tmp_path / "mine")
    with caplog.at_level("WARNING", logger="unirobust"):
        adapter = build_model(f"hf:{tmp_path / 'mine'}", get_task("sst2-sample"))
    assert "names its outputs LABEL_0, LABEL_1" in caplog.text
    assert torch.equal(adapter.model.classifier.weight, trained.classifier.weight)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unirobust"):
        build_model("hf:sentence-transformers/all-MiniLM-L6-v2", get_task("sst2-sample"))
    assert "names its outputs" not in caplog.text


def test_max_length_that_leaves_no_text_is_refused():
    from unirobust.models import build_model
    from unirobust.models.base import ModelSpecError
    from unirobust.tasks import get_task

    with pytest.raises(ModelSpecError, match="max_length 2 leaves no token for the text: the tokenizer adds 2"):
        build_model("hf:sentence-transformers/all-MiniLM-L6-v2", get_task("sst2-sample"), max_length=2)
    assert build_model("hf:sentence-transformers/all-MiniLM-L6-v2", get_task("sst2-sample"), max_length=4)
