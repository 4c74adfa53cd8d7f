"""One Accelerate training loop for every defense.

The defense computes the loss (``defense.loss(view, batch)``); the loop only steps the optimizer.
``view`` routes ``logits`` through the (possibly DDP-wrapped) model so gradients synchronise, while
attacks reach the plain adapter through ``view.unwrapped`` (DESIGN: never attack through DDP).
Checkpoints (``accelerator.save_state``: safetensors weights, optimizer, scheduler, RNG states) every
``train.checkpoint_every`` steps make runs resumable; a resumed run ends with the same weights and
the same training history (``trainer_state.json`` holds the step, the finished epochs' history, the
running epoch's sums, the elapsed time and a hash of the recipe, so ``--resume`` refuses a checkpoint
of another recipe). A run that is not resumed starts with no checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .defenses import build_defense
from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


class TrainView:
    """The adapter as a defense sees it in training: ``logits`` through the wrapped model."""

    def __init__(self, adapter, wrapped):
        self.unwrapped = adapter
        self._wrapped = wrapped

    def logits(self, z, batch):
        return self._wrapped(z, batch)

    def __getattr__(self, name):
        return getattr(self.unwrapped, name)


class EpochPermutation(Sampler):
    """Shuffles with a generator seeded by ``seed + epoch``: the same order on resume and on every process."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def make_accelerator(recipe: Recipe | None = None, run_dir: Path | None = None):
    """An ``Accelerator`` for a recipe; ``cpu=True`` where no GPU exists, so that a multi-process
    launch on CPU becomes a real gloo job instead of N independent single-process runs."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from accelerate.state import AcceleratorState

    train = recipe.train if recipe is not None else None
    settings = dict(cpu=not has_accelerator_device(), gradient_accumulation_steps=train.grad_accum if train else 1,
                    mixed_precision=train.mixed_precision if train else "no",
                    dataloader_config=DataLoaderConfiguration(split_batches=True),
                    project_dir=str(run_dir) if run_dir else None)
    try:
        accelerator = Accelerator(**settings)
    except ValueError as err:  # an earlier run in this process (a study's variant) used another precision
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state()  # the process group (PartialState) stays
        accelerator = Accelerator(**settings)
    if precision_used(accelerator) != accelerator.mixed_precision:
        log.warning("train.mixed_precision=%s has no effect on %s (accelerate autocasts fp16 on GPUs only): this "
                    "run computes in fp32; bf16 works on CPU", accelerator.mixed_precision, accelerator.device.type)
    return accelerator


def precision_used(accelerator) -> str:
    """The precision the accelerator really computes in: ``no`` (fp32) where it was asked for a mixed
    precision it cannot autocast (fp16 on CPU: accelerate keeps the setting but turns autocast off)."""
    asked = str(accelerator.mixed_precision)
    engine_casts = str(accelerator.distributed_type).split(".")[-1] in ("DEEPSPEED", "MEGATRON_LM")  # they cast
    return asked if asked == "no" or accelerator.native_amp or engine_casts else "no"


def make_optimizer(params, cfg):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer, cfg, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1 - progress) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


_CHECKPOINT = re.compile(r"step_(\d+)")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's finished checkpoints ``checkpoints/step_<n>``, oldest first (a ``step_<n>.tmp`` that
    a crash left half-written is not one)."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
             if (m := _CHECKPOINT.fullmatch(p.name)) and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def recipe_hash(recipe: Recipe) -> str:
    """What a checkpoint must have been trained with to be resumed: the recipe without its evaluation,
    checkpointing and data-reading settings (changing those does not change training)."""
    import yaml

    dump = yaml.safe_load(recipe.to_yaml())  # the task resolved: the same task reached by name or written out
    for key in ("eval", "output_dir", "description"):
        dump.pop(key, None)
    for key in ("checkpoint_every", "num_workers"):
        dump["train"].pop(key, None)
    for key in ("base_dir", "description", "max_eval"):
        dump["task"].pop(key, None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_batch_split(recipe: Recipe, accelerator) -> None:
    """``train.batch_size`` is the global batch, split evenly over the processes."""
    if recipe.train.batch_size % accelerator.num_processes:
        raise RecipeError(f"train.batch_size {recipe.train.batch_size} must be divisible by "
                          f"{accelerator.num_processes} processes (it is the global batch, split over them)")


def resumable_state(recipe: Recipe, ckpt: Path) -> dict:
    """The checkpoint's trainer state; RecipeError when a run with another recipe wrote it."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("recipe_hash") != recipe_hash(recipe):
        raise RecipeError(f"--resume: {ckpt} was written by a run with another recipe (training, task, model "
                          f"or defense differ); resume with the recipe it was trained with, or run without "
                          f"--resume to start over")
    return state


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict | None = None, keep: int = 2) -> None:
    """``accelerator.save_state`` plus ``trainer_state.json`` (``{"step": step, **state}``) into a temp
    folder, then rename (a crash never leaves half a checkpoint); keeps the ``keep`` newest."""
    final = run_dir / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for c in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(c, ignore_errors=True)
    accelerator.wait_for_everyone()


def clear_checkpoints(accelerator, run_dir: Path) -> None:
    """A run that is not resumed starts from nothing: an earlier run's checkpoints would otherwise
    outlive this run's (pruning keeps the highest steps) and ``--resume`` would load them."""
    if accelerator.is_main_process and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    accelerator.wait_for_everyone()


def sync_buffers(model, accelerator) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank. DDP does this at each wrapped forward;
    attacks run on the unwrapped model before it, so without this each rank would attack with its own
    statistics, and a resumed run (which loads rank 0's) would not continue the same run."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def epoch_sums(accelerator, sums, stats: dict[str, float]) -> dict:
    """The running epoch's loss / correct / count sums and defense stats, over all ranks (for a checkpoint)."""
    keys = sorted(stats)
    total = accelerator.reduce(torch.cat([sums, torch.tensor([stats[k] for k in keys], device=sums.device)]), "sum")
    return {"sums": total[:3].tolist(), "stats": dict(zip(keys, total[3:].tolist()))}


def real_examples(accelerator, n: int) -> int:
    """How many of this rank's ``n`` batch examples are real. On several processes the epoch's last
    batch is filled up to the full batch with examples from the epoch's start (accelerate's
    ``even_batches``, so that every rank takes the same steps); the real ones come first in the
    global batch, and rank ``r`` holds its ``r``-th slice. They train like the rest (as a padded
    ``DistributedSampler`` does), but accuracy and counts leave them out (and the loss weighs the
    batch's mean by the real ones only)."""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return n
    return max(0, min(n, state.remainder - accelerator.process_index * n))


def defense_step(defense, view, batch, accelerator=None) -> dict:
    """One forward/backward of the defense (parameter gradients accumulate; the optimizer step is the
    caller's). A defense that needs several backward passes per step (FreeLB's accumulated ascent)
    defines ``step(model, batch, backward)`` and calls ``backward`` itself; every other defense defines
    ``loss(model, batch)`` and the loop back-propagates it. Without an ``accelerator`` (your own loop)
    the backward is ``loss.backward()``. Defenses with ``replays = m`` (Free-AT) expect m steps, each
    followed by an optimizer update, on every batch."""
    backward = accelerator.backward if accelerator is not None else (lambda loss: loss.backward())
    if callable(getattr(defense, "step", None)):
        return defense.step(view, batch, backward)
    out = defense.loss(view, batch)
    backward(out["loss"])
    return out


def fit(recipe: Recipe, adapter, train_set, accelerator, run_dir: Path, resume: bool = False,
        monitor_set=None) -> dict:
    """Train ``adapter`` in place with the recipe's defense; returns per-epoch history and timing.

    A *step* consumes one batch (``grad_accum`` batches with accumulation). Defenses with
    ``replays = m`` (Free-AT) make m optimizer updates on each batch. Numbers a defense reports in
    ``out["stats"]`` (e.g. counts of abnormal adversarial examples) are summed per epoch. With
    ``train.monitor_examples`` the loop measures PGD robust accuracy on a fixed held-out batch after
    every epoch and flags catastrophic overfitting (see ``monitor.py``).
    """
    from .monitor import RobustMonitor

    cfg = recipe.train
    task = recipe.resolved_task
    defense = build_defense(recipe.defense.model_dump(exclude_none=True), task.threat)
    replays = int(getattr(defense, "replays", 1))
    check_batch_split(recipe, accelerator)  # execute checks it before the run folder is touched, too
    sampler = EpochPermutation(len(train_set), recipe.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=adapter.collate,
                        generator=torch.Generator().manual_seed(recipe.seed), num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))  # accelerate syncs at an epoch's end
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer = make_optimizer([p for p in adapter.parameters() if p.requires_grad], cfg)
    schedule = make_schedule(optimizer, cfg, total * replays)
    wrapped, optimizer, loader, schedule = accelerator.prepare(adapter, optimizer, loader, schedule)
    view = TrainView(accelerator.unwrap_model(wrapped), wrapped)
    monitor = None
    if cfg.monitor_examples and monitor_set is not None:
        monitor = RobustMonitor(monitor_set, adapter.collate, cfg.monitor_examples, task.threat, accelerator.device)

    step, history, elapsed, carried = 0, [], 0.0, None
    fingerprint = recipe_hash(recipe)
    if not resume:
        clear_checkpoints(accelerator, run_dir)
    elif (ckpt := latest_checkpoint(run_dir)) is None:
        log.warning("--resume: %s has no checkpoint; training from the start", run_dir / "checkpoints")
    else:
        state = resumable_state(recipe, ckpt)
        if state["step"] > total:
            raise RecipeError(f"--resume: {ckpt} is at step {state['step']}, past this recipe's {total} steps")
        accelerator.load_state(str(ckpt))
        step, history, elapsed = state["step"], state.get("history", []), state.get("seconds", 0.0)
        carried = state.get("epoch_sums")
        log.info("resumed from %s (step %d of %d)", ckpt, step, total)
        if state.get("processes", accelerator.num_processes) != accelerator.num_processes:
            log.warning("--resume: %s was written by %d process(es), this run has %d: batches are split "
                        "differently from here on, so the result matches neither an uninterrupted run on %d nor "
                        "on %d", ckpt, state["processes"], accelerator.num_processes, state["processes"],
                        accelerator.num_processes)
    if monitor is not None:  # its memory of earlier epochs, for the overfitting rule
        for entry in history:
            monitor.pgd_history.append(entry["monitor_pgd_accuracy"])
            monitor.fgsm_history.append(entry["monitor_fgsm_accuracy"])
            if entry.get("catastrophic_overfitting"):
                monitor.overfit_epochs.append(entry["epoch"])
    start = time.time() - elapsed

    def close_epoch(epoch: int, sums, stats: dict[str, float]) -> None:
        """The epoch's history entry (loss, accuracy and defense stats over all ranks; the monitor)."""
        totals = epoch_sums(accelerator, sums, stats)
        loss_sum, correct, count = totals["sums"]
        if count <= 0:
            return
        entry = {"epoch": epoch, "step": step, "examples": int(count), "loss": loss_sum / count,
                 "train_accuracy": correct / count, **totals["stats"]}
        if monitor is not None:
            entry.update(monitor.check(view.unwrapped, epoch))
        history.append(entry)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in entry.items() if k != "epoch"))

    def fresh_sums():
        return torch.zeros(3, device=accelerator.device), {}  # (loss sum, correct, count), defense stats

    resumed = None
    if carried is not None:  # the checkpoint's epoch so far (its sums over all ranks, held by rank 0)
        main = accelerator.is_main_process
        resumed = (torch.tensor(carried["sums"] if main else [0.0] * 3, device=accelerator.device),
                   {k: v if main else 0.0 for k, v in carried["stats"].items()})
        if step % steps_per_epoch == 0 or step >= total:  # that epoch was over: close it as the run would have
            close_epoch((step - 1) // steps_per_epoch, *resumed)
            resumed = None
    bar = tqdm(total=total, initial=step, desc=f"train {recipe.name}", disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    epoch = step // steps_per_epoch
    while step < total:
        loader.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * cfg.grad_accum
        wrapped.train()
        sums, stats = resumed or fresh_sums()
        resumed = None
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            for _ in range(replays):
                with accelerator.accumulate(wrapped):
                    sync_buffers(view.unwrapped, accelerator)
                    out = defense_step(defense, view, batch, accelerator)
                    if cfg.grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad()
                for key, value in out.get("stats", {}).items():
                    stats[key] = stats.get(key, 0.0) + float(value)
            n = real_examples(accelerator, len(batch["labels"]))  # the batch's mean loss stands for its real ones
            sums += torch.stack([out["loss"].detach().float() * n,
                                 (out["logits"][:n].argmax(-1) == batch["labels"][:n]).sum().float(),
                                 torch.tensor(float(n), device=sums.device)])
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss'].item():.3f}", epoch=epoch)
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step >= total):  # and the last
                    save_checkpoint(accelerator, run_dir, step, {
                        "recipe_hash": fingerprint, "history": history, "seconds": time.time() - start,
                        "epoch_sums": epoch_sums(accelerator, sums, stats),
                        "processes": accelerator.num_processes})
                if step >= total:
                    break
        close_epoch(epoch, sums, stats)
        epoch += 1
    bar.close()
    accelerator.wait_for_everyone()
    seconds = time.time() - start
    return {"history": history, "steps": step, "seconds": seconds,
            "catastrophic_overfitting": bool(monitor and monitor.overfit_epochs),
            "examples_per_second": examples_seen(history, step * cfg.batch_size * cfg.grad_accum) / seconds
            if seconds and step else None}


def examples_seen(history: list[dict], fallback: int) -> int:
    """Real training examples over the run's epochs (``fallback`` for a history from before the
    per-epoch count was recorded)."""
    counts = [h.get("examples") for h in history]
    return sum(counts) if counts and None not in counts else fallback
