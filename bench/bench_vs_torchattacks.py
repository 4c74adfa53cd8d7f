"""unirobust's PGD and APGD against torchattacks' on the same model and the same images.

    python bench/bench_vs_torchattacks.py [--model cnn|timm:test_resnet] [--n 500] [--epochs 2]

Needs torchattacks in the *benchmark* environment only (it is not a unirobust dependency):
``pip install --no-deps torchattacks`` (its metadata pins requests~=2.25.1; a plain ``pip install``
downgrades requests / urllib3 / idna for everything else; torchattacks needs none of them to attack).

Trains a model (a small CNN, or any timm architecture) with ERM on animal-mnist for ``--epochs``
epochs (seed fixed), then attacks the first ``--n`` test images at Linf eps 0.1:

- PGD: same eps, step size, steps and uniform random start on both sides (torchattacks ``PGD``);
- APGD-CE and APGD-DLR: same eps, iterations and one restart (torchattacks ``APGD``, AutoAttack's
  code); ``--apgd-iter`` iterations.

Prints a table of robust accuracies (target: within 1 point) and times, and writes
bench/results/<--name>.json atomically (via bench/common.py). PGD is timed over ``--repeats``
interleaved runs after the seeded one (median and min; target: unirobust at least as fast, speed
ratio = torchattacks time / unirobust time >= 1 on the median); each APGD over its seeded run and
``--apgd-repeats`` more, interleaved. Both APGDs attack only the clean-correct images (AutoAttack's rule).
torchattacks expects a module taking [0, 1] images: ``adapter.logits`` is wrapped as one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from unirobust.compat import ensure_torchvision  # noqa: E402

INSTALL = ("torchattacks is not installed. It is only needed for this benchmark, not by unirobust; install it "
           "into the benchmark environment with\n\n    pip install --no-deps torchattacks\n\n(--no-deps: its "
           "metadata pins requests~=2.25.1 and a plain install downgrades requests, urllib3 and idna.)")


class Logits(nn.Module):
    """``adapter.logits`` as a module on [0, 1] images, as torchattacks expects."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, x):
        return self.adapter.logits(x)


def small_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, num_classes),
    )


def train_model(spec: str, epochs: int, seed: int):
    """ERM on animal-mnist's train split; returns (adapter in eval mode, task data, seconds)."""
    from unirobust.models import build_model
    from unirobust.models.vision import VisionAdapter
    from unirobust.tasks import get_task, load_task

    task = get_task("animal-mnist")
    data = load_task(task, seed=seed)
    torch.manual_seed(seed)
    if spec == "cnn":
        adapter = VisionAdapter(small_cnn(task.num_classes), task.num_classes, task.mean, task.std)
    else:
        adapter = build_model(spec, task)
    train = adapter.collate([data.train[i] for i in range(len(data.train))])
    x, y = train["pixel_values"], train["labels"]
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    adapter.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(adapter.logits(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    adapter.eval()
    return adapter, data, time.perf_counter() - start


def correct(adapter, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter.logits(z).argmax(-1) == labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", help="'cnn' (small CNN) or a timm spec such as timm:test_resnet")
    p.add_argument("--n", type=int, default=500, help="test images attacked")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--alpha", type=float, default=None, help="PGD step size (default 2.5 eps / steps)")
    p.add_argument("--apgd-iter", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="timed PGD runs of each library (median, min)")
    p.add_argument("--apgd-repeats", type=int, default=1, help="extra timed APGD runs after the seeded one")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="vs_torchattacks", help="results file bench/results/<name>.json")
    args = p.parse_args(argv)

    ensure_torchvision()  # before timm / torchattacks import torchvision
    try:
        import torchattacks
    except ImportError:
        print(INSTALL)
        return 2
    from unirobust.attacks.apgd import APGDCE, APGDDLR
    from unirobust.attacks.pgd import PGD

    torch.set_num_threads(args.threads)
    alpha = args.alpha or 2.5 * args.eps / args.steps
    adapter, data, train_s = train_model(args.model, args.epochs, args.seed)
    batch = adapter.collate([data.test[i] for i in range(min(args.n, len(data.test)))])
    x, y = batch["pixel_values"], batch["labels"]
    n = len(y)
    clean = correct(adapter, x, y)
    print(f"{args.model}: trained {args.epochs} epochs in {train_s:.1f} s; clean accuracy {clean.float().mean():.1%} "
          f"on {n} test images; Linf eps {args.eps}, PGD alpha {alpha:.4g} x {args.steps} steps, "
          f"APGD {args.apgd_iter} iterations; {args.threads} thread(s)")

    net = Logits(adapter).eval()
    pairs = {
        "PGD": (PGD(eps=args.eps, alpha=alpha, steps=args.steps, random_start=True),
                torchattacks.PGD(net, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)),
        "APGD-CE": (APGDCE(eps=args.eps, n_iter=args.apgd_iter),
                    torchattacks.APGD(net, norm="Linf", eps=args.eps, steps=args.apgd_iter, n_restarts=1,
                                      loss="ce", seed=args.seed)),
        "APGD-DLR": (APGDDLR(eps=args.eps, n_iter=args.apgd_iter),
                     torchattacks.APGD(net, norm="Linf", eps=args.eps, steps=args.apgd_iter, n_restarts=1,
                                       loss="dlr", seed=args.seed)),
    }
    runners = {
        "unirobust": lambda atk: atk(adapter, batch),
        "torchattacks": lambda atk: atk(x, y),
    }

    rows = []
    for name, (ours, theirs) in pairs.items():
        attacks = {"unirobust": ours, "torchattacks": theirs}
        flags, times = {}, {k: [] for k in attacks}
        for lib, atk in attacks.items():  # accuracy: one seeded run each (timed too)
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            z = runners[lib](atk)
            times[lib].append(time.perf_counter() - t)
            assert (z - x).abs().max() <= args.eps + 1e-6 and z.min() >= 0 and z.max() <= 1
            flags[lib] = correct(adapter, z, y)
        if name == "PGD":  # the first attack: its seeded runs are the warm-up
            reps, times = args.repeats, {k: [] for k in attacks}
        else:  # APGD runs are long: the seeded run counts, plus --apgd-repeats more
            reps = args.apgd_repeats
        for r in range(reps):  # timing: interleaved, alternating which goes first
            order = list(attacks) if r % 2 == 0 else list(attacks)[::-1]
            for lib in order:
                t = time.perf_counter()
                runners[lib](attacks[lib])
                times[lib].append(time.perf_counter() - t)
        med = {lib: statistics.median(ts) for lib, ts in times.items()}
        best = {lib: min(ts) for lib, ts in times.items()}
        acc = {lib: f.float().mean().item() for lib, f in flags.items()}
        rows.append({
            "attack": name,
            "unirobust_robust_accuracy": acc["unirobust"],
            "torchattacks_robust_accuracy": acc["torchattacks"],
            "difference_points": 100 * (acc["unirobust"] - acc["torchattacks"]),
            "per_example_agreement": (flags["unirobust"] == flags["torchattacks"]).float().mean().item(),
            "unirobust_seconds_median": med["unirobust"],
            "torchattacks_seconds_median": med["torchattacks"],
            "unirobust_seconds_min": best["unirobust"],
            "torchattacks_seconds_min": best["torchattacks"],
            "speed_ratio_median": med["torchattacks"] / med["unirobust"],
            "speed_ratio_min": best["torchattacks"] / best["unirobust"],
            "timed_runs": len(times["unirobust"]),
        })

    print("\n| attack | unirobust robust % | torchattacks robust % | diff (points) | per-example agreement % "
          "| unirobust s (median / min) | torchattacks s (median / min) | speed ratio ours/theirs (median / min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {100 * r['unirobust_robust_accuracy']:.1f} | "
              f"{100 * r['torchattacks_robust_accuracy']:.1f} | {r['difference_points']:+.1f} | "
              f"{100 * r['per_example_agreement']:.1f} | "
              f"{r['unirobust_seconds_median']:.3f} / {r['unirobust_seconds_min']:.3f} | "
              f"{r['torchattacks_seconds_median']:.3f} / {r['torchattacks_seconds_min']:.3f} | "
              f"{r['speed_ratio_median']:.2f} / {r['speed_ratio_min']:.2f} |")
    pgd = rows[0]
    targets = {
        "pgd_within_1_point": abs(pgd["difference_points"]) <= 1.0,
        "apgd_ce_within_1_point": abs(rows[1]["difference_points"]) <= 1.0,
        "pgd_at_least_as_fast": pgd["speed_ratio_median"] >= 1.0,
    }
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    path = write_result(args.name, {
        "config": {**vars(args), "alpha": alpha, "n_images": n, "torchattacks": torchattacks.__version__},
        "train_seconds": train_s,
        "clean_accuracy": clean.float().mean().item(),
        "results": rows,
        "targets": targets,
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
