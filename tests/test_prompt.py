"""Prompt heads (unirobust/models/prompt.py): MVP template + verbalizer for text, visual prompting for vision.

Tiny random BERTs (hidden 32, 2 layers) on the packaged MiniLM tokenizer: ``BertForMaskedLM`` for the
MLM scorer and ``BertModel`` (no MLM head, like the offline MiniLM) for the tied-embedding scorer.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unirobust.attacks.pgd import PGD
from unirobust.models.base import ModelSpecError
from unirobust.models.prompt import PromptAdapter, parse_template

SST_TEMPLATE = "{sentence} It was [MASK]."
SST_TEMPLATE_2 = "Review: {sentence} Overall , a [MASK] film !"
SST_WORDS = [["terrible"], ["great"]]
NLI_TEMPLATE = "{premise} ? [MASK] , {hypothesis}"
NLI_WORDS = [["yes"], ["maybe"], ["no"]]


@pytest.fixture(scope="module")
def mlm_model(bert_config):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(bert_config()).eval()


@pytest.fixture(scope="module")
def encoder_model(bert_config):
    from transformers import BertModel

    torch.manual_seed(1)
    return BertModel(bert_config(), add_pooling_layer=False).eval()


def sst_prompt(model, tokenizer, templates=(SST_TEMPLATE,), scorer="mlm", **kw):
    return PromptAdapter(model, tokenizer, 2, ["sentence"], list(templates), SST_WORDS, scorer, **kw).eval()


# ----------------------------------------------------------------------------- templates and batches


def test_template_parsing_and_errors():
    segs = parse_template(NLI_TEMPLATE, ["premise", "hypothesis"])
    assert segs == [[("field", 0), ("text", " ? "), ("mask",), ("text", " , ")], [("field", 1)]]
    assert parse_template("{sentence} It was <mask>.", ["sentence"], "<mask>")[0][2] == ("mask",)
    for bad in ("{sentence} no mask", "{sentence} [MASK] [MASK]", "{text} [MASK]", "[MASK] only"):
        with pytest.raises(ModelSpecError):
            parse_template(bad, ["sentence"])


def test_batch_layout_single(mlm_model, tokenizer, sentences):
    adapter = sst_prompt(mlm_model, tokenizer)
    batch = adapter.collate(sentences)
    plain = tokenizer([e["sentence"] for e in sentences])["input_ids"]
    for b, ids in enumerate(plain):
        tokens = batch["input_ids"][b]
        n = int(batch["attention_mask"][b].sum())
        # [CLS] sentence it was [MASK] . [SEP]
        assert tokens[:n].tolist() == ids[:-1] + tokenizer.convert_tokens_to_ids(["it", "was", "[MASK]", ".", "[SEP]"])
        assert tokens[batch["mask_positions"][b, 0]] == tokenizer.mask_token_id
        # perturbable = exactly the sentence's own tokens
        assert batch["input_token_mask"][b].nonzero().flatten().tolist() == list(range(1, len(ids) - 1))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert torch.equal(adapter.perturbable(batch), batch["input_token_mask"])


def test_pair_inputs_keep_segment_ids(encoder_model, tokenizer, pairs):
    adapter = PromptAdapter(encoder_model, tokenizer, 3, ["premise", "hypothesis"], [NLI_TEMPLATE], NLI_WORDS,
                            "embedding").eval()
    batch = adapter.collate(pairs)
    for b, e in enumerate(pairs):
        plain = tokenizer(e["premise"], e["hypothesis"])
        real = batch["input_token_mask"][b]
        ids = batch["input_ids"][b][real].tolist()
        types = batch["token_type_ids"][b][real].tolist()
        # the input tokens, in order, with the segment id each has in the plain pair encoding
        keep = [i for i, t in enumerate(plain["input_ids"]) if t not in tokenizer.all_special_ids]
        assert ids == [plain["input_ids"][i] for i in keep]
        assert types == [plain["token_type_ids"][i] for i in keep]
        n = int(batch["attention_mask"][b].sum())
        toks = tokenizer.convert_ids_to_tokens(batch["input_ids"][b][:n])
        assert toks.count("[SEP]") == 2 and toks[0] == "[CLS]"
        assert toks[batch["mask_positions"][b, 0]] == "[MASK]"
        sep = toks.index("[SEP]")
        assert set(batch["token_type_ids"][b][:sep + 1].tolist()) == {0}
        assert set(batch["token_type_ids"][b][sep + 1:n].tolist()) == {1}
    assert adapter.logits(adapter.embed(batch), batch).shape == (3, 3)


def test_truncation_keeps_template_and_mask(mlm_model, tokenizer):
    adapter = sst_prompt(mlm_model, tokenizer, max_length=16)
    batch = adapter.collate([{"sentence": "word " * 50, "label": 0}])
    n = int(batch["attention_mask"][0].sum())
    assert n == 16
    toks = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:n])
    assert toks[-5:] == ["it", "was", "[MASK]", ".", "[SEP]"]
    assert int(batch["input_token_mask"][0].sum()) == 16 - 6  # [CLS] + it was [MASK] . [SEP]
    with pytest.raises(ModelSpecError, match="leaving less than one per input field"):
        sst_prompt(mlm_model, tokenizer, max_length=6)  # the template and specials fill all 6


# ----------------------------------------------------------------------------- scores


def test_logits_of_embed_equal_direct_mlm(mlm_model, tokenizer, sentences):
    adapter = sst_prompt(mlm_model, tokenizer)
    batch = adapter.collate(sentences)
    rows = torch.arange(len(sentences))
    with torch.no_grad():
        ours = adapter.logits(adapter.embed(batch), batch)
        full = mlm_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
        direct = full[rows, batch["mask_positions"][:, 0]][:, adapter.verbalizer_ids]
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)


def test_logits_of_embed_equal_direct_embedding_scorer(encoder_model, tokenizer, sentences):
    adapter = sst_prompt(encoder_model, tokenizer, scorer="embedding")
    batch = adapter.collate(sentences)
    rows = torch.arange(len(sentences))
    words = tokenizer.convert_tokens_to_ids(["terrible", "great"])
    with torch.no_grad():
        ours = adapter.logits(adapter.embed(batch), batch)
        h = encoder_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"]).last_hidden_state[rows, batch["mask_positions"][:, 0]]
        direct = h @ encoder_model.get_input_embeddings().weight[words].T
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)


def test_label_sentence_is_the_template_text_with_the_word():
    from unirobust.models.prompt import label_sentence

    assert label_sentence(SST_TEMPLATE, "great") == "It was great."
    assert label_sentence(SST_TEMPLATE_2, "great") == "Review: Overall , a great film !"
    assert label_sentence(NLI_TEMPLATE, "yes") == "? yes ,"
    assert label_sentence("{premise} [SEP] Then [MASK] : {hypothesis}", "yes") == "Then yes :"
    assert label_sentence("{sentence} It was <mask>.", "good", "<mask>") == "It was good."


def _mean_pool_embedding(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_logits_of_embed_equal_direct_similarity_scorer(encoder_model, tokenizer, sentences):
    """scorer similarity: scale x cosine of the mean-pooled prompted sentence with the mean-pooled
    label sentences "It was terrible." / "It was great.", each encoded on its own."""
    adapter = sst_prompt(encoder_model, tokenizer, scorer="similarity", similarity_scale=7.0)
    batch = adapter.collate(sentences)
    with torch.no_grad():
        ours = adapter.logits(adapter.embed(batch), batch)
        prompted = _mean_pool_embedding(encoder_model, tokenizer(
            [e["sentence"] + " It was [MASK]." for e in sentences], padding=True, return_tensors="pt"))
        labels = _mean_pool_embedding(encoder_model, tokenizer(
            ["It was terrible.", "It was great."], padding=True, return_tensors="pt"))
    torch.testing.assert_close(ours, 7.0 * prompted @ labels.T, rtol=0, atol=1e-5)


def test_similarity_scorer_reads_each_template_against_its_own_label_sentences(encoder_model, tokenizer, sentences):
    """Two templates: the class score is the mean over templates, each compared with its own label
    sentences ("It was great." for the first, "Review: Overall , a great film !" for the second)."""
    both = sst_prompt(encoder_model, tokenizer, templates=(SST_TEMPLATE, SST_TEMPLATE_2), scorer="similarity")
    firsts = [sst_prompt(encoder_model, tokenizer, templates=(t,), scorer="similarity") for t in (SST_TEMPLATE, SST_TEMPLATE_2)]
    with torch.no_grad():
        per = []
        for a in firsts:
            batch = a.collate(sentences)
            per.append(a.logits(a.embed(batch), batch))
        batch = both.collate(sentences)
        torch.testing.assert_close(both.logits(both.embed(batch), batch), (per[0] + per[1]) / 2, rtol=0, atol=1e-5)


def test_similarity_scorer_scores_in_float32_under_bf16(encoder_model, tokenizer, sentences):
    """Every score is about 20 x cos: in bf16 (steps of 0.125 near 20) classes would tie or swap."""
    import copy

    adapter = sst_prompt(copy.deepcopy(encoder_model), tokenizer, scorer="similarity")
    batch = adapter.collate(sentences)
    with torch.no_grad():
        full = adapter.logits(adapter.embed(batch), batch)
        half = adapter.to(torch.bfloat16)
        low = half.logits(half.embed(batch), batch)
    assert low.dtype == torch.float32
    assert (low - full).abs().max() < 0.5  # bf16 model, float32 scores: close to the float32 model


def test_similarity_scorer_tunes_the_label_sentences(encoder_model, tokenizer, sentences):
    """The label sentences go through the model in every forward: the loss reaches the embedding row of
    "great", a word that is only in a label sentence, never in the inputs."""
    import copy

    assert not any("great" in e["sentence"] for e in sentences)
    adapter = sst_prompt(copy.deepcopy(encoder_model), tokenizer, scorer="similarity").train()
    batch = adapter.collate(sentences)
    labels = batch.pop("labels")
    torch.nn.functional.cross_entropy(adapter.logits(adapter.embed(batch), batch), labels).backward()
    grad = adapter.model.get_input_embeddings().weight.grad
    assert grad[tokenizer.convert_tokens_to_ids("great")].abs().sum() > 0


def test_similarity_scorer_accepts_multi_token_words_and_checks_its_scale(encoder_model, tokenizer, sentences):
    words = [["terrible"], ["unputdownable"]]  # several word pieces: fine for a label sentence
    with pytest.raises(ModelSpecError, match="one known token"):
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], words, "embedding")
    adapter = PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], words, "similarity").eval()
    batch = adapter.collate(sentences)
    with torch.no_grad():
        assert adapter.logits(adapter.embed(batch), batch).shape == (len(sentences), 2)
    with pytest.raises(ModelSpecError, match="given twice"):
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["un", "great"], ["great"]], "similarity")
    with pytest.raises(ModelSpecError, match="no token at all"):  # a zero-width space tokenizes to nothing
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["\u200b"], ["great"]], "similarity")
    with pytest.raises(ModelSpecError, match="empty word"):
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [[" "], ["great"]], "similarity")
    with pytest.raises(ModelSpecError, match="similarity_scale"):
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], SST_WORDS, "similarity",
                      similarity_scale=0)
    with pytest.raises(ModelSpecError, match="valid: auto, mlm, embedding, similarity"):
        PromptAdapter(encoder_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], SST_WORDS, "cosine")


def test_scores_come_from_the_verbalizer_words(mlm_model, encoder_model, tokenizer, sentences):
    great = tokenizer.convert_tokens_to_ids("great")
    for model, scorer in ((mlm_model, "mlm"), (encoder_model, "embedding")):
        adapter = sst_prompt(model, tokenizer, scorer=scorer)
        batch = adapter.collate(sentences)
        with torch.no_grad():
            before = adapter.logits(adapter.embed(batch), batch)
            # the positive class's word: its MLM output bias, or its tied input embedding row
            param = model.get_output_embeddings().bias if scorer == "mlm" else model.get_input_embeddings().weight
            saved = param[great].clone()
            torch.manual_seed(0)
            param[great] += 3.0 if scorer == "mlm" else torch.randn_like(saved)  # (hidden states sum to ~0)
            after = adapter.logits(adapter.embed(batch), batch)
            param[great] = saved
        torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=1e-6)  # negative: unchanged
        assert (after[:, 1] - before[:, 1]).abs().min() > 1e-3                   # positive: moved
        if scorer == "mlm":
            torch.testing.assert_close(after[:, 1] - before[:, 1], torch.full((len(sentences),), 3.0))


def test_multi_word_class_is_the_mean(mlm_model, tokenizer, sentences):
    two = PromptAdapter(mlm_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["terrible", "awful"], ["great"]]).eval()
    batch = two.collate(sentences)
    with torch.no_grad():
        words = two.word_scores(two.embed(batch), batch)[:, 0]  # B x 3
        logits = two.logits(two.embed(batch), batch)
    torch.testing.assert_close(logits[:, 0], words[:, :2].mean(1))
    torch.testing.assert_close(logits[:, 1], words[:, 2])


def test_two_templates_are_averaged_and_share_the_perturbation(mlm_model, tokenizer, sentences):
    a1, a2 = sst_prompt(mlm_model, tokenizer, [SST_TEMPLATE]), sst_prompt(mlm_model, tokenizer, [SST_TEMPLATE_2])
    both = sst_prompt(mlm_model, tokenizer, [SST_TEMPLATE, SST_TEMPLATE_2])
    b1, b2, b12 = a1.collate(sentences), a2.collate(sentences), both.collate(sentences)
    assert b12["prompt_input_ids"].shape[:2] == (len(sentences), 1)
    # the second template, as built from the first one's z, is the plain second template
    k2 = b12["prompt_attention_mask"][:, 0].sum(1)
    for b in range(len(sentences)):
        assert b12["prompt_input_ids"][b, 0, :k2[b]].tolist() == b2["input_ids"][b, :k2[b]].tolist()
    with torch.no_grad():
        torch.testing.assert_close(both.logits(both.embed(b12), b12),
                                   (a1.logits(a1.embed(b1), b1) + a2.logits(a2.embed(b2), b2)) / 2, rtol=0, atol=1e-5)
        # a perturbation of one input word in z acts on both templates
        torch.manual_seed(0)
        delta = torch.randn(mlm_model.config.hidden_size)
        z12, z1, z2 = both.embed(b12), a1.embed(b1), a2.embed(b2)
        for z, batch in ((z12, b12), (z1, b1), (z2, b2)):
            first = batch["input_token_mask"].float().argmax(1)  # first input token of each example
            z[torch.arange(len(sentences)), first] += delta
        torch.testing.assert_close(both.logits(z12, b12), (a1.logits(z1, b1) + a2.logits(z2, b2)) / 2,
                                   rtol=0, atol=1e-5)


def test_template_tokens_are_never_perturbed(mlm_model, tokenizer, sentences, pairs, encoder_model):
    cases = [(sst_prompt(mlm_model, tokenizer, [SST_TEMPLATE, SST_TEMPLATE_2]), sentences),
             (PromptAdapter(encoder_model, tokenizer, 3, ["premise", "hypothesis"], [NLI_TEMPLATE], NLI_WORDS,
                            "embedding").eval(), pairs)]
    for adapter, examples in cases:
        batch = adapter.collate(examples)
        z0 = adapter.embed(batch).detach()
        z = PGD(eps=1.0, norm="l2", steps=3)(adapter, batch)
        moved = (z - z0).norm(dim=-1) > 0
        fixed = ~batch["input_token_mask"]
        assert torch.equal(z[fixed], z0[fixed])  # template, mask, special tokens and padding: exactly equal
        assert moved[batch["input_token_mask"]].all()
        assert not adapter.training


def test_gradient_reaches_the_encoder_and_defense_runs(mlm_model, encoder_model, tokenizer, sentences):
    import copy

    from unirobust.defenses.pgd_at import PGDAT

    for model, scorer in ((mlm_model, "mlm"), (encoder_model, "embedding"), (encoder_model, "similarity")):
        adapter = sst_prompt(copy.deepcopy(model), tokenizer, scorer=scorer).train()
        batch = adapter.collate(sentences)
        out = PGDAT(attack=PGD(eps=0.05, norm="l2", steps=2, relative=True)).loss(adapter, batch)
        out["loss"].backward()
        grads = {n: p.grad for n, p in adapter.named_parameters()}
        layer = [n for n in grads if "encoder.layer.0." in n and n.endswith("query.weight")][0]
        assert grads[layer].abs().sum() > 0
        assert adapter.model.get_input_embeddings().weight.grad.abs().sum() > 0
        assert out["logits"].shape == (len(sentences), 2)


def test_verbalizer_errors(mlm_model, tokenizer):
    with pytest.raises(ModelSpecError, match="one known token"):
        PromptAdapter(mlm_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["terrible"], ["unputdownable"]])
    with pytest.raises(ModelSpecError, match="verbalizer has 1"):
        PromptAdapter(mlm_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["great"]])
    with pytest.raises(ModelSpecError, match="given twice"):
        PromptAdapter(mlm_model, tokenizer, 2, ["sentence"], [SST_TEMPLATE], [["bad", "great"], ["great"]])
    from unirobust.models.prompt import verbalizer_words

    assert verbalizer_words({"negative": "bad", "positive": ["good", "great"]}, ["negative", "positive"]) == \
        [["bad"], ["good", "great"]]
    assert verbalizer_words(None, ["negative", "positive"]) == [["negative"], ["positive"]]
    with pytest.raises(ModelSpecError, match="missing"):
        verbalizer_words({"negative": "bad"}, ["negative", "positive"])
    # what YAML makes of `entailment: [yes]` and of labels written 0 / 1
    import yaml

    for text in ("{entailment: [yes], contradiction: [no]}", "{entailment: yes, contradiction: no}"):
        with pytest.raises(ModelSpecError, match="must be strings.*quote them"):
            verbalizer_words(yaml.safe_load(text), ["entailment", "contradiction"])
    assert verbalizer_words(yaml.safe_load("{0: bad, 1: good}"), ["0", "1"]) == [["bad"], ["good"]]


def test_tokenizer_that_adds_no_special_tokens_is_refused(mlm_model, tokenizer):
    """A generic ``PreTrainedTokenizerFast`` (ModernBERT's kind) reports special tokens it never builds:
    the prompt layout would silently lose [CLS] / [SEP]."""
    from transformers import PreTrainedTokenizerFast

    generic = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]")
    with pytest.raises(ModelSpecError, match="special tokens"):
        PromptAdapter(mlm_model, generic, 2, ["sentence"], [SST_TEMPLATE], SST_WORDS)


def test_predict_uses_the_prompt(mlm_model, tokenizer, sentences):
    adapter = sst_prompt(mlm_model, tokenizer)
    batch = adapter.collate(sentences)
    with torch.no_grad():
        expected = adapter.logits(adapter.embed(batch), batch).argmax(-1)
    assert torch.equal(adapter.predict([e["sentence"] for e in sentences], batch_size=3), expected)


def test_build_hf_head_prompt_picks_the_scorer(tmp_path, tokenizer, bert_config):
    """``hf:<folder>`` with ``head: prompt``: an MLM checkpoint keeps its head, a bare encoder scores
    against its tied embeddings (no random head); the weights round-trip through a run's safetensors."""
    from transformers import BertForMaskedLM, BertModel

    from unirobust.models import build_model
    from unirobust.report import load_weights, save_weights
    from unirobust.tasks import get_task

    task = get_task("sst2-sample")
    options = {"head": "prompt", "templates": [SST_TEMPLATE], "verbalizer": {"negative": ["terrible"], "positive": ["great"]}}
    torch.manual_seed(0)
    for cls, scorer, asked in ((BertForMaskedLM, "mlm", {}), (BertModel, "embedding", {}),
                               (BertForMaskedLM, "similarity", {"scorer": "similarity"})):
        folder = tmp_path / cls.__name__
        if not folder.exists():
            cls(bert_config()).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        adapter = build_model(str(folder), task, **options, **asked)
        assert isinstance(adapter, PromptAdapter) and adapter.scorer == scorer
        assert (adapter.model.get_output_embeddings() is not None) == (scorer == "mlm")  # similarity drops the head
        save_weights(adapter, tmp_path / "w.safetensors")
        again = build_model(str(folder), task, **options, **asked)
        load_weights(again, tmp_path / "w.safetensors")
    with pytest.raises(ModelSpecError, match="unknown model head"):
        build_model(str(tmp_path / "BertModel"), task, head="nonsense")


def test_features_of_any_layer(mlm_model, encoder_model, tokenizer, sentences):
    """``features(z, batch, layer=i)`` (what DVERGE's ``layer`` uses) is hidden state ``i`` at the mask
    (scorer similarity: mean-pooled over the prompted sequence)."""
    for model, scorer in ((mlm_model, "mlm"), (encoder_model, "embedding"), (encoder_model, "similarity")):
        adapter = sst_prompt(model, tokenizer, scorer=scorer)
        batch = adapter.collate(sentences)
        z = adapter.embed(batch)
        with torch.no_grad():
            first, last = adapter.features(z, batch, layer=1), adapter.features(z, batch)
        assert first.shape == last.shape == (len(sentences), 32)
        assert not torch.allclose(first, last)
        if scorer == "similarity":  # the sentence embedding: hidden states mean-pooled over the sequence
            from unirobust.models.prompt import mean_pool

            with torch.no_grad():
                h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], output_hidden_states=True).hidden_states[1]
            torch.testing.assert_close(first, mean_pool(h, batch["attention_mask"]), rtol=0, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(adapter.features(z, batch, layer=-1), last)


def test_freeze_embeddings_with_a_prompt_head(tmp_path, tokenizer, bert_config):
    from transformers import BertModel

    from unirobust.models import build_model
    from unirobust.tasks import get_task

    BertModel(bert_config()).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    adapter = build_model(str(tmp_path), get_task("sst2-sample"), head="prompt", templates=[SST_TEMPLATE],
                          verbalizer=SST_WORDS, freeze_embeddings=True)
    assert not adapter.model.get_input_embeddings().weight.requires_grad
    assert any(p.requires_grad for p in adapter.model.parameters())


# ----------------------------------------------------------------------------- vision


@pytest.fixture
def visual(digits_task):
    from unirobust.models import build_model

    torch.manual_seed(0)
    return build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=3, source_classes=12, in_chans=3,
                       label_map=[[0, 11], 1, 2, 3, 4, 5, 6, 7, 8, 9])


def test_visual_prompt_label_map_errors(digits_task):
    from unirobust.models import build_model

    for label_map in ([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9], [[], 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1]):
        with pytest.raises(ModelSpecError, match="label_map"):
            build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=3, source_classes=12,
                        in_chans=3, label_map=label_map)


def test_visual_prompt_pixels_stay_in_range(visual, digits_test_batch):
    batch = {k: v[:8] for k, v in digits_test_batch.items()}
    with torch.no_grad():
        visual.prompt.uniform_(-50, 50)  # extreme prompt parameters
    z0 = visual.embed(batch)
    assert torch.equal(z0, batch["pixel_values"])
    z = PGD(eps=0.3, norm="linf", steps=2)(visual, batch)
    assert z.min() >= 0 and z.max() <= 1
    x = visual.apply_prompt(z)
    assert x.shape == (8, 3, 14, 14) and x.min() >= 0 and x.max() <= 1
    inner = x[:, :, 3:-3, 3:-3]
    torch.testing.assert_close(inner, torch.nn.functional.interpolate(z, size=(8, 8), mode="bilinear").expand(-1, 3, -1, -1))
    # logits(embed(b), b) = label-mapped backbone output on the prompted, normalised image
    with torch.no_grad():
        source = visual.net((x - visual.mean) / visual.std)
        ours = visual.logits(z, batch)
    torch.testing.assert_close(ours[:, 0], (source[:, 0] + source[:, 11]) / 2)
    torch.testing.assert_close(ours[:, 1:], source[:, 1:10])


def test_visual_prompt_trains_only_the_prompt_when_frozen(visual, digits_test_batch, digits_task):
    from unirobust.defenses.pgd_at import PGDAT
    from unirobust.models import build_model

    batch = {k: v[:16] for k, v in digits_test_batch.items()}
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    trainable = [p for p in visual.parameters() if p.requires_grad]
    assert trainable == [visual.prompt]
    opt = torch.optim.SGD(trainable, lr=1.0)
    visual.train()
    assert not visual.net.training  # frozen backbone: batch-norm statistics stay
    for _ in range(2):
        loss = PGDAT(attack=PGD(eps=0.1, norm="linf", steps=1)).loss(visual, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [k for k, v in visual.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["prompt"]
    patch = build_model("timm:test_resnet", digits_task, head="prompt", prompt="patch", prompt_size=2,
                        freeze_backbone=False)
    assert patch.image_size == 8 and sum(p.requires_grad for p in patch.parameters()) > 1
    patch.train()
    assert patch.net.training
    patch.logits(batch["pixel_values"]).sum().backward()
    assert patch.prompt.grad.abs().sum() > 0
    assert next(patch.net.parameters()).grad is not None


def test_every_registered_attack_runs_unchanged(encoder_model, tokenizer, pairs):
    """Every continuous attack in the registry works on a prompt adapter; template tokens never move."""
    import dataclasses

    from unirobust.attacks import build_attack
    from unirobust.registry import ATTACKS

    adapter = PromptAdapter(encoder_model, tokenizer, 3, ["premise", "hypothesis"], [NLI_TEMPLATE], NLI_WORDS,
                            "embedding").eval()
    batch = adapter.collate(pairs)
    z0 = adapter.embed(batch).detach()
    fixed = ~batch["input_token_mask"]
    budget = SimpleNamespace(norm="l2", eps=0.5, alpha=None, steps=2, relative=True)
    for name in ATTACKS.names():
        if getattr(ATTACKS.get(name), "kind", None) == "word" or not dataclasses.is_dataclass(ATTACKS.get(name)):
            continue  # word substitutions (presets of WordAttack) act on texts: tests/test_word_attacks.py
        fields = {f.name for f in dataclasses.fields(ATTACKS.get(name))}
        short = {k: 2 for k in ("steps", "n_iter", "n_queries") if k in fields}  # keep every attack cheap
        z = build_attack({"name": name, **short}, budget)(adapter, batch)
        assert z.shape == z0.shape, name
        assert torch.equal(z[fixed], z0[fixed]), name


def test_visual_prompt_on_a_pretrained_backbone_keeps_its_channels(tmp_path, digits_task, digits_test_batch):
    """A 1-channel task on a "pretrained" 3-channel backbone (weights from a local file, as the hub
    would give them): the backbone keeps its 3 input channels and the image is repeated into them."""
    import timm
    from safetensors.torch import save_file

    from unirobust.models import build_model

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    adapter = build_model("timm:test_resnet", digits_task, pretrained=True, head="prompt", prompt_size=2,
                          pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")}, feature_layer=1)
    assert adapter.in_chans == 3 and adapter.mean.shape == (1, 3, 1, 1)
    batch = {k: v[:4] for k, v in digits_test_batch.items()}
    z = adapter.embed(batch)
    with torch.no_grad():
        assert adapter.logits(z, batch).shape == (4, digits_task.num_classes)
        inner = adapter.features(z, batch)  # stage 1 of the backbone (feature_layer), not pre-logits
        assert not torch.equal(inner, adapter.features(z, batch, layer=-1))


def test_visual_prompt_label_map_beyond_the_backbone_fails_when_built(digits_task):
    """A label map reading a class the backbone lacks is refused when the model is built, before a run
    touches its folder (it failed at the first forward pass, after the earlier run was cleared)."""
    from unirobust.models import build_model

    with pytest.raises(ModelSpecError, match=r"label_map reads backbone class 9, and timm:test_resnet has 3 outputs"):
        build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=2, source_classes=3)
    with pytest.raises(ModelSpecError, match="num_classes: with head: prompt"):
        build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=2, num_classes=12)


def test_visual_prompt_backbone_from_a_checkpoint_or_a_run(tmp_path, digits_task, make_run, caplog):
    """``checkpoint_path`` gives the backbone its weights and its number of outputs (the file's head);
    a unirobust run's own model.safetensors works as the file; a random backbone is warned about; and
    the prompt run loads again after the checkpoint file is gone (its own weights hold everything)."""
    import timm
    from safetensors.torch import save_file

    from unirobust.models import build_model
    from unirobust.runs import load_run

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=12, in_chans=1)
    save_file(source.state_dict(), tmp_path / "plain.safetensors")
    classifier_run, _, trained = make_run(tmp_path / "runs" / "base", {
        "name": "base", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"}})
    for path, want in ((tmp_path / "plain.safetensors", source), (classifier_run / "model.safetensors", trained.net)):
        caplog.clear()
        adapter = build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=2,
                              checkpoint_path=str(path))
        assert adapter.net.num_classes == want.num_classes  # 12 from the file's head, not the task's 10
        for (k, a), b in zip(adapter.net.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), k
        assert "randomly initialised" not in caplog.text
    with caplog.at_level("WARNING"):
        build_model("timm:test_resnet", digits_task, head="prompt", prompt_size=2)
    assert "randomly initialised timm:test_resnet" in caplog.text
    # a prompt run started from the file loads without it
    moved = tmp_path / "moved.safetensors"
    (tmp_path / "plain.safetensors").rename(moved)
    prompt_run, _, built = make_run(tmp_path / "runs" / "vp", {
        "name": "vp", "task": {"name": "digits"},
        "model": {"spec": "timm:test_resnet", "options": {"head": "prompt", "prompt_size": 2,
                                                           "checkpoint_path": str(moved)}}})
    moved.unlink()
    caplog.clear()
    _, loaded = load_run(prompt_run)
    assert loaded.net.num_classes == 12 and "randomly initialised" not in caplog.text
    for a, b in zip(loaded.state_dict().values(), built.state_dict().values()):
        assert torch.equal(a, b)
    # an ensemble of such models: its weights file holds all members, so the checkpoint (still in
    # place) gives the members' outputs
    save_file(source.state_dict(), moved)
    ens_run, _, ens = make_run(tmp_path / "runs" / "vp_ens", {
        "name": "vp_ens", "task": {"name": "digits"},
        "model": {"spec": "timm:test_resnet", "ensemble": 2,
                  "options": {"head": "prompt", "prompt_size": 2, "checkpoint_path": str(moved)}}})
    _, loaded = load_run(ens_run)
    for a, b in zip(loaded.state_dict().values(), ens.state_dict().values()):
        assert torch.equal(a, b)
    from unirobust.models.prompt import _cfg_value

    assert _cfg_value("hf-hub:someone/unregistered", "classifier") is None  # timm raises for such names
