"""TextAttack bridge (unirobust/attacks/text/bridge.py): a unirobust text adapter attacked by TextAttack recipes.

Everything runs offline on tiny BERTs (conftest). The victim for end-to-end attacks is a tiny BERT trained
for ~3 s on synthetic sentiment sentences, so that word edits can flip it (a random tiny BERT's output
hardly depends on its input and no attack ever succeeds on it).
"""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from unirobust.attacks.text.results import STATUSES, AttackRecord, ResultStore

POS = ["good", "great", "funny", "moving", "delight", "gripping", "wonderful", "fine"]
NEG = ["bad", "dull", "bored", "boring", "awful", "poor", "never", "weak"]
FILL = ["the", "film", "a", "plot", "and", "actors", "story", "is", "movie", "it", "was", "an", "their", "lines"]


@pytest.fixture(scope="module")
def bridge():
    from unirobust.attacks.text import bridge as module

    module._textattack()  # the one-off textattack import (~10 s) is paid here, once per module
    return module


@pytest.fixture(scope="module")
def sentiment_adapter(make_text_adapter):
    """A tiny BERT trained on synthetic sentiment sentences (about 3 s); eval mode."""
    rng = random.Random(0)
    data = []
    for i in range(512):
        y = i % 2
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 8))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS if y else NEG))
        data.append({"sentence": " ".join(words), "label": y})
    adapter = make_text_adapter()
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    adapter.train()
    for _ in range(3):
        rng.shuffle(data)
        for i in range(0, len(data), 32):
            b = adapter.collate(data[i:i + 32])
            loss = torch.nn.functional.cross_entropy(adapter.logits(adapter.embed(b), b), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return adapter.eval()


@pytest.fixture(scope="module")
def deepwordbug(bridge, sentiment_adapter):
    return bridge.build_textattack_attack("deepwordbug", bridge.AdapterWrapper(sentiment_adapter))


def check_record(r: AttackRecord, example: dict, fields: list[str]):
    assert r.status in STATUSES
    assert r.field in fields and r.original == example[r.field]
    assert r.label == example["label"]
    assert set(r.context) == set(fields) - {r.field}
    if r.status in ("success", "failed"):
        assert r.pred_before == r.label and r.adversarial is not None and r.queries >= 1
        assert 0 <= r.words_changed <= r.words_total and r.words_total > 0 and r.seconds > 0
    if r.status == "skipped":
        assert r.pred_before != r.label and r.adversarial is None
    if r.status == "success":
        assert r.pred_after != r.label and r.words_changed >= 1 and r.adversarial != r.original


def repredict(adapter, r: AttackRecord, fields: list[str]) -> int:
    texts = {**r.context, r.field: r.adversarial}
    x = texts[fields[0]] if len(fields) == 1 else tuple(texts[f] for f in fields)
    return int(adapter.predict([x])[0])


# ----------------------------------------------------------------------------- wrapper


def test_import_does_not_import_textattack():
    code = "import sys, unirobust.attacks.text.bridge; assert 'textattack' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrapper_returns_probabilities_in_batches(bridge, text_adapter, sentences):
    wrapper = bridge.AdapterWrapper(text_adapter, batch_size=3)
    text_adapter.train()
    probs = wrapper([e["sentence"] for e in sentences])
    assert text_adapter.training, "the wrapper must restore the adapter's mode"
    assert probs.shape == (4, 2)
    assert torch.allclose(probs.sum(1), torch.ones(4, dtype=probs.dtype), atol=1e-12)
    text_adapter.eval()
    with torch.no_grad():
        b = text_adapter.tokenize([e["sentence"] for e in sentences])
        ref = torch.softmax(text_adapter.logits(text_adapter.embed(b), b).double(), -1)
    assert torch.allclose(probs, ref, atol=1e-5)


def test_wrapper_pairs(bridge, pair_adapter, pairs):
    wrapper = bridge.AdapterWrapper(pair_adapter)
    probs = wrapper([(p["premise"], p["hypothesis"]) for p in pairs])
    assert probs.shape == (3, 3)
    assert torch.allclose(probs.sum(1), torch.ones(3, dtype=probs.dtype), atol=1e-12)
    tokens = wrapper.tokenize([("it rains", "it is wet")], strip_prefix=True)[0]
    assert tokens == ["[CLS]", "it", "rains", "[SEP]", "it", "is", "wet", "[SEP]"]


def test_get_grad_matches_tokens(bridge, text_adapter):
    wrapper = bridge.AdapterWrapper(text_adapter)
    text = "an unexpectedly gripping film"
    out = wrapper.get_grad(text)
    tokens = wrapper._tokenize([text])[0]
    assert out["ids"].shape == (1, len(tokens))
    assert out["gradient"].shape == (len(tokens), text_adapter.model.config.hidden_size)
    assert abs(out["gradient"]).sum() > 0
    assert text_adapter.tokenizer.convert_ids_to_tokens(out["ids"][0].tolist()) == tokens


# ----------------------------------------------------------------------------- recipes


def test_recipe_names_and_unknown_name(bridge, text_adapter):
    names = bridge.textattack_recipe_names()
    assert {"pwws", "textfooler", "deepwordbug", "bae", "a2t"} <= set(names)
    with pytest.raises(ValueError, match="valid: .*deepwordbug.*pwws"):
        bridge.build_textattack_attack("no-such-recipe", bridge.AdapterWrapper(text_adapter))


def test_failed_download_is_a_clear_error(bridge, text_adapter, monkeypatch):
    from textattack.attack_recipes import PWWSRen2019

    def offline(model_wrapper):  # what requests raises offline, as TextAttack's S3 download does
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as cause:
            raise ConnectionError("HTTPSConnectionPool(host='textattack.s3.amazonaws.com', port=443): Max retries "
                                  "exceeded with url: /word_embeddings/paragramcf (Caused by NameResolutionError)") \
                from cause

    monkeypatch.setattr(PWWSRen2019, "build", staticmethod(offline))
    with pytest.raises(RuntimeError, match=r"'pwws'.*https://textattack\.s3\.amazonaws\.com/word_embeddings/paragramcf"
                                           r".*needs network"):
        bridge.build_textattack_attack("pwws", bridge.AdapterWrapper(text_adapter))


def test_query_budget_and_adapter_accepted(bridge, text_adapter):
    attack = bridge.build_textattack_attack("deepwordbug", text_adapter, query_budget=7)
    assert attack.goal_function.query_budget == 7
    assert isinstance(attack.goal_function.model, bridge.AdapterWrapper)


# ----------------------------------------------------------------------------- running


def test_deepwordbug_end_to_end(bridge, sentiment_adapter, deepwordbug, sentences):
    records = bridge.run_textattack(sentiment_adapter, sentences, deepwordbug, progress=False)
    assert [r.index for r in records] == list(range(len(sentences)))
    for r, e in zip(records, sentences):
        check_record(r, e, ["sentence"])
        if r.status in ("success", "failed"):
            assert repredict(sentiment_adapter, r, ["sentence"]) == r.pred_after
    assert any(r.status == "success" for r in records), [r.status for r in records]
    dull = records[1]  # "dull": one word, one character edit flips it
    assert dull.status == "success" and dull.words_total == 1 and dull.words_changed == 1


@pytest.mark.slow
def test_pwws_end_to_end_with_offline_wordnet(bridge, sentiment_adapter, sentences):
    attack = bridge.build_textattack_attack("pwws", bridge.AdapterWrapper(sentiment_adapter))
    records = bridge.run_textattack(sentiment_adapter, sentences, attack, progress=False)
    for r, e in zip(records, sentences):
        check_record(r, e, ["sentence"])
        if r.status == "success":
            assert repredict(sentiment_adapter, r, ["sentence"]) == r.pred_after != r.label
    assert any(r.status == "success" for r in records)


def test_gradient_word_importance_runs(bridge, sentiment_adapter, sentences):
    """GreedyWordSwapWIR(wir_method="gradient") (A2T's search) on the wrapper: get_grad + _tokenize."""
    from textattack import Attack
    from textattack.constraints.pre_transformation import RepeatModification
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import WordSwapRandomCharacterDeletion

    wrapper = bridge.AdapterWrapper(sentiment_adapter)
    attack = Attack(UntargetedClassification(wrapper), [RepeatModification()],
                    WordSwapRandomCharacterDeletion(random_one=False), GreedyWordSwapWIR(wir_method="gradient"))
    records = bridge.run_textattack(sentiment_adapter, sentences[:2], attack, progress=False)
    for r, e in zip(records, sentences):
        check_record(r, e, ["sentence"])
    assert records[1].status == "success"


def test_bad_examples_give_error_records(bridge, sentiment_adapter, deepwordbug):
    examples = [{"sentence": "", "label": 0}, {"sentence": "dull", "label": 5}, {"sentence": "   ", "label": 1},
                {"sentence": "dull", "label": 0}, {"label": 0}]
    records = bridge.run_textattack(sentiment_adapter, examples, deepwordbug, progress=False)
    assert [r.status for r in records[:3]] == ["error"] * 3
    assert "empty" in records[0].message and "outside 0..1" in records[1].message
    assert records[3].status == "success"
    assert records[4].status == "error" and "missing" in records[4].message


class CountingAttack:
    def __init__(self, attack):
        self.attack_ = attack
        self.calls = 0

    def attack(self, example, label):
        self.calls += 1
        return self.attack_.attack(example, label)


def test_resume_skips_finished_examples(bridge, sentiment_adapter, deepwordbug, sentences, tmp_path):
    store = ResultStore(tmp_path / "ta")
    first = CountingAttack(deepwordbug)
    done = bridge.run_textattack(sentiment_adapter, sentences[:2], first, store=store, progress=False)
    assert first.calls == 2 and sorted(store.finished()) == [0, 1]
    again = CountingAttack(deepwordbug)
    rest = bridge.run_textattack(sentiment_adapter, sentences, again, store=ResultStore(tmp_path / "ta"), progress=False)
    assert again.calls == 2 and [r.index for r in rest] == [2, 3]
    summary = store.merge(len(sentences))
    assert summary["n"] == 4
    assert [r.index for r in done + rest] == sorted(store.finished())


def test_random_attack_is_seeded_per_example(bridge, sentiment_adapter, sentences, tmp_path):
    """DeepWordBug's edits are random: each example is seeded by its index, so a fresh attack, or a
    resumed run that starts at example 2, reproduces the records; another seed changes them; and the
    global generators are left as they were."""
    import numpy as np

    def fresh():  # a new Attack: no transformation cache shared between runs
        return bridge.build_textattack_attack("deepwordbug", bridge.AdapterWrapper(sentiment_adapter))

    many = sentences * 3  # same sentences at several indices: each index has its own seed
    np.random.seed(123)
    full = bridge.run_textattack(sentiment_adapter, many, fresh(), progress=False)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # state restored
    again = bridge.run_textattack(sentiment_adapter, many, fresh(), progress=False)
    assert [r.adversarial for r in again] == [r.adversarial for r in full]
    store = ResultStore(tmp_path / "resumed")
    for r in full[:2]:
        store.append(r)
    rest = bridge.run_textattack(sentiment_adapter, many, fresh(), store=store, progress=False)
    assert [r.adversarial for r in rest] == [r.adversarial for r in full[2:]]
    other = bridge.run_textattack(sentiment_adapter, many, fresh(), progress=False, seed=1)
    assert [r.adversarial for r in other] != [r.adversarial for r in full]


def test_pairs_record_the_changed_column(bridge, sentiment_adapter):
    from unirobust.models.text import TextAdapter

    pair = TextAdapter(sentiment_adapter.model, sentiment_adapter.tokenizer, 2, ["premise", "hypothesis"])
    wrapper = bridge.AdapterWrapper(pair)
    attack = bridge.build_textattack_attack("deepwordbug", wrapper)
    examples = [{"premise": "the film", "hypothesis": "dull", "label": 0},
                {"premise": "dull", "hypothesis": "the film", "label": 0},
                {"premise": "dull", "hypothesis": "the film", "label": 1}]
    preds = pair.predict([(e["premise"], e["hypothesis"]) for e in examples])
    assert preds.tolist()[:2] == [0, 0]
    records = bridge.run_textattack(pair, examples, attack, progress=False)
    fields = ["premise", "hypothesis"]
    for r, e in zip(records, examples):
        check_record(r, e, fields)
        if r.status in ("success", "failed"):
            assert repredict(pair, r, fields) == r.pred_after
    assert records[0].status == "success" and records[0].field == "hypothesis"
    if records[0].context != {"premise": "the film"}:  # DeepWordBug's random edits may touch both columns
        assert "also changed premise" in records[0].message and records[0].context["premise"] != "the film"
    assert records[1].status == "success" and records[1].field == "premise"
    assert records[2].status == "skipped" and records[2].field == "hypothesis"  # nothing changed: last field
    forced = bridge.run_textattack(pair, examples[:1], attack, field="premise", progress=False)[0]
    assert forced.field == "premise" and forced.original == "the film"
