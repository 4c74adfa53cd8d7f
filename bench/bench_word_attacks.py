"""Word-substitution attacks: unirobust's engine against TextAttack on the same victim and examples (issue 6).

    python bench/bench_word_attacks.py [--run runs/sst2_minilm_victim] [--n 100] [--hf64]
        [--attacks pwws,deepwordbug,textfooler-like,...] [--side textattack|unirobust|both] [--threads N]

The victim is a finished run folder (default: ``unirobust run recipes/bench/sst2_minilm_victim.yaml``,
all-MiniLM-L6-v2 fine-tuned on the bundled SST-2 sample). The examples are the first ``--n`` GLUE-dev
sentences it classifies correctly. For each attack, TextAttack (0.3.11, one example at a time) runs
first, then unirobust's engine, on the same adapter and the same examples. TextAttack queries the
victim through :class:`unirobust.attacks.text.bridge.AdapterWrapper`, which pads each query batch to
its longest member as unirobust's engine does (side ``textattack``), and with ``--hf64`` also through
its own ``HuggingFaceModelWrapper`` with the tokenizer's ``model_max_length`` at 64, so every query is
padded to 64 tokens (side ``textattack-hf64``: the issue's "tuned" baseline; by default that wrapper
pads to 512).

Attacks (all offline):

- ``pwws``: TextAttack ``PWWSRen2019`` (WordNet from the offline copy) / unirobust ``{"name": "pwws"}``;
- ``deepwordbug``: TextAttack ``DeepWordBugGao2018`` / unirobust ``{"name": "deepwordbug"}``;
- ``textfooler-like``: TextFooler (Jin et al. 2020) with offline components instead of its downloads:
  ``WordSwapEmbedding(max_candidates=50)`` over an embedding built from the victim's own input
  embeddings restricted to whole words (vocabulary entries ``w`` with ``w.isalpha()``, not ``##``
  pieces, not special tokens; neighbours and ``WordEmbeddingDistance(min_cos_sim=0.5)`` by cosine on the
  raw rows) instead of counter-fitted GloVe; the packaged all-MiniLM-L6-v2 (mean pooling) as the
  sentence encoder instead of USE, with TextFooler's settings (threshold 0.840845057, angular,
  compare_against_original=False, window 15, skip shorter texts); no part-of-speech constraint (flair /
  NLTK taggers download); ``RepeatModification``, ``StopwordModification`` (NLTK's English list),
  ``UntargetedClassification``, ``GreedyWordSwapWIR(wir_method="delete")``. unirobust:
  ``{"name": "textfooler", "counterfit": False, "pos": False, "antonyms": True}``.

unirobust-only rows: ``pwws-fast`` / ``deepwordbug-fast`` (``wir: gradient``: one backward pass
instead of one query per word), ``deepwordbug-probe`` (``wir: candidate``: each word ranked by its
own first candidate) and ``textfooler`` (the offline TextFooler: counter-fitted embeddings, WordNet
POS; TextAttack's own recipe needs downloads). ``--procs 1,2`` adds rows ``unirobust-2proc``: the
examples sharded over two processes of one thread each. Counter-fitting (once per model,
cached) and loading the sentence encoder count as setup on both sides, not attack time.

Per side it prints examples/s, seconds/example, queries/example (over attacked examples), attack
success rate, words perturbed (mean fraction over successes, as TextAttack reports it) and the fraction
of wall time spent in victim forward passes; successes are re-checked by predicting the adversarial
text. Results go to bench/results/word_attacks.json (rows of sides / attacks not re-run are kept, so
``--side unirobust`` later adds to a ``--side textattack`` run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from unirobust.compat import ensure_torchvision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("pwws", "deepwordbug", "textfooler-like", "pwws-fast", "deepwordbug-fast", "deepwordbug-probe",
           "textfooler")
#: Rows only unirobust has: gradient word importance (one backward pass instead of a query per
#: word) and the offline TextFooler with counter-fitted embeddings (TextAttack's needs a download).
UNIROBUST_ONLY = ("pwws-fast", "deepwordbug-fast", "deepwordbug-probe", "textfooler")
UNIROBUST_SPECS = {
    "pwws": {"name": "pwws"},
    "deepwordbug": {"name": "deepwordbug"},
    # the TextAttack configuration's components exactly: raw embeddings, no POS, antonyms kept
    "textfooler-like": {"name": "textfooler", "counterfit": False, "pos": False, "antonyms": True},
    "pwws-fast": {"name": "pwws", "wir": "gradient"},
    "deepwordbug-fast": {"name": "deepwordbug", "wir": "gradient"},
    "deepwordbug-probe": {"name": "deepwordbug", "wir": "candidate"},
    "textfooler": {"name": "textfooler"},
}
#: Side name of TextAttack through its own HuggingFaceModelWrapper, every query padded to 64 tokens.
TEXTATTACK_HF64 = "textattack-hf64"
#: Measured by the issue author (TextAttack 0.3.11, this victim setup, 100 examples, tuned padding).
REFERENCE = {
    "pwws": {"seconds_per_example": 0.91, "queries_per_example": 116, "success_rate": 0.93, "words_perturbed": 0.127},
    "deepwordbug": {"seconds_per_example": 0.24, "queries_per_example": 24, "success_rate": 0.87},
    "textfooler-like": {"seconds_per_example": 0.38, "queries_per_example": 23, "success_rate": 0.25},
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- victim and examples


def load_victim(run: Path):
    from unirobust.runs import load_run
    from unirobust.tasks import load_task

    recipe, adapter = load_run(run)
    adapter.eval()
    data = load_task(recipe.resolved_task, seed=recipe.seed)
    return recipe, adapter, data.test


def dev_accuracy(run: Path, adapter, dev) -> float:
    metrics = run / "metrics.json"
    if metrics.exists():
        acc = json.loads(metrics.read_text()).get("eval", {}).get("clean_accuracy")
        if acc is not None:
            return float(acc)
    field = adapter.text_fields[0]
    preds = adapter.predict([dev[i][field] for i in range(len(dev))])
    return (preds == torch.tensor([int(dev[i]["label"]) for i in range(len(dev))])).float().mean().item()


def first_correct(adapter, dev, n: int, batch: int = 64) -> list[dict]:
    """The first ``n`` dev examples (in file order) the victim classifies correctly."""
    field = adapter.text_fields[0]
    out = []
    for start in range(0, len(dev), batch):
        rows = [dict(dev[i]) for i in range(start, min(start + batch, len(dev)))]
        preds = adapter.predict([r[field] for r in rows])
        out += [{field: r[field], "label": int(r["label"])} for r, p in zip(rows, preds.tolist()) if p == r["label"]]
        if len(out) >= n:
            break
    return out[:n]


# ----------------------------------------------------------------------------- TextAttack side


def whole_word_embedding(adapter):
    """A textattack ``WordEmbedding`` over the victim's input embeddings of whole-word vocabulary entries,
    with a precomputed cosine nearest-neighbour matrix (row 0 of each entry is the word itself)."""
    from textattack.shared import WordEmbedding

    tok = adapter.tokenizer
    special = set(tok.all_special_tokens)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if w.isalpha() and not w.startswith("##") and w not in special]
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in words])
    with torch.no_grad():
        matrix = adapter.model.get_input_embeddings().weight[ids].detach().float().cpu()
        unit = torch.nn.functional.normalize(matrix, dim=1)
        k = 51
        nn = torch.empty(len(words), k, dtype=torch.long)
        for s in range(0, len(words), 2048):
            sims = unit[s:s + 2048] @ unit.T
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + s] = float("inf")  # the word itself first, even if another row ties
            nn[s:s + 2048] = sims.topk(k, dim=1).indices
    word2index = {w: i for i, w in enumerate(words)}
    index2word = dict(enumerate(words))
    return WordEmbedding(matrix.numpy(), word2index, index2word, nn.numpy())


def minilm_sentence_encoder(**kwargs):
    """TextAttack ``SentenceEncoder`` constraint on the packaged all-MiniLM-L6-v2 (mean pooling), an
    offline stand-in for USE / SBERT."""
    from textattack.constraints.semantics.sentence_encoders import SentenceEncoder
    from transformers import AutoModel, AutoTokenizer

    from unirobust.offline import resolve_hf_model

    class MiniLMEncoder(SentenceEncoder):
        def __init__(self, batch_size: int = 64, **kw):
            super().__init__(**kw)
            path = resolve_hf_model(MINILM)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.encoder = AutoModel.from_pretrained(path).eval()
            self.batch_size = batch_size
            self.model = self  # SentenceEncoder._sim_score calls self.model.encode

        @torch.no_grad()
        def encode(self, sentences):
            out = []
            for i in range(0, len(sentences), self.batch_size):
                b = self.tokenizer(list(sentences[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=128, return_tensors="pt")
                h = self.encoder(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
            return torch.cat(out) if out else torch.empty(0, self.encoder.config.hidden_size)

    return MiniLMEncoder(**kwargs)


def textfooler_like(wrapper, adapter):
    """TextFooler with offline components (see the module docstring)."""
    from textattack import Attack
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.constraints.semantics import WordEmbeddingDistance
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import WordSwapEmbedding

    embedding = whole_word_embedding(adapter)
    constraints = [
        RepeatModification(),
        StopwordModification(),
        WordEmbeddingDistance(embedding=embedding, min_cos_sim=0.5),
        minilm_sentence_encoder(threshold=0.840845057, metric="angular", compare_against_original=False,
                                window_size=15, skip_text_shorter_than_window=True),
    ]
    goal = UntargetedClassification(wrapper, model_batch_size=wrapper.batch_size)
    return Attack(goal, constraints, WordSwapEmbedding(max_candidates=50, embedding=embedding),
                  GreedyWordSwapWIR(wir_method="delete"))


def timed(wrapper_class):
    """A subclass of a TextAttack model wrapper class that adds the wall time of its forward passes
    to ``.forward_seconds``."""

    class Timed(wrapper_class):
        forward_seconds = 0.0

        def __call__(self, text_input_list, **kwargs):
            t = time.perf_counter()
            try:
                return super().__call__(text_input_list, **kwargs)
            finally:
                self.forward_seconds += time.perf_counter() - t

    return Timed


def timed_wrapper(adapter):
    """unirobust's ``AdapterWrapper`` (each query batch padded to its longest member), timed."""
    from unirobust.attacks.text import bridge

    return timed(bridge.AdapterWrapper)(adapter)


def timed_hf_wrapper(adapter, max_length: int = 64):
    """TextAttack's own ``HuggingFaceModelWrapper`` over the victim's Hugging Face model, with the
    tokenizer's ``model_max_length`` set to ``max_length``: it pads every query to that length (the
    issue's "tuned" baseline; its default pads to 512). Timed."""
    import copy

    from textattack.models.wrappers import HuggingFaceModelWrapper

    tokenizer = copy.deepcopy(adapter.tokenizer)
    tokenizer.model_max_length = max_length
    adapter.eval()
    wrapper = timed(HuggingFaceModelWrapper)(adapter.model, tokenizer)
    wrapper.batch_size = 32  # TextAttack's default model_batch_size (read by textfooler_like)
    return wrapper


def run_textattack_side(name: str, adapter, examples: list[dict], wrapper_kind: str = "adapter"):
    from unirobust.attacks.text.bridge import build_textattack_attack, run_textattack

    wrapper = timed_wrapper(adapter) if wrapper_kind == "adapter" else timed_hf_wrapper(adapter)
    t = time.perf_counter()
    attack = textfooler_like(wrapper, adapter) if name == "textfooler-like" else build_textattack_attack(name, wrapper)
    setup = time.perf_counter() - t
    start = time.perf_counter()
    records = run_textattack(adapter, examples, attack, progress=True)
    wall = time.perf_counter() - start
    return records, {"seconds": wall, "forward_seconds": wrapper.forward_seconds, "setup_seconds": setup}


# ----------------------------------------------------------------------------- unirobust side


def unirobust_engine():
    """``(build_attack, attack_examples)`` of unirobust's word-substitution engine, or None if it is not there."""
    from unirobust.attacks import build_attack
    from unirobust.attacks.text.attack import attack_examples

    return build_attack, attack_examples


def prepared_attack(name: str, adapter, engine):
    """The unirobust attack of row ``name`` with its setup done: counter-fitting (once per model,
    cached on disk) and loading the sentence encoder are setup, not attack time (as on the TextAttack
    side). Returns (attack, setup seconds)."""
    build_attack, _ = engine
    t = time.perf_counter()
    attack = build_attack(dict(UNIROBUST_SPECS[name]))
    if attack.source == "embedding" or attack.min_cos is not None:
        attack.vectors(adapter)
    if attack.sentence_sim is not None:
        from unirobust.attacks.text.engine import sentence_encoder

        sentence_encoder(attack.sentence_encoder)
    return attack, time.perf_counter() - t


def run_unirobust_side(name: str, adapter, examples: list[dict], engine):
    attack, setup = prepared_attack(name, adapter, engine)
    start = time.perf_counter()
    records, stats = engine[1](adapter, examples, attack, store=None, progress=True)
    wall = time.perf_counter() - start
    stats = dict(stats)
    stats.setdefault("seconds", wall)
    stats["setup_seconds"] = setup
    return records, stats


def _shard_worker(rank: int, procs: int, threads: int, name: str, run_path: str, examples: list[dict],
                  barrier, results) -> None:
    """One process of ``run_unirobust_sharded``: indices ``i % procs == rank``, as ``run_word_attack``
    shards under ``accelerate launch``."""
    torch.set_num_threads(threads)
    ensure_torchvision()
    _, adapter, _ = load_victim(Path(run_path))
    engine = unirobust_engine()
    attack, setup = prepared_attack(name, adapter, engine)
    barrier.wait()
    began = time.time()
    records, stats = engine[1](adapter, examples, attack, store=None, progress=rank == 0,
                               indices=list(range(rank, len(examples), procs)))
    results.put((rank, records, stats, setup, began, time.time()))


def side_name(procs: int) -> str:
    return "unirobust" if procs == 1 else f"unirobust-{procs}proc"


def run_unirobust_sharded(name: str, run_path: Path, examples: list[dict], procs: int):
    """The engine on ``procs`` processes of ``cores // procs`` threads each (what ``unirobust launch
    --multi_gpu --num_processes P -- attack ...`` does on CPU, with OMP_NUM_THREADS per process). Wall
    time runs from the common start (after every process has loaded the model) to the last finish."""
    ctx = torch.multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    threads = max(1, (os.cpu_count() or procs) // procs)
    workers = [ctx.Process(target=_shard_worker, args=(r, procs, threads, name, str(run_path), examples, barrier,
                                                       results)) for r in range(procs)]
    for w in workers:
        w.start()
    parts = [results.get() for _ in workers]
    for w in workers:
        w.join()
    records = sorted((rec for part in parts for rec in part[1]), key=lambda r: r.index)
    wall = max(p[5] for p in parts) - min(p[4] for p in parts)
    sums = {k: sum(p[2][k] for p in parts) for k in ("forward_seconds", "encoder_seconds")}
    # time fractions of the processes' combined wall time (procs x wall)
    return records, {"seconds": wall, "setup_seconds": max(p[3] for p in parts), "processes": procs,
                     "threads_per_process": threads, **sums,
                     "process_seconds": procs * wall}


# ----------------------------------------------------------------------------- metrics


def row_of(name: str, side: str, adapter, examples, records, stats) -> dict:
    from unirobust.attacks.text.results import summarise

    s = summarise(records)
    wins = [r for r in records if r.status == "success"]
    field = adapter.text_fields[0]
    verified = 0
    if wins:
        preds = adapter.predict([r.adversarial for r in wins]).tolist()
        verified = sum(p != r.label for p, r in zip(preds, wins))
    wall = float(stats["seconds"])
    n = len(records)
    forward = stats.get("forward_seconds")
    busy = stats.get("process_seconds", wall)  # sharded: the processes' combined wall time
    model = forward + stats.get("encoder_seconds", 0.0) if forward is not None else None
    return {
        "attack": name,
        "side": side,
        "n": n,
        "seconds": wall,
        "setup_seconds": stats.get("setup_seconds"),
        "seconds_per_example": wall / n if n else None,
        "examples_per_second": n / wall if wall else None,
        "queries_per_example": s["mean_queries"],
        "success_rate": s["attack_success_rate"],
        "words_perturbed": s["mean_perturbed_fraction"],
        "forward_seconds": forward,
        "forward_fraction": forward / busy if forward is not None and busy else None,
        "model_fraction": model / busy if model is not None and busy else None,
        "processes": stats.get("processes", 1),
        "n_success": s["n_success"], "n_failed": s["n_failed"], "n_skipped": s["n_skipped"], "n_error": s["n_error"],
        "successes_verified": verified,
        "statuses": [r.status for r in records],
        "examples_field": field,
    }


def fmt(x, spec: str, scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, spec)


def print_table(rows: list[dict]) -> None:
    print("\n| attack | side | processes | s/example | examples/s | queries/example | success % | words perturbed % "
          "| victim forward % | all model forwards % | successes verified |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['side']} | {r.get('processes', 1)} | {fmt(r['seconds_per_example'], '.3f')} | "
              f"{fmt(r['examples_per_second'], '.2f')} | {fmt(r['queries_per_example'], '.1f')} | "
              f"{fmt(r['success_rate'], '.1f', 100)} | {fmt(r['words_perturbed'], '.1f', 100)} | "
              f"{fmt(r['forward_fraction'], '.0f', 100)} | {fmt(r.get('model_fraction'), '.0f', 100)} | "
              f"{r['successes_verified']}/{r['n_success']} |")


def speedups(rows: list[dict]) -> dict:
    """Per attack and unirobust side: examples/s as a ratio to each TextAttack side of the same run,
    success-rate difference in points, and the issue's targets (>= 2x TextAttack's examples/s against
    its tuned HuggingFaceModelWrapper, success no more than 3 points below, >= 80% of the time in
    model forward passes)."""
    out = {}
    for name in dict.fromkeys(r["attack"] for r in rows):
        sides = {r["side"]: r for r in rows if r["attack"] == name}
        for side, r in sides.items():
            if not side.startswith("unirobust"):
                continue
            entry = {}
            for base in ("textattack", TEXTATTACK_HF64):
                if base in sides:
                    b = sides[base]
                    entry[f"vs_{base}"] = r["examples_per_second"] / b["examples_per_second"]
                    entry[f"success_points_vs_{base}"] = 100 * (r["success_rate"] - b["success_rate"])
            if f"vs_{TEXTATTACK_HF64}" in entry:
                entry["target_met"] = (entry[f"vs_{TEXTATTACK_HF64}"] >= 2.0
                                       and entry[f"success_points_vs_{TEXTATTACK_HF64}"] >= -3.0
                                       and (r.get("model_fraction") or 0) >= 0.8)
            if entry:
                out[f"{name} / {side}"] = entry
    return out


def agreement(rows: list[dict]) -> dict:
    """Per attack with both sides: fraction of examples where the two sides end with the same status."""
    out = {}
    for name in {r["attack"] for r in rows}:
        sides = {r["side"]: r for r in rows if r["attack"] == name}
        if {"textattack", "unirobust"} <= set(sides) and sides["textattack"]["n"] == sides["unirobust"]["n"]:
            a, b = sides["textattack"]["statuses"], sides["unirobust"]["statuses"]
            out[name] = sum(x == y for x, y in zip(a, b)) / len(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(REPO / "runs" / "sst2_minilm_victim"), help="victim run folder")
    p.add_argument("--n", type=int, default=100, help="correctly classified GLUE-dev sentences attacked")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, from {', '.join(ATTACKS)}")
    p.add_argument("--side", choices=("textattack", "unirobust", "both"), default="both")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--procs", default="1", help="comma-separated process counts for the unirobust side; P > 1 "
                   "shards the examples over P processes of cores/P threads (rows 'unirobust-Pproc')")
    p.add_argument("--hf64", action="store_true", help="also run TextAttack through its own "
                   "HuggingFaceModelWrapper padding every query to 64 tokens (the issue's baseline; rows "
                   f"'{TEXTATTACK_HF64}')")
    p.add_argument("--records", default=None, help="folder for per-example records (<attack>-<side>.jsonl)")
    p.add_argument("--name", default="word_attacks", help="results file bench/results/<name>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("jieba").setLevel(logging.WARNING)  # textattack imports it and it logs at DEBUG

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; valid: {', '.join(ATTACKS)}")
    ensure_torchvision()
    if args.threads:
        torch.set_num_threads(args.threads)
    procs = sorted({int(x) for x in args.procs.split(",") if x.strip()})
    if not procs or min(procs) < 1:
        p.error("--procs takes positive process counts, e.g. 1,2")
    sides = ["textattack", "unirobust"] if args.side == "both" else [args.side]
    if args.hf64 and "textattack" in sides:
        sides.insert(sides.index("textattack") + 1, TEXTATTACK_HF64)
    if "unirobust" in sides:
        sides[sides.index("unirobust"):] = [side_name(k) for k in procs]
    engine = unirobust_engine() if any(s.startswith("unirobust") for s in sides) else None
    if any(s.startswith("textattack") for s in sides):
        from unirobust.offline import ensure_textattack_ready

        ensure_textattack_ready()

    run = Path(args.run)
    if run.resolve().is_relative_to(REPO):
        run = run.resolve().relative_to(REPO)
    run_path = REPO / run if not run.is_absolute() else run
    recipe, adapter, dev = load_victim(run_path)
    acc = dev_accuracy(run_path, adapter, dev)
    examples = first_correct(adapter, dev, args.n)
    load_before = os.getloadavg()
    print(f"victim {run} ({recipe.model.spec}, dev accuracy {acc:.1%} on {len(dev)}); {len(examples)} correctly "
          f"classified dev sentences; attacks {', '.join(attacks)}; sides {', '.join(sides)}; "
          f"{torch.get_num_threads()} thread(s); load average {load_before[0]:.2f}")

    rows = []
    for name in attacks:
        for side in sides:
            if side.startswith("textattack") and name in UNIROBUST_ONLY:
                continue
            if side == "textattack":
                records, stats = run_textattack_side(name, adapter, examples)
            elif side == TEXTATTACK_HF64:
                records, stats = run_textattack_side(name, adapter, examples, wrapper_kind="hf64")
            elif side == "unirobust":
                records, stats = run_unirobust_side(name, adapter, examples, engine)
            else:
                records, stats = run_unirobust_sharded(name, run_path, examples, int(side.split("-")[1][:-4]))
            row = row_of(name, side, adapter, examples, records, stats)
            row["load_average_after"] = os.getloadavg()[0]
            rows.append(row)
            print_table([row])
            if args.records:
                folder = Path(args.records)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}-{side}.jsonl").write_text("".join(r.to_json() + "\n" for r in records))

    # keep rows of (attack, side) pairs not re-run, if they are for the same victim and examples
    previous = RESULTS / f"{args.name}.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        same = old.get("victim", {}).get("run") == str(run) and old.get("config", {}).get("n_examples") == len(examples)
        done = {(r["attack"], r["side"]) for r in rows}
        if same:
            rows = [r for r in old.get("results", []) if (r["attack"], r["side"]) not in done] + rows
    order = {a: i for i, a in enumerate(ATTACKS)}
    rows.sort(key=lambda r: (order.get(r["attack"], 99), not r["side"].startswith("textattack"), r["side"]))
    print("\nall rows:")
    print_table(rows)
    ratios = speedups(rows)
    if ratios:
        print("\nunirobust examples/s as a ratio to TextAttack's (success-rate difference in points):")
        for key, e in ratios.items():
            parts = [f"{e[f'vs_{b}']:.2f}x vs {b} ({e[f'success_points_vs_{b}']:+.0f})"
                     for b in ("textattack", TEXTATTACK_HF64) if f"vs_{b}" in e]
            met = "" if "target_met" not in e else ("  target met" if e["target_met"] else "  TARGET MISSED")
            print(f"  {key}: {', '.join(parts)}{met}")
    agree = agreement(rows)
    if agree:
        print("\nsame final status on both sides: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(agree.items())))
    from importlib.metadata import version

    path = write_result(args.name, {
        "config": {**vars(args), "n_examples": len(examples), "threads": torch.get_num_threads(),
                   "textattack": version("textattack"), "load_average_before": load_before[0]},
        "victim": {"run": str(run), "model": recipe.model.spec, "dev_accuracy": acc, "n_dev": len(dev)},
        "reference_textattack": REFERENCE,
        "results": rows,
        "speedups": ratios,
        "status_agreement": agree,
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
