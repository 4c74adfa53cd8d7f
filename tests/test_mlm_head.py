"""Fitting a masked-LM head onto a frozen encoder (unirobust/models/mlm_head.py, ``unirobust mlm-head``).

A tiny random ``BertModel`` (no MLM head, like the offline MiniLM) saved as a folder, the packaged
MiniLM tokenizer, and a small repetitive corpus the head can learn from in a few steps.
"""
from __future__ import annotations

import json

import pytest
import torch

from unirobust.models.base import ModelSpecError
from unirobust.models.mlm_head import build_mlm_head, head_parameters

SST_TEMPLATE = "{sentence} It was [MASK]."

CORPUS = [f"the {a} movie was {b} and the {c} was {d} ." for a in ("first", "second", "last", "new")
          for b in ("great", "terrible", "fine") for c in ("plot", "cast", "music") for d in ("good", "bad")] * 2


@pytest.fixture
def encoder_folder(tmp_path, tokenizer, bert_config):
    from transformers import BertModel

    torch.manual_seed(3)
    folder = tmp_path / "encoder"
    BertModel(bert_config(), add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fitted_head_predicts_masked_tokens_and_leaves_the_encoder_alone(encoder_folder, tmp_path):
    from transformers import AutoModelForMaskedLM, BertModel

    out = tmp_path / "with_head"
    info = build_mlm_head(f"hf:{encoder_folder}", CORPUS, out, epochs=3, batch_size=16, lr=1e-2, seed=0)
    assert info["before"]["masked_tokens"] == info["after"]["masked_tokens"] > 0  # the same held-out masks
    assert info["after"]["accuracy"] > info["before"]["accuracy"] + 0.2
    assert info["after"]["loss"] < info["before"]["loss"]
    assert any("cls.predictions" in k for k in info["new_head_weights"])
    assert json.loads((out / "mlm_head.json").read_text())["after"] == info["after"]

    original = state(BertModel.from_pretrained(encoder_folder))
    fitted, loading = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"]  # a complete MLM head: head: prompt will use it
    for k, v in state(fitted.base_model).items():
        if k in original:
            assert torch.equal(v, original[k]), f"encoder weight {k} moved"
    # the decoder stays tied to the (frozen) input embeddings
    assert fitted.get_output_embeddings().weight.data_ptr() == fitted.get_input_embeddings().weight.data_ptr()


def test_only_the_head_is_trained(tokenizer, bert_config):
    from transformers import BertForMaskedLM

    from unirobust.models.mlm_head import fit_mlm_head

    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config())
    head_ids = {id(p) for p in head_parameters(model)}
    assert head_ids and all(id(p) not in head_ids for p in model.base_model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_mlm_head(model, tokenizer, CORPUS, epochs=1, batch_size=16, lr=1e-2, progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("cls.") for n in moved)
    assert all(p.requires_grad for p in model.parameters())  # fine-tuning afterwards trains everything again


def test_fitted_checkpoint_serves_head_prompt_with_the_mlm_scorer(encoder_folder, tmp_path):
    from unirobust.models import build_model
    from unirobust.models.prompt import PromptAdapter
    from unirobust.tasks import get_task

    out = tmp_path / "with_head"
    build_mlm_head(f"hf:{encoder_folder}", CORPUS, out, epochs=1, batch_size=16)
    task = get_task("sst2-sample")
    options = {"head": "prompt", "templates": [SST_TEMPLATE], "verbalizer": {"negative": ["terrible"], "positive": ["great"]}}
    assert build_model(f"hf:{encoder_folder}", task, **options).scorer == "embedding"
    adapter = build_model(f"hf:{out}", task, **options)
    assert isinstance(adapter, PromptAdapter) and adapter.scorer == "mlm"


def test_refusals(encoder_folder, tmp_path):
    out = tmp_path / "with_head"
    build_mlm_head(f"hf:{encoder_folder}", CORPUS, out, epochs=1, batch_size=16)
    with pytest.raises(FileExistsError, match="exists"):
        build_mlm_head(f"hf:{encoder_folder}", CORPUS, out, epochs=1)
    with pytest.raises(ModelSpecError, match="already has a complete masked-LM head"):
        build_mlm_head(f"hf:{out}", CORPUS, tmp_path / "again", epochs=1)
    with pytest.raises(ModelSpecError, match="hf:"):
        build_mlm_head("timm:resnet18", CORPUS, tmp_path / "x")
    with pytest.raises(ValueError, match="at least 2"):
        build_mlm_head(f"hf:{encoder_folder}", ["only one", "  "], tmp_path / "y")


def test_cli_fits_from_a_text_file(encoder_folder, tmp_path, capsys):
    from unirobust.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS))
    out = tmp_path / "cli_head"
    assert main(["mlm-head", f"hf:{encoder_folder}", "--texts", str(texts), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16"]) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    info = json.loads((out / "mlm_head.json").read_text())
    assert info["texts"] == str(texts) and info["options"]["epochs"] == 1 and info["environment"]["packages"]
    assert main(["mlm-head", f"hf:{encoder_folder}", "--texts", str(texts), "--out", str(out)]) == 2  # exists
