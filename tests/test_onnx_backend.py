"""The ONNX Runtime backend of word attacks: same logits and same attack results as eager PyTorch."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

from unirobust.attacks.text.attack import WordAttack, attack_examples  # noqa: E402
from unirobust.attacks.text.engine import Victim  # noqa: E402
from unirobust.models.onnx_forward import OnnxForward, onnx_forward  # noqa: E402

TEXTS = ["a fine film", "the plot is dull , and the ending goes on and on for far too long", "ok"]


def eager_logits(adapter, batch):
    with torch.no_grad():
        return adapter.logits(adapter.embed(batch), batch)


def test_onnx_logits_match_eager_on_new_shapes(make_text_adapter):
    adapter = make_text_adapter(num_labels=3).eval()
    forward = OnnxForward(adapter)
    for texts in (TEXTS, TEXTS[:1], TEXTS * 5):  # batch sizes and lengths unlike the trace's
        batch = adapter.tokenize(texts)
        assert torch.allclose(forward(batch), eager_logits(adapter, batch), atol=1e-5)


def test_onnx_pairs_keep_segment_ids(make_text_adapter):
    adapter = make_text_adapter(text_fields=("premise", "hypothesis")).eval()
    forward = OnnxForward(adapter)
    assert "token_type_ids" in forward.inputs
    batch = adapter.tokenize([("a man sleeps", "nobody sleeps at all"), ("yes", "no")])
    assert torch.allclose(forward(batch), eager_logits(adapter, batch), atol=1e-5)


def test_onnx_prompt_head_exports(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    from unirobust.models.prompt import PromptAdapter

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64))
    adapter = PromptAdapter(model, tokenizer, 2, ["sentence"], ["{sentence} It was [MASK].", "[MASK] : {sentence}"],
                            [["terrible"], ["great"]], "mlm").eval()
    batch = adapter.tokenize(TEXTS)
    assert torch.allclose(OnnxForward(adapter)(batch), eager_logits(adapter, batch), atol=1e-5)


def test_onnx_copy_is_reexported_after_training(make_text_adapter):
    adapter = make_text_adapter().eval()
    first = onnx_forward(adapter)
    assert onnx_forward(adapter) is first  # several attacks of one evaluation share one export
    with torch.no_grad():
        adapter.model.classifier.weight.add_(1.0)  # what an optimizer step does, in place
    second = onnx_forward(adapter)
    assert second is not first
    batch = adapter.tokenize(TEXTS)
    assert torch.allclose(second(batch), eager_logits(adapter, batch), atol=1e-5)


def test_word_attack_results_equal_across_backends(keyword_adapter):
    examples = [{"sentence": t, "label": 1} for t in ("a bad movie with a good cast", "the plot is dull , and so on",
                                                      "what an awful , awful film", "a warm and tender story")]
    strip = lambda rs: [{**json.loads(r.to_json()), "seconds": 0} for r in rs]  # noqa: E731
    runs = {}
    for backend in ("torch", "onnx"):
        attack = WordAttack(source="chars", wir="unk", backend=backend)
        runs[backend] = strip(attack_examples(keyword_adapter, examples, attack, progress=False)[0])
    assert runs["onnx"] == runs["torch"]
    assert any(r["status"] == "success" for r in runs["onnx"])  # the comparison covers real swaps


def test_onnx_backend_errors_are_clear(make_text_adapter, monkeypatch):
    adapter = make_text_adapter()
    with pytest.raises(ValueError, match="torch or onnx"):
        Victim(adapter, backend="tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match=r"unirobust\[onnx\]"):
        OnnxForward(adapter)
