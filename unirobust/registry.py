"""Name -> builder tables for models, attacks and defenses.

Entries may be lazy dotted paths (``"unirobust.attacks.pgd:PGD"``) so that listing names or
validating a recipe never imports heavy libraries. An unknown name raises ``UnknownName`` whose
message lists the valid ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class UnknownName(KeyError):
    """A name that is not registered; ``str()`` lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0])


class Registry:
    """A named table of builders (callables or lazy ``"module:attr"`` strings)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable | str] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, target: Callable | str | None = None, doc: str = ""):
        """Register ``target`` under ``name``; usable as a decorator when ``target`` is omitted."""

        def add(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._docs[name] = doc
            return obj

        return add if target is None else add(target)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")

    def check(self, name: str) -> None:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")

    def get(self, name: str) -> Callable:
        self.check(name)
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise UnknownName(f"{self.kind} {name!r} is registered but cannot be loaded ({err}); "
                                  f"is an optional dependency missing?") from err
            self._entries[name] = target
        return target

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


ATTACKS = Registry("attack")
DEFENSES = Registry("defense")
MODELS = Registry("model source")  # prefix of a model spec: "timm:resnet18", "hf:roberta-base"
LOADERS = Registry("data loader")

ATTACKS.register("fgsm", "unirobust.attacks.pgd:FGSM", "one signed-gradient step (Goodfellow et al. 2015)")
ATTACKS.register("pgd", "unirobust.attacks.pgd:PGD", "projected gradient descent, Linf/L2, restarts (Madry et al. 2018)")

ATTACKS.register("apgd-ce", "unirobust.attacks.apgd:APGDCE", "APGD with cross-entropy (Croce & Hein 2020)")
ATTACKS.register("apgd-dlr", "unirobust.attacks.apgd:APGDDLR", "APGD with the DLR loss (Croce & Hein 2020)")
ATTACKS.register("alt-pgd", "unirobust.attacks.alt_pgd:AltPGD", "PGD alternating CE and margin losses")
ATTACKS.register("random-search", "unirobust.checks:RandomSearch", "gradient-free random search (Square-attack-like)")
ATTACKS.register("cw-l2", "unirobust.attacks.cw:CWL2", "Carlini-Wagner L2 (2017), projected onto the threat ball")

# word-substitution attacks (text only): presets of unirobust.attacks.text.attack:WordAttack
ATTACKS.register("word", "unirobust.attacks.text.attack:WordAttack", "configurable word-substitution attack")
ATTACKS.register("pwws", "unirobust.attacks.text.recipes:pwws", "PWWS: WordNet synonyms, saliency-weighted (Ren et al. 2019)")
ATTACKS.register("textfooler", "unirobust.attacks.text.recipes:textfooler",
                 "TextFooler, offline: counter-fitted embedding neighbours + MiniLM similarity (Jin et al. 2020)")
ATTACKS.register("deepwordbug", "unirobust.attacks.text.recipes:deepwordbug", "DeepWordBug: character edits (Gao et al. 2018)")
ATTACKS.register("bae", "unirobust.attacks.text.recipes:bae", "BAE-R: masked-LM replacements (Garg & Ramakrishnan 2020); needs mlm=")
ATTACKS.register("bert-attack", "unirobust.attacks.text.recipes:bert_attack", "BERT-Attack (Li et al. 2020); needs mlm=")
ATTACKS.register("a2t", "unirobust.attacks.text.recipes:a2t", "A2T: cheap gradient-ordered attack for training (Yoo & Qi 2021)")

DEFENSES.register("erm", "unirobust.defenses.erm:ERM", "standard training on clean inputs")
DEFENSES.register("pgd-at", "unirobust.defenses.pgd_at:PGDAT", "PGD adversarial training (Madry et al. 2018)")

DEFENSES.register("trades", "unirobust.defenses.trades:TRADES", "TRADES: CE + beta KL(clean || adv) (Zhang et al. 2019)")
DEFENSES.register("mart", "unirobust.defenses.mart:MART", "MART: misclassification-aware AT (Wang et al. 2020)")
DEFENSES.register("fat", "unirobust.defenses.fat:FAT", "friendly AT: early-stopped PGD (Zhang et al. 2020)")
DEFENSES.register("fgsm-at", "unirobust.defenses.fgsm_at:FGSMAT", "FGSM-AT with random start + CO guard")
DEFENSES.register("free-at", "unirobust.defenses.free_at:FreeAT", "Free-AT: minibatch replay (Shafahi et al. 2019)")
DEFENSES.register("freelb", "unirobust.defenses.freelb:FreeLB", "FreeLB: accumulated ascent steps (Zhu et al. 2020)")
DEFENSES.register("embedding-at", "unirobust.defenses.embedding_at:EmbeddingAT", "C-AdvUL-style continuous AT")
DEFENSES.register("discrete-at", "unirobust.defenses.discrete_at:DiscreteAT",
                  "A2T-style training on word-substitution adversarial examples (Yoo & Qi 2021)")
DEFENSES.register("iat", "unirobust.defenses.iat:IAT", "interpolated AT: mixup of clean and adv (Lamb et al. 2019)")

MODELS.register("timm", "unirobust.models.vision:build_timm",
                "timm.create_model(<arch>), pretrained=False offline; head: classifier | prompt (visual prompting)")
MODELS.register("hf", "unirobust.models.text:build_hf",
                "Hugging Face model (<id or path>); head: classifier | prompt (MVP template + verbalizer)")

LOADERS.register("hub", "unirobust.tasks:load_hub", "datasets.load_dataset(path, name)")
LOADERS.register("local", "unirobust.tasks:load_local", "local csv / tsv / json / jsonl files, one per split")
LOADERS.register("npz", "unirobust.tasks:load_npz", "numpy .npz arrays (images, labels)")
LOADERS.register("imagefolder", "unirobust.tasks:load_imagefolder", "image files in class folders (<folder>/<label>/*.png)")
LOADERS.register("sklearn", "unirobust.tasks:load_sklearn", "a dataset bundled with scikit-learn (load_digits, ...)")
LOADERS.register("advglue", "unirobust.advglue:load_advglue_task", "AdvGLUE: hub adv_glue or a release-format JSON file")
LOADERS.register("package", "unirobust.tasks:load_package", "data files bundled inside unirobust (offline default)")

# ensembles / transfer (issue 5)
ATTACKS.register("mi-fgsm", "unirobust.attacks.transfer:MIFGSM", "momentum iterative FGSM (Dong et al. 2018)")
ATTACKS.register("di-fgsm", "unirobust.attacks.transfer:DIMIFGSM", "MI-FGSM + input diversity, vision (Xie et al. 2019)")
ATTACKS.register("cwa", "unirobust.attacks.transfer:CWA", "Common Weakness Attack over ensemble members (Chen et al. 2024)")
DEFENSES.register("dverge", "unirobust.defenses.dverge:DVERGE", "DVERGE: cross-member feature distillation (Yang et al. 2020)")
DEFENSES.register("ensemble-erm", "unirobust.defenses.diversity:EnsembleERM", "independently trained ensemble members")
DEFENSES.register("adp", "unirobust.defenses.diversity:ADP", "ADP ensemble diversity (Pang et al. 2019)")
DEFENSES.register("gal", "unirobust.defenses.diversity:GAL", "GAL: misaligned member gradients (Kariyappa & Qureshi 2019)")
