"""Run any TextAttack recipe on a unirobust text adapter, with results in unirobust's format.

TextAttack (Morris et al. 2020, https://github.com/QData/TextAttack) is the reference implementation
of word- and character-substitution attacks. This bridge lets a user run one of its recipes on a
:class:`~unirobust.models.text.TextAdapter` (or the prompt adapter) and get the same per-example
:class:`~unirobust.attacks.text.results.AttackRecord` rows as unirobust's own engine:

    wrapper = AdapterWrapper(adapter)                         # the victim, as TextAttack sees it
    attack = build_textattack_attack("pwws", wrapper)         # any name of textattack_recipe_names()
    records = run_textattack(adapter, examples, attack, store=ResultStore(folder))

Where it departs from TextAttack's own path:

* :class:`AdapterWrapper` pads every query batch to its longest member (``adapter.tokenize``), not to
  the tokenizer maximum as ``HuggingFaceModelWrapper`` does (512 for most models: about 12x slower);
* ``get_grad`` keeps the model in eval mode (``HuggingFaceModelWrapper.get_grad`` switches to train
  mode, so its word importances include dropout noise);
* examples are attacked one at a time, as TextAttack's ``Attack.attack`` does; unirobust's engine
  (``unirobust.attacks.text``) batches across examples and is the fast path.

Many recipes load resources at construction time (counter-fitted embeddings, the Universal Sentence
Encoder, hub masked LMs, flair taggers); offline they fail, and :func:`build_textattack_attack`
turns that failure into a :class:`RuntimeError` that names the resource. Nothing here imports
textattack at module import time.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

from ...models.base import eval_mode
from .results import AttackRecord, ResultStore, int_or_none

if TYPE_CHECKING:  # pragma: no cover
    import textattack

log = logging.getLogger(__name__)

#: Exceptions that, raised while a recipe is built or run, mean "a resource could not be loaded".
_RESOURCE_ERRORS = (OSError, LookupError, ImportError)


def _textattack():
    """``textattack``, imported offline-safely (torchvision shim, NLTK data, no post-install downloads)."""
    from ...compat import ensure_torchvision
    from ...offline import ensure_textattack_ready

    ensure_torchvision()
    return ensure_textattack_ready()


def _model_wrapper_base():
    _textattack()
    from textattack.models.wrappers import ModelWrapper

    return ModelWrapper


def _device(adapter):
    try:
        return next(adapter.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


# ----------------------------------------------------------------------------- the wrapper


def _wrapper_class():
    """The :class:`AdapterWrapper` class, created on first use (its base class lives in textattack)."""
    global _WRAPPER_CLS
    if _WRAPPER_CLS is not None:
        return _WRAPPER_CLS
    ModelWrapper = _model_wrapper_base()

    class AdapterWrapper(ModelWrapper):
        __doc__ = _WRAPPER_DOC

        def __init__(self, adapter, batch_size: int = 64):
            self.adapter = adapter
            self.model = adapter.model          # TextAttack checks its class and reads ``model.config``
            self.tokenizer = adapter.tokenizer
            self.batch_size = int(batch_size)
            # A2T bounds its word importance ranking by ``max_length`` when the wrapper has one
            self.max_length = getattr(adapter, "max_length", None)

        def to(self, device):
            self.adapter.to(device)
            return self

        def _batch(self, inputs: Sequence) -> dict:
            device = _device(self.adapter)
            return {k: v.to(device) for k, v in self.adapter.tokenize(list(inputs)).items()}

        def __call__(self, text_input_list, **kwargs):
            """N x C float64 softmax probabilities of ``text_input_list`` (strings, or tuples for
            multi-column inputs), in batches of ``batch_size`` padded to their longest member."""
            import torch

            inputs = [x if isinstance(x, str) else tuple(x) for x in text_input_list]
            out = []
            with torch.no_grad(), eval_mode(self.adapter):
                for i in range(0, len(inputs), self.batch_size):
                    batch = self._batch(inputs[i:i + self.batch_size])
                    logits = self.adapter.logits(self.adapter.embed(batch), batch)
                    # float64: TextAttack re-applies softmax to rows that do not sum to 1 within 1e-6
                    out.append(torch.softmax(logits.double(), dim=-1).cpu())
            if not out:
                return torch.empty(0, getattr(self.adapter, "num_classes", 2), dtype=torch.float64)
            return torch.cat(out)

        def _positions(self, batch: dict):
            """Token positions of example 0 that belong to the input (no padding, no prompt template)."""
            keep = batch["attention_mask"][0].bool()
            if "input_token_mask" in batch:  # prompt adapter: template and mask tokens are not words
                keep = keep & batch["input_token_mask"][0].bool()
            return keep

        def get_grad(self, text_input):
            """Gradient of the cross-entropy (against the predicted class) w.r.t. the input token
            embeddings: ``{"ids": 1 x T LongTensor, "gradient": T x D numpy array}``, the format of
            ``HuggingFaceModelWrapper.get_grad``; rows are the tokens of ``_tokenize([text_input])``."""
            import torch

            x = text_input if isinstance(text_input, str) else tuple(text_input)
            with eval_mode(self.adapter):
                batch = self._batch([x])
                z = self.adapter.embed(batch).detach().requires_grad_(True)
                logits = self.adapter.logits(z, batch)
                loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1).detach())
                (grad,) = torch.autograd.grad(loss, z)
            keep = self._positions(batch).cpu()
            ids = batch["input_ids"][0].cpu()[keep]
            return {"ids": ids.unsqueeze(0), "gradient": grad[0].cpu()[keep].numpy()}

        def _tokenize(self, inputs):
            """Per input, the model's tokens (as strings) in the order the model sees them."""
            out = []
            for x in inputs:
                batch = self.adapter.tokenize([x if isinstance(x, str) else tuple(x)])
                ids = batch["input_ids"][0][self._positions(batch)]
                out.append(self.tokenizer.convert_ids_to_tokens(ids.tolist()))
            return out

    AdapterWrapper.__module__ = __name__
    AdapterWrapper.__qualname__ = "AdapterWrapper"
    _WRAPPER_CLS = AdapterWrapper
    return AdapterWrapper


_WRAPPER_CLS = None
_WRAPPER_DOC = """A unirobust text adapter as a ``textattack.models.wrappers.ModelWrapper``.

``adapter``: anything with ``tokenize``, ``embed``, ``logits``, ``model``, ``tokenizer`` and
``text_fields`` (a :class:`~unirobust.models.text.TextAdapter` or the prompt adapter).
``__call__(text_input_list)`` returns softmax probabilities (a float64 tensor, N x C) computed in eval
mode under ``torch.no_grad`` in batches of ``batch_size``, each padded to its longest member;
``get_grad`` and ``_tokenize`` serve gradient-based recipes (A2T) and TextAttack's word-to-token
alignment."""


def __getattr__(name: str):
    """``AdapterWrapper`` is built on first access (its base class lives in textattack), so
    ``import unirobust.attacks.text.bridge`` stays light; ``from ... import AdapterWrapper`` imports
    textattack (offline-safely)."""
    if name == "AdapterWrapper":
        return _wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- recipes


def _recipe_table() -> dict[str, str]:
    _textattack()
    from textattack.attack_args import ATTACK_RECIPE_NAMES

    return dict(ATTACK_RECIPE_NAMES)


def textattack_recipe_names() -> list[str]:
    """TextAttack's recipe names as its CLI spells them (``pwws``, ``textfooler``, ``deepwordbug``, ...)."""
    return sorted(_recipe_table())


def _resource_hint(err: BaseException) -> str:
    """The resource an exception chain is about: the URL a download tried, a missing file, a missing
    package, else the first line of the message."""
    chain, seen, e = [], set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(f"{type(x).__name__}: {x}" for x in chain)
    # requests / urllib3: HTTPSConnectionPool(host='textattack.s3.amazonaws.com', ...) ... url: /word_embeddings/...
    pool = re.search(r"host=\\?'([^'\\]+)\\?'.*?url: (/[^\s'\"()]*)", text, re.S)
    if pool:
        return f"https://{pool.group(1)}{pool.group(2)}"
    for x in chain:
        if isinstance(x, FileNotFoundError) and x.filename:
            return str(x.filename)
        if isinstance(x, ModuleNotFoundError) and x.name:
            return f"the python package {x.name!r}"
    url = re.search(r"https?://[^\s'\")]+", text)
    if url:
        return url.group(0)
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


def _offline_error(what: str, err: BaseException) -> RuntimeError:
    resource = _resource_hint(err)
    first = str(err).splitlines()[0][:160] if str(err) else ""
    return RuntimeError(
        f"{what} needs a resource that could not be loaded: {resource} "
        f"({type(err).__name__}{': ' + first if first else ''}). This recipe needs network access, or the "
        f"resource already present locally (TextAttack's cache ~/.cache/textattack or $TA_CACHE_DIR, the "
        f"Hugging Face cache, NLTK data). unirobust's own engine (unirobust.attacks.text) has offline "
        f"equivalents of the common components.")


def build_textattack_attack(name: str, wrapper, query_budget: int | None = None,
                            **recipe_kwargs) -> "textattack.Attack":
    """Build TextAttack recipe ``name`` (a name of :func:`textattack_recipe_names`) against ``wrapper``.

    ``wrapper``: an :class:`AdapterWrapper` (a bare adapter is wrapped with the default batch size).
    ``query_budget``: the most model queries per example (TextAttack's goal-function budget; ``None``
    = unlimited). The goal function's batch size is set to ``wrapper.batch_size``. ``recipe_kwargs``
    go to the recipe's ``build`` (e.g. ``mlm=True`` for ``a2t``; ``bad-characters`` requires
    ``goal_function_type``).

    Raises ``ValueError`` listing the valid names for an unknown ``name``, and ``RuntimeError`` naming
    the resource when building the recipe fails to load one (a download attempted offline, a missing
    optional package such as tensorflow_hub for USE).
    """
    import importlib

    table = _recipe_table()
    if name not in table:
        raise ValueError(f"unknown TextAttack recipe {name!r}; valid: {', '.join(sorted(table))}")
    if not isinstance(wrapper, _model_wrapper_base()):
        wrapper = _wrapper_class()(wrapper)
    module, _, cls_name = table[name].rpartition(".")
    recipe = getattr(importlib.import_module(module), cls_name)
    try:
        attack = recipe.build(wrapper, **recipe_kwargs)
    except TypeError as err:
        if "argument" in str(err) and "build()" in str(err):
            raise ValueError(f"TextAttack recipe {name!r}: {err}; pass its options as keyword arguments of "
                             f"build_textattack_attack") from err
        raise
    except _RESOURCE_ERRORS as err:
        raise _offline_error(f"TextAttack recipe {name!r} ({cls_name})", err) from err
    except Exception as err:  # requests' ConnectionError is an OSError; others (e.g. from hub clients) are not
        if re.search(r"connect|resolve|download|offline|network|timed? ?out|hub", str(err), re.I):
            raise _offline_error(f"TextAttack recipe {name!r} ({cls_name})", err) from err
        raise
    if query_budget is not None:
        attack.goal_function.query_budget = int(query_budget)
    attack.goal_function.batch_size = getattr(wrapper, "batch_size", attack.goal_function.batch_size)
    return attack


# ----------------------------------------------------------------------------- running


def _check_example(example: dict, fields: list[str], num_classes: int | None) -> str:
    """Why ``example`` cannot be attacked ("" if it can)."""
    for f in fields:
        if f not in example:
            return f"missing text field {f!r}"
        if not isinstance(example[f], str) or not example[f].strip():
            return f"empty text in field {f!r}"
    label = example.get("label")
    try:
        ok = label is not None and int(label) == label and (num_classes is None or 0 <= int(label) < num_classes)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return f"label {label!r} outside 0..{num_classes - 1}" if num_classes else f"bad label {label!r}"
    return ""


def _to_record(index: int, result, fields: list[str], field: str | None, example: dict, seconds: float) -> AttackRecord:
    """One TextAttack ``AttackResult`` as an :class:`AttackRecord` (see :func:`run_textattack`)."""
    from textattack.attack_results import (FailedAttackResult, MaximizedAttackResult, SkippedAttackResult,
                                           SuccessfulAttackResult)

    label = int(example["label"])
    before, after = result.original_result, result.perturbed_result
    orig_text, adv_text = before.attacked_text, after.attacked_text
    orig_cols = list(orig_text._text_input.values())
    adv_cols = list(adv_text._text_input.values())
    changed = [i for i, (a, b) in enumerate(zip(orig_cols, adv_cols)) if a != b]
    if field is not None:
        col = fields.index(field)
    else:
        col = changed[-1] if changed else len(fields) - 1
    name = fields[col]

    # word counts per column (TextAttack's words of the joined text are the columns' words in order)
    orig_words = orig_text.words_per_input
    adv_words = adv_text.words_per_input
    modified = adv_text.attack_attrs.get("modified_indices")
    if modified is not None:
        starts, s = [], 0
        for w in adv_words:
            starts.append(s)
            s += len(w)
        lo, hi = starts[col], starts[col] + len(adv_words[col])
        n_changed = sum(lo <= i < hi for i in modified)
    else:
        n_changed = sum(a != b for a, b in zip(orig_words[col], adv_words[col]))
    n_total = len(orig_words[col])

    if isinstance(result, SkippedAttackResult):
        status = "skipped"
    elif isinstance(result, SuccessfulAttackResult):
        status = "success"
    elif isinstance(result, MaximizedAttackResult):
        status = "success" if int(after.output) != label else "failed"
    elif isinstance(result, FailedAttackResult):
        status = "failed"
    else:  # pragma: no cover - a new TextAttack result type
        status = "failed"

    context = {f: example[f] for f in fields if f != name}
    message = ""
    others = [fields[i] for i in changed if i != col]
    if others:
        context.update({f: adv_cols[fields.index(f)] for f in others})
        message = f"the attack also changed {', '.join(others)} (its perturbed text is in context)"
    return AttackRecord(
        index=index, status=status, original=orig_cols[col],
        adversarial=None if status == "skipped" else adv_cols[col],
        label=label, pred_before=int(before.output), pred_after=int(after.output),
        queries=int(result.num_queries), words_changed=0 if status == "skipped" else int(n_changed),
        words_total=n_total, seconds=seconds, field=name, context=context, message=message,
        idx=int_or_none(example.get("idx")))


@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, NumPy's and torch's global generators (TextAttack draws from them: DeepWordBug's
    character edits use ``np.random``) for the block, and restore their previous states after."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def run_textattack(adapter, examples: list[dict], attack, store: ResultStore | None = None,
                   field: str | None = None, progress: bool = True, seed: int | None = 0) -> list[AttackRecord]:
    """Run a built ``textattack.Attack`` on each example, one at a time; one record per example.

    ``adapter``: the victim (the adapter ``attack`` was built on). ``examples``: dicts holding the
    adapter's ``text_fields`` and ``"label"``; record ``index`` is the position in this list.
    ``attack``: from :func:`build_textattack_attack` (or any ``textattack.Attack`` on an
    :class:`AdapterWrapper` of ``adapter``). ``store``: when given, examples already in
    ``store.finished()`` are skipped (not re-run, not returned) and this process's share
    (``store.todo``) is attacked, each record appended as soon as it ends. ``field``: the text field
    recorded as original / adversarial; by default the one the attack changed (for pairs TextAttack may
    perturb either column), else the last field.

    Status: ``success`` / ``failed`` (the attack did not flip the prediction; ``adversarial`` is the
    text TextAttack ended with) / ``skipped`` (the model was already wrong) / ``error`` (empty text or
    a label outside ``0..num_classes-1``, or TextAttack raised on this example: ``message`` says why).
    ``queries`` is TextAttack's ``num_queries``, ``words_changed`` the number of modified word indices
    in the recorded field, ``words_total`` its word count (TextAttack's word splitting), ``seconds``
    the wall time of this example. Raises ``RuntimeError`` if the attack needs a resource it cannot
    load (e.g. NLTK's POS tagger offline), since every example would fail the same way.

    ``seed``: example ``i`` runs with the global generators seeded to ``seed + i`` (states restored
    after), so random attacks give the same record for an example whichever process or resumed run
    attacks it; ``None`` leaves the generators alone.
    """
    from tqdm.auto import tqdm

    _textattack()
    fields = list(adapter.text_fields)
    if field is not None and field not in fields:
        raise ValueError(f"field {field!r} is not one of the adapter's text fields {fields}")
    num_classes = getattr(adapter, "num_classes", None)
    todo = store.todo(len(examples)) if store is not None else list(range(len(examples)))
    records: list[AttackRecord] = []
    with eval_mode(adapter):
        for i in tqdm(todo, desc="textattack", disable=not progress, dynamic_ncols=True):
            ex = examples[i]
            problem = _check_example(ex, fields, num_classes)
            start = time.perf_counter()
            if problem:
                rec = _error_record(i, ex, fields, field, problem)
            else:
                payload = OrderedDict((f, ex[f]) for f in fields)
                try:
                    with seeded(seed + i) if seed is not None else contextlib.nullcontext():
                        result = attack.attack(payload if len(fields) > 1 else ex[fields[0]], int(ex["label"]))
                except _RESOURCE_ERRORS as err:
                    raise _offline_error(f"the TextAttack attack (example {i})", err) from err
                except Exception as err:  # noqa: BLE001 - one bad example must not end the run
                    log.warning("example %d: TextAttack raised %s: %s", i, type(err).__name__, err)
                    rec = _error_record(i, ex, fields, field, f"TextAttack raised {type(err).__name__}: {err}")
                else:
                    rec = _to_record(i, result, fields, field, ex, time.perf_counter() - start)
            rec.seconds = rec.seconds or time.perf_counter() - start
            if store is not None:
                store.append(rec)
            records.append(rec)
    return records


def _error_record(index: int, example: dict, fields: list[str], field: str | None, message: str) -> AttackRecord:
    name = field or fields[-1]
    text = example.get(name)
    label = int_or_none(example.get("label"))
    return AttackRecord(index=index, status="error", original=text if isinstance(text, str) else str(text or ""),
                        label=label, field=name, message=message,
                        context={f: example.get(f) for f in fields if f != name},
                        idx=int_or_none(example.get("idx")))


__all__ = ["AdapterWrapper", "build_textattack_attack", "run_textattack", "textattack_recipe_names"]
