"""AdvGLUE-style generation: an adversarial set built from any GLUE-shaped text task with the word
attack engine, filtered as AdvGLUE filtered its candidates (Wang et al. 2021, "Adversarial GLUE"):
keep only successful attacks whose prediction flipped, that change at most ``max_change`` of the
words, and whose sentence-encoder similarity to the original is at least ``min_similarity``
(AdvGLUE added human validation on top, which no script replaces). The output is an AdvGLUE
release-format JSON file, so ``unirobust eval --advglue <file>`` and the ``advglue`` loader read it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .advglue import AdvGLUEError, _label_map, keys_for, write_advglue
from .attacks.text.attack import run_word_attack
from .attacks.text.results import read_jsonl

log = logging.getLogger(__name__)


def advgen(adapter, examples: list[dict], attack, out_path: str | Path, work_dir: str | Path,
           label_names=None, accelerator=None, min_similarity: float = 0.85, max_change: float = 0.15,
           encoder: str = "sentence-transformers/all-MiniLM-L6-v2", attack_name: str = "") -> dict:
    """Attack ``examples``, filter, write ``out_path``; returns counts of what was kept and why not."""
    fields, num_classes = list(adapter.text_fields), adapter.num_classes
    keys = keys_for(fields, num_classes)
    if not keys:
        raise AdvGLUEError(f"the AdvGLUE format has no task with fields {fields} and {num_classes} labels; "
                           f"advgen needs a GLUE-shaped task (sst2, qqp, mnli, qnli, rte)")
    key = keys[0]
    to_glue = {model: glue for glue, model in enumerate(_label_map(key, label_names, num_classes))}
    summary = run_word_attack(adapter, examples, attack, work_dir, accelerator)
    counts = {"examples": len(examples), "successful": 0, "too_many_words_changed": 0, "too_dissimilar": 0,
              "kept": 0, "attack_summary": summary, "task": key}
    if accelerator is not None and not accelerator.is_main_process:
        return counts
    wins = [r for r in read_jsonl(Path(work_dir) / "results.jsonl")  # the folder may hold more (an earlier --n)
            if r.index < len(examples) and r.status == "success" and r.pred_after != r.label]
    counts["successful"] = len(wins)
    small = [r for r in wins if r.perturbed_fraction <= max_change]
    counts["too_many_words_changed"] = len(wins) - len(small)
    kept = small
    if small and min_similarity > -1:
        from .attacks.text.engine import sentence_encoder

        enc = sentence_encoder(encoder)
        sims = (enc.encode([r.original for r in small]) * enc.encode([r.adversarial for r in small])).sum(-1)
        kept = [r for r, s in zip(small, sims.tolist()) if s >= min_similarity]
        counts["too_dissimilar"] = len(small) - len(kept)
    counts["kept"] = len(kept)
    items = [{"idx": int(examples[r.index].get("idx", r.index)), "label": to_glue[r.label], r.field: r.adversarial, **r.context,
              "original": r.original, "attack": attack_name} for r in kept]
    write_advglue(out_path, {key: items})
    log.info("advgen: %d of %d examples kept (%d successful attacks) -> %s", len(kept), len(examples), len(wins),
             out_path)
    if not kept:
        log.warning("advgen kept no example (%d successful attacks, %d changed too many words, %d too dissimilar): "
                    "%s holds an empty %s list", len(wins), counts["too_many_words_changed"], counts["too_dissimilar"],
                    out_path, key)
    return counts
