"""The word-substitution engine: sources, constraints, searches, results, resume, sharding, CLI.

Most tests use a hand-made *keyword* classifier: it says ``negative`` exactly when the text holds
one of a few keyword tokens, so the only way to flip it is to replace that keyword — the known flip
every search must find, and a model on which every constraint can be checked.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unirobust.attacks import build_attack
from unirobust.attacks.text.attack import WordAttack, attack_examples, run_word_attack, stopword_set
from unirobust.attacks.text.results import AttackRecord, ResultStore, read_jsonl, result_key, summarise
from unirobust.attacks.text.words import WordText, levenshtein

KEYWORDS = ("bad", "awful", "dull")


class KeywordNet(nn.Module):
    """Logits (positive, negative) scored from a one-hot "keyword" feature of each token's embedding:
    ``negative`` iff some real token is a keyword. Differentiable, so gradient ordering works."""

    def __init__(self, tokenizer):
        super().__init__()
        vocab = tokenizer.get_vocab()
        self.emb = nn.Embedding(len(vocab), 4)
        with torch.no_grad():
            self.emb.weight.normal_(0, 0.1)
            self.emb.weight[:, 0] = 0
            for w in KEYWORDS:
                self.emb.weight[vocab[w], 0] = 1.0

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask=None, token_type_ids=None, **_):
        mask = attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)
        hit = (inputs_embeds[..., :1] * mask).sum(1)  # B x 1: number of keywords
        return SimpleNamespace(logits=torch.cat([1 - 4 * hit, 4 * hit - 1], dim=-1))


@pytest.fixture
def keyword_adapter(tokenizer):
    from unirobust.models.text import TextAdapter

    return TextAdapter(KeywordNet(tokenizer), tokenizer, 2, ["sentence"]).eval()


NEGATIVE = [
    {"sentence": "a bad movie with a good cast", "label": 1},
    {"sentence": "the plot is dull , and the ending goes on and on", "label": 1},
    {"sentence": "what an awful , awful film", "label": 1},  # two keywords: one swap cannot flip it
    {"sentence": "a warm and tender story", "label": 1},  # misclassified already: skipped
]


def attack(**kw) -> WordAttack:
    return WordAttack(**{"concurrency": 3, **kw})


def run(adapter, examples, **kw):
    return attack_examples(adapter, examples, attack(**kw), progress=False)


# ----------------------------------------------------------------------------- words, sources


def test_wordtext_replace_keeps_everything_else():
    t = WordText.of("It's a well-made, funny film — مرحبا!")
    assert t.words == ["It's", "a", "well-made", "funny", "film", "مرحبا"]
    r = t.replace(3, "hilarious")
    assert r.text == "It's a well-made, hilarious film — مرحبا!" and r.words[3] == "hilarious"
    assert r.spans[4] == (r.text.index("film"), r.text.index("film") + 4)
    assert t.changed(r) == [3]
    assert t.raw_replace(1, "") == "It's well-made, funny film — مرحبا!"
    assert WordText.of("one two three four five").window(0, 3) == "one two three"
    assert WordText.of("one two three four five").window(4, 3) == "three four five"


def test_wordnet_synonyms_offline():
    from unirobust.attacks.text.sources import WordNetSynonyms

    (cands,) = WordNetSynonyms().propose([(WordText.of("a Good film"), 1, 0)])
    assert cands and "Good" not in cands and all(c[0].isupper() for c in cands)
    assert {"Well", "Beneficial"} & set(cands)
    assert all("_" not in c and " " not in c for c in cands)


def test_char_edits_are_small_deterministic_and_keyed():
    from unirobust.attacks.text.sources import CharEdits

    edits = CharEdits(seed=0)
    a = edits.edits("terrible", key=7)
    assert a == edits.edits("terrible", key=7) and len(a) == 4
    assert all(1 <= levenshtein("terrible", w) <= 2 and w != "terrible" for w in a)
    assert any(edits.edits("terrible", key=k) != a for k in range(8, 12))
    assert all(set(w) <= set("مرحبا") for w in edits.edits("مرحبا", key=1))  # stays in script


def test_embedding_neighbours_cosine_topk_and_antonyms(tokenizer):
    from unirobust.attacks.text.sources import EmbeddingNeighbours, WordVectors

    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    emb = torch.randn(len(vocab), 16)
    emb[vocab["awful"]] = emb[vocab["bad"]] + 0.05 * torch.randn(16)
    emb[vocab["good"]] = emb[vocab["bad"]] + 0.2 * torch.randn(16)
    vectors = WordVectors(tokenizer, emb)
    assert "##s" not in vectors.index and "[CLS]" not in vectors.index and "bad" in vectors.index
    text = WordText.of("a bad day")
    (near,) = EmbeddingNeighbours(vectors, max_candidates=5, min_cos=0.8).propose([(text, 1, 0)])
    assert near[:2] == ["awful", "good"] and all(vectors.cos("bad", w) >= 0.8 for w in near)
    (no_antonyms,) = EmbeddingNeighbours(vectors, 5, 0.8, antonyms=False).propose([(text, 1, 0)])
    assert "good" not in no_antonyms and "awful" in no_antonyms


def test_counterfit_pulls_synonyms_pushes_antonyms():
    from unirobust.attacks.text.counterfit import counterfit

    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    v[1] = torch.nn.functional.normalize(v[0] + 0.3 * torch.randn(8), dim=0)  # 0 ~ 1 close: antonyms
    fitted = counterfit(v, synonyms=torch.tensor([[2, 3]]), antonyms=torch.tensor([[0, 1]]), steps=200, lr=0.05)
    cos = lambda x, i, j: float(x[i] @ x[j])  # noqa: E731
    assert cos(v, 0, 1) > 0.5 and cos(fitted, 0, 1) < 0.05
    assert cos(fitted, 2, 3) >= 0.69 > cos(v, 2, 3)
    assert torch.allclose(fitted[5], v[5])  # in no pair: unchanged
    assert torch.allclose(fitted.norm(dim=-1), torch.ones(6))


def test_masked_lm_proposals_and_missing_mlm(tokenizer, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from unirobust.attacks.text.sources import MaskedLMProposals, MissingMaskedLM, load_masked_lm

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    text = WordText.of("the film is terrible")
    for mode in ("mask", "unmasked"):
        src = MaskedLMProposals(None, max_candidates=7, mode=mode, model=BertForMaskedLM(cfg), tokenizer=tokenizer)
        (cands,) = src.propose([(text, 3, 0)])
        assert 1 <= len(cands) <= 7 and "terrible" not in cands
        assert all(w.isalpha() and w in tokenizer.get_vocab() for w in cands)
    with pytest.raises(ValueError, match="mlm="):
        build_attack({"name": "bae"})
    BertModel(cfg).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(MissingMaskedLM, match="no trained masked-LM head"):
        load_masked_lm(str(tmp_path / "encoder"))


# ----------------------------------------------------------------------------- searches on the keyword model


@pytest.mark.parametrize("kw", [
    {"search": "pwws"},
    {"search": "pwws", "early_exit": False},
    {"search": "pwws", "wir": "gradient"},
    {"search": "greedy", "wir": "delete"},
    {"search": "greedy", "wir": "unk"},
    {"search": "greedy", "wir": "gradient"},
    {"search": "greedy", "wir": "random"},
    {"search": "greedy", "wir": "candidate"},
    {"search": "beam", "beam_width": 2},
    {"source": "chars", "wir": "unk", "max_edit_distance": 30},
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_search_finds_the_keyword_flip(keyword_adapter, kw):
    records, stats = run(keyword_adapter, NEGATIVE, **kw)
    by = {r.index: r for r in records}
    for i in (0, 1):
        r = by[i]
        assert r.status == "success" and r.words_changed == 1 and r.pred_before == 1 and r.pred_after == 0
        changed = WordText.of(r.original).changed(WordText.of(r.adversarial))
        assert [WordText.of(r.original).word(j) for j in changed][0] in KEYWORDS
        assert int(keyword_adapter.predict([r.adversarial])[0]) == 0  # the adversarial text really flips
    assert by[3].status == "skipped" and by[3].adversarial is None
    assert stats["attack_success_rate"] == pytest.approx(sum(r.status == "success" for r in records) / 3)
    assert stats["forward_seconds"] > 0 and 0 < stats["forward_fraction"] <= 1


def test_pwws_early_exit_spends_fewer_queries(keyword_adapter):
    examples = [{"sentence": "this long and rather bad story of a lonely sailor on a great ship", "label": 1}]
    eager, _ = run(keyword_adapter, examples, search="pwws", early_exit=True)
    full, _ = run(keyword_adapter, examples, search="pwws", early_exit=False)
    assert eager[0].status == full[0].status == "success"
    assert eager[0].words_changed == 1 and eager[0].queries < full[0].queries


def test_candidate_probes_are_real_attempts(keyword_adapter):
    """wir=candidate scores each word by its own first candidate: a one-swap flip is found while
    ranking (no greedy pass after it), and the two-keyword case reuses the probes from the query
    memo, so it needs fewer queries than unk ordering, which pays one [UNK] query per word."""
    one = [NEGATIVE[0]]
    probe, _ = run(keyword_adapter, one, source="chars", wir="candidate", max_edit_distance=30)
    unk, _ = run(keyword_adapter, one, source="chars", wir="unk", max_edit_distance=30)
    assert probe[0].status == unk[0].status == "success" and probe[0].words_changed == 1
    assert probe[0].queries < unk[0].queries
    two, _ = run(keyword_adapter, NEGATIVE[2:3], search="greedy", wir="candidate")
    assert two[0].status == "success" and two[0].words_changed == 2


def test_greedy_removes_both_keywords_when_allowed(keyword_adapter):
    """Two keywords need two swaps: greedy takes a swap only if it raises the score, and the first
    swap of "awful" does (fewer keywords); so the text flips after two swaps."""
    records, _ = run(keyword_adapter, NEGATIVE[2:3], search="greedy", wir="delete")
    assert records[0].status == "success" and records[0].words_changed == 2


def test_constraints_hold_in_every_output(keyword_adapter):
    examples = NEGATIVE + [{"sentence": "bad bad bad bad and not the worst of it at all", "label": 1}]
    records, _ = run(keyword_adapter, examples, search="greedy", wir="unk", max_change=0.2, min_change_words=1,
                     pos=True)
    stop = stopword_set()
    from unirobust.attacks.text.sources import wordnet_pos

    for r in records:
        if r.adversarial is None:
            continue
        a, b = WordText.of(r.original), WordText.of(r.adversarial)
        changed = a.changed(b)
        assert len(changed) <= max(1, -(-len(a) * 2 // 10))
        for j in changed:
            assert a.word(j).lower() not in stop
            pa, pb = wordnet_pos(a.word(j)), wordnet_pos(b.word(j))
            assert not (pa and pb) or pa & pb or (pa & set("nv") and pb & set("nv"))
    records, _ = run(keyword_adapter, NEGATIVE, source="chars", wir="unk", max_edit_distance=1)
    for r in records:
        if r.adversarial is not None:
            assert levenshtein(r.original, r.adversarial) <= 1
    records, _ = run(keyword_adapter, NEGATIVE, source="chars", wir="unk", max_edit_distance=3)
    assert max(levenshtein(r.original, r.adversarial) for r in records if r.adversarial) <= 3


def test_min_cos_constraint_uses_vectors(keyword_adapter):
    """With min_cos on the keyword model's embeddings (keywords share a one-hot feature), only words
    whose vectors are close to the keyword may replace it; every output must satisfy it."""
    from unirobust.attacks.text.sources import WordVectors

    vectors = WordVectors.of_adapter(keyword_adapter)
    records, _ = run(keyword_adapter, NEGATIVE, search="greedy", wir="unk", min_cos=0.3)
    for r in records:
        if r.adversarial:
            a, b = WordText.of(r.original), WordText.of(r.adversarial)
            for j in a.changed(b):
                cos = vectors.cos(a.word(j), b.word(j))
                assert cos is None or cos >= 0.3


def test_sentence_similarity_constraint(keyword_adapter):
    """A similarity threshold no swap can meet blocks every attack on texts longer than the window;
    shorter texts skip the check (TextAttack's rule)."""
    long = {"sentence": "it is a bad movie that nobody in the family could bear to watch until the end", "label": 1}
    short = {"sentence": "a bad movie", "label": 1}
    records, _ = run(keyword_adapter, [long, short], search="greedy", wir="unk", sentence_sim=0.9999,
                     sentence_window=5, sentence_metric="cosine")
    assert records[0].status == "failed" and records[0].words_changed == 0
    assert records[1].status == "success"
    records, _ = run(keyword_adapter, [long], search="greedy", wir="unk", sentence_sim=0.5, sentence_window=5)
    assert records[0].status == "success"


def test_query_budget_is_respected(keyword_adapter):
    records, _ = run(keyword_adapter, NEGATIVE[:2], search="pwws", query_budget=3)
    assert all(r.queries <= 3 for r in records)
    assert all(r.status == "failed" for r in records)  # PWWS needs more than 3 queries here


@pytest.mark.parametrize("wir", ["delete", "unk"])
def test_budget_spent_by_the_first_query_is_a_failed_attack(keyword_adapter, wir):
    """query_budget=1: the unattacked text takes the whole budget, so word saliency gets no
    probabilities (it crashed for labels >= 1)."""
    records, _ = run(keyword_adapter, NEGATIVE[:2], wir=wir, query_budget=1)
    assert [r.status for r in records] == ["failed", "failed"] and all(r.queries == 1 for r in records)


def test_word_attacks_on_a_text_ensemble(make_text_adapter, sentences):
    """Gradient word order and embedding neighbours read the ensemble's shared tokenizer and its
    first member's embeddings (they reached for attributes only single models have)."""
    from unirobust.models.ensemble import EnsembleAdapter

    ensemble = EnsembleAdapter([make_text_adapter(seed=0), make_text_adapter(seed=1)]).eval()
    examples = [{"sentence": e["sentence"], "label": int(p)}
                for e, p in zip(sentences, ensemble.predict([e["sentence"] for e in sentences]))]
    for kw in ({"wir": "gradient"}, {"source": "embedding", "wir": "delete"}):
        records, _ = run(ensemble, examples[:3], **kw)
        assert all(r.status in ("success", "failed") for r in records), [r.message for r in records]


def test_targeted_attack(tokenizer):
    from unirobust.models.text import TextAdapter

    adapter = TextAdapter(KeywordNet(tokenizer), tokenizer, 2, ["sentence"]).eval()
    records, _ = run(adapter, NEGATIVE[:1], targeted=True, search="greedy", wir="unk")
    assert records[0].status == "success" and records[0].pred_after == 0


def test_results_do_not_depend_on_batching(keyword_adapter):
    examples = NEGATIVE * 3
    a, _ = run(keyword_adapter, examples, source="chars", wir="unk", concurrency=1, batch_size=1)
    b, _ = run(keyword_adapter, examples, source="chars", wir="unk", concurrency=12, batch_size=64)
    strip = lambda rs: [{**json.loads(r.to_json()), "seconds": 0} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)


def test_bad_inputs_get_a_status_not_a_crash(keyword_adapter, caplog):
    long = " ".join(["bad"] + ["fine"] * 300)
    examples = [{"sentence": "", "label": 1}, {"sentence": "  ,.!  ", "label": 1}, {"sentence": "bad", "label": 7},
                {"sentence": "bad", "label": 1}, {"sentence": "ein schlechter Film bad 😀 مرحبا", "label": 1},
                {"sentence": long, "label": 1}, {"text": "bad", "label": 1}]
    records, _ = run(keyword_adapter, examples, source="chars", wir="unk")
    status = [r.status for r in records]
    assert status[:3] == ["error", "error", "error"] and status[6] == "error"
    assert "outside the model's classes" in records[2].message and "missing" in records[6].message
    assert status[3] == "success"  # a one-word text
    assert status[4] == "success" and "😀 مرحبا" in records[4].adversarial
    assert "truncated" in records[5].message and "truncated" in caplog.text


def test_pairs_attack_the_last_field(tokenizer):
    from unirobust.models.text import TextAdapter

    adapter = TextAdapter(KeywordNet(tokenizer), tokenizer, 2, ["premise", "hypothesis"]).eval()
    ex = [{"premise": "a bad day", "hypothesis": "nothing bad happened", "label": 1}]
    records, _ = run(adapter, ex, search="greedy", wir="unk")
    assert records[0].field == "hypothesis" and records[0].context == {"premise": "a bad day"}
    assert records[0].status == "failed"  # the premise keeps its keyword: unflippable
    records, _ = run(adapter, [{**ex[0], "premise": "a fine day"}], search="greedy", wir="gradient")
    assert records[0].status == "success" and records[0].context == {"premise": "a fine day"}


# ----------------------------------------------------------------------------- results, resume, sharding


def test_summary_metrics():
    rs = [AttackRecord(0, "success", "a b", "a c", 1, 1, 0, queries=4, words_changed=1, words_total=2, seconds=1.0),
          AttackRecord(1, "failed", "a b", "a b", 1, 1, 1, queries=6, words_total=2, seconds=2.0),
          AttackRecord(2, "skipped", "x", None, 0, 1, 1, seconds=0.5),
          AttackRecord(3, "error", "", message="empty", seconds=0.0)]
    s = summarise(rs)
    assert s["attack_success_rate"] == 0.5 and s["accuracy_under_attack"] == pytest.approx(1 / 3)
    assert s["clean_accuracy"] == pytest.approx(2 / 3) and s["mean_queries"] == 5
    assert s["mean_perturbed_fraction"] == 0.5 and s["n_error"] == 1 and s["seconds_per_example"] == 0.875


def test_resume_skips_finished_examples(keyword_adapter, tmp_path, monkeypatch):
    examples = NEGATIVE * 2
    spec = attack(source="chars", wir="unk")
    full = run_word_attack(keyword_adapter, examples, spec, tmp_path / "a", progress=False)
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines()
    # an interrupted run: 5 records written, the 6th cut mid-line
    part = tmp_path / "b" / "part-0.jsonl"
    part.parent.mkdir()
    part.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    (tmp_path / "b" / "key.txt").write_text((tmp_path / "a" / "key.txt").read_text())  # same model and attack
    from unirobust.attacks.text import engine

    seen = []
    original = engine.Engine.run

    def counting(self, examples, *a, **k):
        items = list(examples)
        seen.extend(e.index for e in items)
        return original(self, iter(items), *a, **k)

    monkeypatch.setattr(engine.Engine, "run", counting)
    resumed = run_word_attack(keyword_adapter, examples, spec, tmp_path / "b", progress=False)
    assert sorted(seen) == [5, 6, 7]  # only the unfinished ones (4 is a skipped example, not attacked)
    strip = lambda p: [{**json.loads(x), "seconds": 0} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "b" / "results.jsonl") == strip(tmp_path / "a" / "results.jsonl")
    assert resumed["attack_success_rate"] == full["attack_success_rate"]
    assert not list((tmp_path / "b").glob("part-*"))


def test_results_of_another_model_attack_or_example_list_are_redone(keyword_adapter, tmp_path, monkeypatch):
    """A run folder retrained, an attack re-configured or other examples must not reuse old records;
    more examples (a larger n) only adds the new ones."""
    from unirobust.attacks.text import engine

    seen = []
    original = engine.Engine.run

    def counting(self, examples, *a, **k):
        items = list(examples)
        seen.append(sorted(e.index for e in items))
        return original(self, iter(items), *a, **k)

    monkeypatch.setattr(engine.Engine, "run", counting)
    out, spec = tmp_path / "attack", attack(source="chars", wir="unk")
    examples = NEGATIVE[:3]
    run_word_attack(keyword_adapter, examples, spec, out, progress=False)
    run_word_attack(keyword_adapter, examples, spec, out, progress=False)  # nothing left to do
    run_word_attack(keyword_adapter, NEGATIVE * 2, attack(source="chars", wir="unk", n=8), out, progress=False)
    assert seen == [[0, 1, 2], [], [3, 4, 5, 6, 7]]  # only the new examples: n is not part of the key
    run_word_attack(keyword_adapter, NEGATIVE * 2, attack(source="chars", wir="unk", n=8, batch_size=3,
                                                         concurrency=2), out, progress=False)
    assert seen[-1] == []  # batching changes speed, not results: nothing is redone
    fewer = run_word_attack(keyword_adapter, examples, spec, out, progress=False)  # a smaller n: a summary of 3 ...
    assert fewer["n"] == 3 and len(read_jsonl(out / "results.jsonl")) == 8  # ... and the other 5 records kept
    run_word_attack(keyword_adapter, NEGATIVE * 2, attack(source="chars", wir="unk", n=8), out, progress=False)
    assert seen[-1] == []
    run_word_attack(keyword_adapter, examples, attack(source="chars", wir="unk", max_edit_distance=1), out,
                    progress=False)
    assert seen[-1] == [0, 1, 2]
    changed = [{**examples[0], "sentence": "a bad film with a good cast"}, *examples[1:]]
    run_word_attack(keyword_adapter, changed, attack(source="chars", wir="unk", max_edit_distance=1), out,
                    progress=False)
    assert seen[-1] == [0, 1, 2]
    with torch.no_grad():
        next(keyword_adapter.parameters()).add_(1e-3)
    run_word_attack(keyword_adapter, changed, attack(source="chars", wir="unk", max_edit_distance=1), out,
                    progress=False)
    assert seen[-1] == [0, 1, 2]
    assert len(read_jsonl(out / "results.jsonl")) == 3


def test_pair_results_with_another_context_are_redone(tokenizer, tmp_path):
    """Pairs: the attacked field and the label the same, the other field changed -> another example."""
    from unirobust.models.text import TextAdapter

    adapter = TextAdapter(KeywordNet(tokenizer), tokenizer, 2, ["premise", "hypothesis"]).eval()
    spec, out = attack(search="greedy", wir="unk"), tmp_path / "pairs"
    first = [{"premise": "a bad day", "hypothesis": "nothing bad happened", "label": 1}]
    run_word_attack(adapter, first, spec, out, progress=False)
    second = [{**first[0], "premise": "a fine day"}]
    run_word_attack(adapter, second, spec, out, progress=False)
    (record,) = read_jsonl(out / "results.jsonl")
    assert record.context == {"premise": "a fine day"} and record.status == "success"


class FakeAccelerator:
    """Two processes run one after the other (the merge happens on rank 0, which runs last here)."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        pass


def test_sharded_results_equal_single_process(keyword_adapter, tmp_path):
    examples = NEGATIVE * 3
    spec = attack(source="chars", wir="unk")
    run_word_attack(keyword_adapter, examples, spec, tmp_path / "one", progress=False)
    ResultStore(tmp_path / "two").reset_if_stale(result_key(keyword_adapter, spec), examples, "sentence")
    store = ResultStore(tmp_path / "two", rank=1, world=2)
    attack_examples(keyword_adapter, examples, spec, store=store, progress=False, indices=store.todo(len(examples)))
    assert {r.index for r in read_jsonl(tmp_path / "two" / "part-1.jsonl")} == {1, 3, 5, 7, 9, 11}
    run_word_attack(keyword_adapter, examples, spec, tmp_path / "two", FakeAccelerator(0, 2), progress=False)
    strip = lambda p: [{**json.loads(x), "seconds": 0} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "two" / "results.jsonl") == strip(tmp_path / "one" / "results.jsonl")


# ----------------------------------------------------------------------------- recipes, defense, eval, CLI


def test_named_recipes_build_and_validate():
    for name in ("pwws", "textfooler", "deepwordbug", "a2t"):
        a = build_attack({"name": name, "n": 10})
        assert isinstance(a, WordAttack) and a.n == 10 and a.kind == "word"
    assert build_attack({"name": "textfooler"}).counterfit and build_attack({"name": "a2t"}).wir == "gradient"
    assert build_attack({"name": "bae", "mlm": "some/mlm"}).source == "mlm"
    with pytest.raises(ValueError):
        build_attack({"name": "pwws", "nonsense": 1})


def test_word_attack_on_vision_task_is_a_recipe_error():
    from unirobust.recipe import RecipeError, validate

    raw = {"name": "x", "task": {"name": "digits"}, "model": {"spec": "timm:test_resnet"},
           "eval": {"attacks": [{"name": "pwws"}]}}
    with pytest.raises(RecipeError, match="substitutes words"):
        validate(raw)
    raw = {"name": "x", "task": {"name": "sst2-sample"}, "model": {"spec": "timm:test_resnet"},
           "defense": {"name": "pgd-at", "attack": {"name": "pwws"}}}
    with pytest.raises(RecipeError, match="continuous attack"):
        validate(raw)


def test_decode_examples_round_trip(make_text_adapter):
    from unirobust.defenses.discrete_at import decode_examples

    adapter = make_text_adapter(num_labels=3, text_fields=("premise", "hypothesis"))
    examples = [{"premise": "a man plays a guitar", "hypothesis": "someone makes music", "label": 2},
                {"premise": "it rains", "hypothesis": "the street is dry", "label": 0}]
    batch = adapter.collate(examples)
    assert decode_examples(adapter, batch, [0, 1]) == examples
    # a pair model without token type ids (RoBERTa, DistilBERT): the fields are told apart by [SEP]
    batch.pop("token_type_ids")
    assert decode_examples(adapter, batch, [0, 1]) == examples
    # an empty field leaves nothing to match it to: that row is left out, the others are decoded
    batch = adapter.collate([{"premise": "it rains", "hypothesis": "", "label": 1}, examples[1]])
    batch.pop("token_type_ids")
    assert decode_examples(adapter, batch, [0, 1]) == [examples[1]]


def test_decode_examples_of_a_prompt_head_leaves_out_the_template(tokenizer, bert_config):
    from transformers import BertForMaskedLM

    from unirobust.defenses.discrete_at import decode_examples
    from unirobust.models.prompt import PromptAdapter

    model = BertForMaskedLM(bert_config())
    single = PromptAdapter(model, tokenizer, 2, ["sentence"], ["{sentence} It was [MASK]."], [["bad"], ["good"]], "mlm")
    examples = [{"sentence": "a funny and moving film", "label": 1}, {"sentence": "dull", "label": 0}]
    assert decode_examples(single, single.collate(examples), [0, 1]) == examples
    pair = PromptAdapter(model, tokenizer, 3, ["premise", "hypothesis"], ["{premise} ? [MASK] , {hypothesis}"],
                         [["yes"], ["maybe"], ["no"]], "mlm")
    examples = [{"premise": "a man plays a guitar", "hypothesis": "someone makes music", "label": 0},
                {"premise": "it rains", "hypothesis": "the street is dry", "label": 2}]
    assert decode_examples(pair, pair.collate(examples), [0, 1]) == examples


def test_discrete_at_trains_on_adversarial_examples(tokenizer):
    from unirobust.defenses import build_defense
    from unirobust.models.text import TextAdapter

    adapter = TextAdapter(KeywordNet(tokenizer), tokenizer, 2, ["sentence"])
    defense = build_defense({"name": "discrete-at", "attack": {"name": "deepwordbug"}, "fraction": 1.0})
    batch = adapter.collate(NEGATIVE)
    out = defense.loss(adapter, batch)
    assert out["stats"]["attacked"] == 4 and out["stats"]["adversarial_examples"] == 3
    out["loss"].backward()
    assert adapter.model.emb.weight.grad.abs().sum() > 0 and torch.isfinite(out["loss"])
    assert build_defense({"name": "discrete-at"}).attack.wir == "gradient"  # a2t by default


def test_discrete_at_builds_word_vectors_once(make_text_adapter, monkeypatch):
    """The neighbour space of the training attack is built at the first batch and kept while the
    model trains (rebuilt after every update, counter-fitting made each A2T step ~5x slower); an attack
    used on its own still follows the model's current embeddings."""
    from unirobust.attacks import build_attack
    from unirobust.attacks.text import sources
    from unirobust.defenses import build_defense

    built = []
    real = sources.WordVectors
    monkeypatch.setattr(sources, "WordVectors", lambda *a, **k: built.append(1) or real(*a, **k))
    adapter = make_text_adapter()
    spec = {"name": "a2t", "counterfit": False, "sentence_sim": None}
    defense = build_defense({"name": "discrete-at", "attack": spec, "fraction": 1.0})
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    batch = adapter.collate(NEGATIVE)
    for _ in range(3):
        defense.loss(adapter, batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(built) == 1
    standalone = build_attack(spec)
    before = standalone.vectors(adapter)
    defense.loss(adapter, batch)["loss"].backward()
    optimizer.step()
    assert standalone.vectors(adapter) is not before and len(built) == 3


@pytest.fixture
def tiny_text_run(tmp_path, tokenizer):
    """A trained-for-a-few-steps tiny BERT run folder on the bundled SST-2 sample, whose recipe
    evaluates with a word attack."""
    from conftest import tiny_bert
    from unirobust.recipe import validate
    from unirobust.runs import execute

    folder = tmp_path / "tiny-bert"
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    raw = {"name": "tiny", "output_dir": str(tmp_path / "runs"), "task": {"name": "sst2-sample", "max_train": 64,
           "max_eval": 16}, "model": {"spec": str(folder), "options": {"max_length": 64}},
           "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
           "eval": {"check_examples": 0, "attacks": [{"name": "deepwordbug", "n": 6}]}}
    metrics = execute(validate(raw))
    return tmp_path / "runs" / "tiny", metrics


def test_recipe_eval_runs_word_attacks(tiny_text_run):
    run_dir, metrics = tiny_text_run
    summary = metrics["eval"]["word_attacks"]["deepwordbug(n=6)"]
    assert summary["n"] == 6
    rows = read_jsonl(run_dir / "attacks" / "deepwordbug_n_6" / "results.jsonl")
    assert [r.index for r in rows] == list(range(6))
    # each record names its row in the source split (max_eval samples the split: index alone is not it)
    from unirobust.recipe import read_yaml, validate
    from unirobust.tasks import load_task

    recipe = validate(read_yaml(run_dir / "recipe.yaml"))
    test = load_task(recipe.resolved_task, seed=recipe.seed).test
    assert [r.idx for r in rows] == test["idx"][:6] and [r.idx for r in rows] != list(range(6))
    assert "Word-substitution attacks" in (run_dir / "report.md").read_text()


def test_word_attacks_run_in_eval_mode_and_restore_the_mode(make_text_adapter, sentences, monkeypatch):
    """A training-mode model (as after training, before evaluate's word attacks) is attacked without
    dropout: otherwise predictions, and the successes recorded, would be random."""
    from unirobust.attacks.text.attack import attack_examples

    adapter = make_text_adapter().train()
    modes = []
    real = adapter.logits
    monkeypatch.setattr(adapter, "logits", lambda z, batch: modes.append(adapter.model.training) or real(z, batch))
    attack_examples(adapter, sentences, build_attack({"name": "deepwordbug"}), progress=False)
    assert modes and not any(modes)
    assert adapter.training and adapter.model.training


def test_a_loaded_run_is_in_eval_mode_throughout(tiny_text_run):
    from unirobust.runs import load_run

    _, adapter = load_run(tiny_text_run[0])
    assert not any(m.training for m in adapter.modules())


def test_cli_attack_command(tiny_text_run, capsys):
    from unirobust.cli import main

    run_dir, _ = tiny_text_run
    assert main(["attack", str(run_dir), "--attack", "deepwordbug:max_edit_distance=2", "--n", "5"]) == 0
    out = capsys.readouterr().out
    assert "accuracy under attack" in out
    folder = run_dir / "attacks" / "deepwordbug_max_edit_distance-2"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n"] == 5 and len(read_jsonl(folder / "results.jsonl")) == 5
    assert main(["attack", str(run_dir), "--attack", "pgd"]) == 2
    assert main(["attack", str(run_dir), "--attack", "bae"]) == 2
    assert "mlm=" in capsys.readouterr().err
    assert main(["attack", str(run_dir), "--textattack-recipe", "nosuch", "--n", "1"]) == 2
    assert "unknown TextAttack recipe 'nosuch'" in capsys.readouterr().err
    assert main(["attack", str(run_dir), "--attack", "pwws:field=bogus", "--n", "1"]) == 2  # not a traceback
    assert "field 'bogus' is not a text field of the model (sentence)" in capsys.readouterr().err


def test_cli_attack_folders_of_model_specs_and_mlm_paths(tiny_text_run, tmp_path, monkeypatch):
    """An attack spec with a path (bae:mlm=/a/b) is one folder; word attacks on two model specs
    write beside each other instead of the second deleting the first's results."""
    from unirobust.evaluate import slug

    assert slug("bae_mlm-/tmp/my/mymlm") == "bae_mlm-_tmp_my_mymlm" and "/" not in slug("hf:/a/b-on-x")
    from unirobust.cli import main

    run_dir, _ = tiny_text_run
    monkeypatch.chdir(tmp_path)
    specs = ["hf:sentence-transformers/all-MiniLM-L6-v2", f"hf:{run_dir.parent.parent / 'tiny-bert'}"]
    for spec in specs:
        assert main(["attack", spec, "--task", "sst2-sample", "--attack", "deepwordbug", "--n", "2",
                     "model.options.max_length=16"]) == 0
    made = sorted(p.name for p in (tmp_path / "runs" / "attacks").iterdir())
    assert made[0] == "hf_sentence-transformers_all-MiniLM-L6-v2-on-sst2-sample" and len(made) == len(specs)
    assert (tmp_path / "runs" / "attacks" / made[0] / "deepwordbug" / "summary.json").exists()


def test_advgen_writes_filtered_advglue_that_reloads(keyword_adapter, tmp_path):
    from unirobust.advgen import advgen
    from unirobust.advglue import load_advglue

    examples = NEGATIVE + [{"sentence": "bad", "label": 1}]  # a one-word text: 100% of words changed
    examples = [{**e, "idx": 100 + i} for i, e in enumerate(examples)]  # GLUE's own idx column
    counts = advgen(keyword_adapter, examples, attack(source="chars", wir="unk"), tmp_path / "adv.json",
                    tmp_path / "work", label_names=["negative", "positive"], min_similarity=-1.0, max_change=0.5)
    assert counts["successful"] == 4 and counts["too_many_words_changed"] == 1 and counts["kept"] == 3
    items = load_advglue(tmp_path / "adv.json")["sst2"]
    rows = items.to_list() if hasattr(items, "to_list") else list(items)
    assert len(rows) == 3
    preds = keyword_adapter.predict([r["sentence"] for r in rows])
    assert all(int(p) != 1 for p in preds)  # every kept sentence fools the model
    assert all(r["label"] == 1 and r["original"] != r["sentence"] for r in rows)  # GLUE positive = model class 1
    assert all(examples[r["idx"] - 100]["sentence"] == r["original"] for r in rows)  # idx names the source row
    strict = advgen(keyword_adapter, examples, attack(source="chars", wir="unk"), tmp_path / "adv2.json",
                    tmp_path / "work", min_similarity=0.9999, max_change=0.5)
    assert strict["too_dissimilar"] >= 1 and strict["kept"] < 3


@pytest.mark.slow
def test_two_process_attack_equals_one_process(tiny_text_run, tmp_path):
    """`unirobust launch --multi_gpu --num_processes 2 -- attack ...` (a real gloo job on CPU) shards
    the examples and merges them into the same results.jsonl as one process."""
    import subprocess
    import sys

    run_dir, _ = tiny_text_run
    cli = [sys.executable, "-m", "unirobust.cli"]
    args = ["attack", str(run_dir), "--attack", "deepwordbug", "--n", "9"]
    one = subprocess.run([*cli, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*cli, "launch", "--multi_gpu", "--num_processes", "2", "--", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    strip = lambda p: [{**json.loads(x), "seconds": 0} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "two" / "results.jsonl") == strip(tmp_path / "one" / "results.jsonl")
    assert len(strip(tmp_path / "one" / "results.jsonl")) == 9
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert two.stdout.count("accuracy under attack") == 1  # printed by the main process only


@pytest.mark.slow
def test_cli_textattack_recipe_through_the_bridge(tiny_text_run, capsys):
    from unirobust.cli import main

    run_dir, _ = tiny_text_run
    assert main(["attack", str(run_dir), "--textattack-recipe", "deepwordbug", "--n", "3"]) == 0
    rows = read_jsonl(run_dir / "attacks" / "textattack-deepwordbug" / "results.jsonl")
    assert [r.index for r in rows] == [0, 1, 2] and all(r.status in ("success", "failed", "skipped") for r in rows)
    assert "textattack-deepwordbug" in capsys.readouterr().out
