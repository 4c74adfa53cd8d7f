"""Fit a masked-LM head onto a frozen encoder that ships without one, from unlabelled text.

Why: MVP (``head: prompt``, see :mod:`unirobust.models.prompt`) reads class scores from a masked-LM
head so that no classification parameter starts random. Sentence encoders such as all-MiniLM-L6-v2
(the offline model here) ship as a bare ``BertModel``; ``scorer: embedding`` then scores the mask's
hidden state against the input embeddings directly. This module gives such an encoder a real MLM
head instead: the architecture's own head (for BERT: dense + GELU + LayerNorm, decoder tied to the
input embeddings, a vocabulary bias) trained by masked-token prediction on unlabelled sentences
(Devlin et al. 2019 masking: 15% of tokens, of which 80% [MASK], 10% random, 10% kept), with every
encoder weight and the tied embeddings frozen. The result is an ``AutoModelForMaskedLM`` checkpoint
whose encoder is bit-identical to the input model's, so a classifier fine-tuned from it (MLP-FT) is
the same as one fine-tuned from the original; only MVP's head differs.

Departure from pre-training an MLM: the encoder does not move (the head adapts to the encoder, not
the other way round) and only the head's own parameters are trained.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelSpecError

log = logging.getLogger(__name__)

INFO_FILE = "mlm_head.json"


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` (an ``...ForMaskedLM``) that are not the encoder's: the MLM head
    without its decoder matrix, which is tied to the encoder's input embeddings."""
    base = {id(p) for p in model.base_model.parameters()}
    return [p for p in model.parameters() if id(p) not in base]


def _head_module(model: nn.Module) -> nn.Module | None:
    """The one child module besides the encoder (BERT ``cls``, RoBERTa ``lm_head``), or None when the
    head is spread over several children (then the full model computes the loss)."""
    others = [m for m in model.children() if m is not model.base_model and any(True for _ in m.parameters())]
    return others[0] if len(others) == 1 else None


def masked_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the masked positions (``labels != -100``) and the number predicted correctly.

    The encoder runs without gradient; the head only at the masked positions (M x D hidden states
    -> M x V logits), not at all B x T, which is most of the cost for a small encoder.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    picked = labels != -100
    head = _head_module(model)
    if head is None:  # frozen encoder: no graph is built through it either way
        logits = model(**inputs).logits[picked]
    else:
        with torch.no_grad():
            hidden = model.base_model(**inputs).last_hidden_state
        logits = head(hidden[picked])
    target = labels[picked]
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).sum()


@torch.no_grad()
def masked_lm_accuracy(model: nn.Module, batches: Sequence[dict]) -> dict:
    """Masked-token loss and accuracy over fixed, already masked batches."""
    total, correct, loss_sum = 0, 0, 0.0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        if n == 0:
            continue
        loss, hits = masked_lm_loss(model, batch)
        total, correct, loss_sum = total + n, correct + int(hits), loss_sum + float(loss) * n
    return {"masked_tokens": total, "loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def fit_mlm_head(model: nn.Module, tokenizer, texts: Sequence[str], epochs: int = 10, batch_size: int = 32,
                 lr: float = 1e-3, mask_prob: float = 0.15, max_length: int = 128, holdout: float = 0.05,
                 seed: int = 0, progress: bool = True) -> dict:
    """Train ``model``'s MLM head in place on ``texts``; every other weight stays fixed.

    ``model``: an ``AutoModelForMaskedLM`` (its head typically newly initialised). A ``holdout``
    fraction of the texts (at least one) is kept out of training and scored before and after with the
    same masks. Returns ``{"before": {...}, "after": {...}, "fit_texts": n, "holdout_texts": m}``.
    """
    from tqdm.auto import tqdm
    from transformers import DataCollatorForLanguageModeling

    texts = [t for t in (str(t).strip() for t in texts) if t]
    if len(texts) < 2:
        raise ValueError(f"fitting an MLM head needs at least 2 non-empty texts, got {len(texts)}")
    if tokenizer.mask_token_id is None:
        raise ModelSpecError("the tokenizer has no mask token: this model cannot be read through a masked-LM head")
    params = head_parameters(model)
    if not params:
        raise ModelSpecError("the model has no masked-LM head parameters of its own to fit")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(holdout * len(texts)))
    held, fit = [texts[i] for i in order[:n_hold]], [texts[i] for i in order[n_hold:]]
    fit_enc, held_enc = ([{"input_ids": ids} for ids in tokenizer(rows, truncation=True, max_length=max_length)["input_ids"]]
                         for rows in (fit, held))
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mask_prob)

    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()  # the frozen encoder without dropout: the head fits the hidden states it will see
    device = next(model.parameters()).device
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731

    state = torch.random.get_rng_state()
    torch.manual_seed(seed + 1)  # the same holdout masks before and after
    held_batches = [to_device(collate(held_enc[i:i + batch_size])) for i in range(0, len(held_enc), batch_size)]
    torch.random.set_rng_state(state)
    before = masked_lm_accuracy(model, held_batches)

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = -(-len(fit_enc) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                   pct_start=0.06, anneal_strategy="linear")
    rng = random.Random(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="fit MLM head", disable=not progress)
    for _ in range(epochs):
        idx = list(range(len(fit_enc)))
        rng.shuffle(idx)
        for i in range(0, len(idx), batch_size):
            batch = to_device(collate([fit_enc[j] for j in idx[i:i + batch_size]]))
            loss, _ = masked_lm_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.requires_grad_(True)
    after = masked_lm_accuracy(model, held_batches)
    log.info("MLM head: held-out masked-token accuracy %.3f -> %.3f", before["accuracy"], after["accuracy"])
    return {"before": before, "after": after, "fit_texts": len(fit), "holdout_texts": len(held)}


def save_mlm_checkpoint(model: nn.Module, tokenizer, out: Path, info: dict, overwrite: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` as a Hugging Face folder (safetensors) with ``mlm_head.json``;
    atomic: written beside ``out``, then renamed into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_mlm_head(spec: str, texts: Sequence[str], out: Path, seed: int = 0, overwrite: bool = False,
                   source: str | None = None, **fit_options) -> dict:
    """``hf:<id or folder>`` -> fit its MLM head on ``texts`` -> a checkpoint folder at ``out``.

    A checkpoint whose MLM head is already complete is refused (it needs no fitting). Returns the
    information written to ``out/mlm_head.json``: the model, the text ``source``, the options, the
    held-out masked-token accuracy before and after, and the environment.
    """
    from ..compat import ensure_torchvision
    from ..offline import resolve_hf_model
    from ..report import environment

    if not spec.startswith("hf:"):
        raise ModelSpecError(f"mlm-head takes an hf:<id or folder> model, got {spec!r}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ensure_torchvision()
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_hf_model(spec[3:])
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized weights": that head is what we fit
    try:
        torch.manual_seed(seed)  # the new head's initialisation
        model, loading = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not loading["missing_keys"]:
        raise ModelSpecError(f"{spec} already has a complete masked-LM head; use it directly (head: prompt)")
    metrics = fit_mlm_head(model, tokenizer, texts, seed=seed, **fit_options)
    info = {"model": spec, "resolved": str(path), "new_head_weights": sorted(loading["missing_keys"]),
            "texts": source, "seed": seed, "options": fit_options, **metrics, "environment": environment()}
    save_mlm_checkpoint(model, tokenizer, Path(out), info, overwrite=overwrite)
    return info
