"""Evaluation: clean accuracy and a per-example worst-case cascade over continuous attacks.

Each attack runs only on the examples still unbroken after the previous ones (AutoAttack's
cascade), so the final robust accuracy is the per-example worst case over the list, and the cost
falls as the list goes on. Flags are gathered across processes with ``gather_for_metrics``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import attack_parameters, split_word_attacks
from .models.base import batch_to, device_of, eval_mode

log = logging.getLogger(__name__)


def select(batch: dict, idx: torch.Tensor) -> dict:
    """The rows ``idx`` of every tensor in a batch dict."""
    return {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def check_in_ball(adapter, attack, batch: dict, z_adv: torch.Tensor) -> None:
    """An attack's points must be finite, in its ball and in the valid set (pixels in [0, 1], special
    and padding tokens unmoved): projecting them must not move them. A point outside would make a
    robust accuracy nobody can compare (the built-in attacks all pass; this guards registered ones)."""
    if getattr(attack, "eps", None) is None or getattr(attack, "norm", None) is None:
        return
    with torch.no_grad():
        z0 = adapter.embed(batch)
        if z_adv.shape != z0.shape:
            raise RuntimeError(f"{type(attack).__name__} returned points of shape {tuple(z_adv.shape)}, "
                               f"the inputs are {tuple(z0.shape)}")
        if not torch.isfinite(z_adv).all():
            raise RuntimeError(f"{type(attack).__name__} returned non-finite points")
        moved = (adapter.project(z_adv, z0, batch, attack) - z_adv).abs().max().item()
    rounding = max(1e-4, 8 * torch.finfo(z_adv.dtype).eps)  # bf16 / fp16 points round by far more than fp32
    if moved > rounding * max(1.0, z0.abs().max().item()):
        raise RuntimeError(f"{type(attack).__name__} returned points outside its ball ({attack.norm}, eps "
                           f"{attack.eps:g}) or the valid input set: projecting them moves them by up to {moved:.3g}")


def cascade(adapter, batch: dict, attacks: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct-after-each-stage flags, S+1 x B (stage 0 = clean), and the predictions."""
    with eval_mode(adapter):
        return _cascade(adapter, batch, attacks)


def _cascade(adapter, batch: dict, attacks: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    classes = getattr(adapter, "num_classes", None)
    if len(labels) and (int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= classes)):
        raise ValueError(f"labels must be class indices 0..{classes - 1 if classes else '?'}, found "
                         f"{int(labels.min())}..{int(labels.max())}")
    with torch.no_grad():
        pred = adapter.logits(adapter.embed(batch), batch).argmax(-1)
    robust = pred == labels
    stages = [robust.clone()]
    for attack in attacks:
        idx = robust.nonzero().squeeze(-1)
        if len(idx):
            sub = select(batch, idx)
            z_adv = attack(adapter, sub)
            check_in_ball(adapter, attack, sub, z_adv)
            with torch.no_grad():
                robust[idx] = adapter.logits(z_adv, sub).argmax(-1) == sub["labels"]
        stages.append(robust.clone())
    return torch.stack(stages), pred


def numbered(titled) -> dict:
    """``(title, item)`` pairs -> an ordered dict; a title given twice (the same attack twice, e.g. two
    random-start runs) is numbered ``<title> #2`` instead of replacing the first."""
    out = {}
    for title, item in titled:
        key, n = title, 2
        while key in out:
            key, n = f"{title} #{n}", n + 1
        out[key] = item
    return out


class OneProcess:
    """What :func:`evaluate` needs of an ``Accelerator``, for one process on ``device``: batches moved
    there, nothing gathered, no accelerate state created or changed."""

    num_processes, process_index = 1, 0
    is_main_process = is_local_main_process = True

    def __init__(self, device: torch.device):
        self.device = device

    def unwrap_model(self, model):
        return model

    def gather_for_metrics(self, tensors):
        return tensors

    def wait_for_everyone(self) -> None:
        pass

    def prepare_data_loader(self, loader):
        return _OnDevice(loader, self.device)


class _OnDevice:
    """A data loader whose batches (dicts of tensors) are moved to ``device``."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch_to(batch, self.device)


def evaluate(adapter, dataset, attacks: dict[str, object] | Sequence, accelerator=None, batch_size: int = 64,
             class_names: Sequence[str] | None = None, desc: str = "eval", threat=None,
             check_examples: int = 32, out_dir=None) -> dict:
    """Clean and cascaded robust accuracy of ``adapter`` on ``dataset``, overall and per class.

    With a ``threat`` model and ``check_examples`` > 0, the gradient-masking sanity checks of
    ``checks.py`` run on the first examples and their warnings land in ``metrics["warnings"]``.
    Word-substitution attacks (``kind == "word"``) are a different threat model, so they are not in
    the cascade: each attacks the first ``n`` examples on its own, its per-example results go to
    ``out_dir/attacks/<name>/`` (resumable) and its summary to ``metrics["word_attacks"][name]``.
    The model is evaluated in eval mode throughout (its mode is restored after).

    From Python: ``dataset`` holds task-format examples (``{"image" | text fields, "label"}``, as
    ``load_task`` gives them; ``adapter.collate`` batches them); ``attacks`` is ``{title: attack}``
    or a list (titled by class name); without an ``accelerator`` it runs in this one process on the
    model's device, creating no accelerate state (a caller's own, e.g. its precision or gradient
    accumulation, stays as it is).
    Random starts draw from torch's global generator: call ``accelerate.utils.set_seed(seed)`` first
    for the figures the CLI gives (it seeds with the recipe's ``seed``)."""
    if accelerator is None:
        accelerator = OneProcess(device_of(adapter))
    if not isinstance(attacks, dict):
        attacks = numbered((type(attack).__name__, attack) for attack in attacks)
    model = accelerator.unwrap_model(adapter)
    with eval_mode(model):
        parameters = {title: attack_parameters(a) for title, a in attacks.items()}
        attacks, word = split_word_attacks(attacks)
        loader = accelerator.prepare_data_loader(
            DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate))
        names = list(attacks)
        flags, labels, preds = [], [], []
        start = time.time()
        first = None
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True):
            first = batch if first is None else first
            stages, pred = cascade(model, batch, list(attacks.values()))
            stages, y, pred = accelerator.gather_for_metrics((stages.T.contiguous(), batch["labels"], pred))
            flags.append(stages.cpu())
            labels.append(y.cpu())
            preds.append(pred.cpu())
        flags = torch.cat(flags).float() if flags else torch.zeros(0, len(names) + 1)
        labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        metrics = summarise(flags, labels, names, class_names, time.time() - start)
        metrics["attacks"] = parameters
        one_class = one_class_warning(torch.cat(preds) if preds else labels, labels, class_names)
        if one_class:
            log.warning(one_class)
            metrics["prediction_warning"] = one_class
        if threat is not None and check_examples and first is not None and accelerator.is_main_process:
            from .checks import run_checks

            start = time.time()
            sample = select(first, torch.arange(min(check_examples, len(first["labels"]))))
            log.info("gradient-masking checks on %d examples (eval.check_examples; 0 = off) ...", len(sample["labels"]))
            metrics["warnings"] = run_checks(model, sample, threat)
            if one_class and metrics["warnings"]:  # a constant model fails them for its own reason
                metrics["warnings"].insert(0, "the model gives one class to almost every example (see the "
                                              "prediction warning): the checks below measure that, not masked "
                                              "gradients")
            metrics["checks_seconds"] = time.time() - start
        elif threat is not None and not check_examples:
            metrics["checks_off"] = True
        if word:
            metrics["word_attacks"] = run_word_attacks(model, dataset, word, accelerator, out_dir)
        return metrics


def run_word_attacks(adapter, dataset, attacks: dict, accelerator, out_dir=None) -> dict:
    """Summary per word attack on the first ``attack.n`` examples of ``dataset`` (all if unset)."""
    import tempfile
    from pathlib import Path

    from .attacks.text.attack import run_word_attack

    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="unirobust-attacks-"))
    out = {}
    for name, attack in attacks.items():
        n = min(attack.n or len(dataset), len(dataset))
        if attack.n and attack.n > len(dataset):
            log.warning("%s: n=%d, but the evaluation has %d examples: all %d are attacked", name, attack.n,
                        len(dataset), len(dataset))
        examples = [dict(dataset[i]) for i in range(n)]
        out[name] = run_word_attack(adapter, examples, attack, root / "attacks" / slug(name), accelerator,
                                    progress=accelerator.is_local_main_process)
        log.info("%s: accuracy under attack %.4f, success rate %s on %d examples", name,
                 out[name]["accuracy_under_attack"] or 0.0, out[name]["attack_success_rate"], n)
    return out


def slug(text: str) -> str:
    """``text`` as one safe folder name (an attack's title, a model id, a path inside an attack spec)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "_"


def one_class_warning(preds: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None = None,
                      share: float = 0.95) -> str | None:
    """A sentence when the model gives one class to at least ``share`` of 20 or more examples whose
    labels are not that one-sided: a collapsed model (common in adversarial training at small scale)
    whose robust accuracy is that class's share of the data, not robustness."""
    n = len(preds)
    if n < 20:
        return None
    counts = torch.bincount(preds)
    top = int(counts.argmax())
    count = int(counts[top])
    label_share = float((labels == top).float().mean())
    if count / n < share or label_share >= share:
        return None
    name = class_names[top] if class_names and top < len(class_names) else str(top)
    return (f"the model predicts {name!r} for {count} of {n} clean examples ({100 * count / n:.0f}%; the class is "
            f"{100 * label_share:.0f}% of them): a one-class model, whose robust accuracy is that class's share, "
            f"not robustness")


def summarise(flags: torch.Tensor, labels: torch.Tensor, attack_names: list[str],
              class_names: Sequence[str] | None, seconds: float) -> dict:
    """Metrics from N x (S+1) correct flags (column 0 clean, column s after attack s)."""
    n = len(labels)
    acc = flags.mean(0).tolist() if n else [float("nan")] * flags.shape[1]
    classes = class_names or [str(c) for c in range(int(labels.max()) + 1 if n else 0)]
    per_class = {}
    for c, cname in enumerate(classes):
        rows = flags[labels == c]
        if len(rows):
            per_class[cname] = {"n": len(rows), "clean_accuracy": rows[:, 0].mean().item(),
                                "robust_accuracy": rows[:, -1].mean().item()}
    robust = [v["robust_accuracy"] for v in per_class.values()]
    return {
        "n": n,
        "clean_accuracy": acc[0],
        "robust_accuracy": acc[-1],
        "cascade": [{"attack": a, "robust_accuracy": r} for a, r in zip(attack_names, acc[1:])],
        "per_class": per_class,
        "worst_class_robust_accuracy": min(robust) if robust else None,
        "class_robust_spread": (max(robust) - min(robust)) if robust else None,
        "seconds": seconds,
    }
