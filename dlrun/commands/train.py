"""`dlrun train`: fit a model, keep the best checkpoint on validation, report test metrics from it.

    dlrun train model=resnet optimizer.lr=0.05
    dlrun train resume=outputs/train/2026-11-22_10-00-00
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dlrun import data as datasets
from dlrun import models
from dlrun.core import checkpoint as ckpt
from dlrun.core import contract, files, locks, profiling, provenance, rundir, ui
from dlrun.core.errors import DlrunError
from dlrun.training import env, evaluate, loop

log = logging.getLogger("dlrun")
INTERRUPTED = 130  # the shell's code for Ctrl-C


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    run_dir = rundir.current()
    lock = locks.acquire_lock(run_dir)
    previous_handler = signal.signal(signal.SIGINT, _on_interrupt(lock))
    try:
        _train(cfg, run_dir, started)
    except KeyboardInterrupt:
        raise DlrunError(
            "interrupted; checkpoints/last.pt holds the last completed epoch. "
            f"Resume with: dlrun train resume={rundir.relative(run_dir)}",
            INTERRUPTED,
        ) from None
    else:
        signal.signal(signal.SIGINT, previous_handler)
    finally:
        locks.release_lock(lock)


def _on_interrupt(lock: Path):
    """First Ctrl-C: KeyboardInterrupt (stop cleanly, say how to resume). Second: exit at once.

    Every file of a run is replaced atomically, so exiting mid-way leaves each one old or new, never half;
    the handler stays installed until the process ends, so a Ctrl-C during shutdown cannot print a traceback.
    """
    interrupted = False

    def handler(signum, frame):
        nonlocal interrupted
        if interrupted:
            locks.release_lock(lock)
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(INTERRUPTED)
        interrupted = True
        raise KeyboardInterrupt

    return handler


def _train(cfg: DictConfig, run_dir: Path, started: float) -> None:
    t = cfg.trainer
    device = env.resolve_device(t.device)
    env.seed_everything(t.seed, t.deterministic)
    data = datasets.build(cfg.dataset, device)
    if cfg.dataset.num_outputs is None:  # image_folder: as many outputs as class folders
        cfg.dataset.num_outputs = data.num_outputs
    model = models.build(cfg.model, data.input_shape).to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    steps_per_epoch = math.ceil(len(data.train) / t.batch_size)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps_per_epoch * t.epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = evaluate.loss_function(data.task, t.label_smoothing if data.task == "classification" else 0.0)
    metric, mode = evaluate.monitor(data.task)
    headline = "accuracy" if data.task == "classification" else "r2"  # orders epochs as val loss does for regression
    config = OmegaConf.to_container(cfg, resolve=True)

    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    state = {"best": None, "best_epoch": 0, "stale_epochs": 0}
    rows: list[dict] = []
    first_epoch = 1
    if cfg.resume:
        locks.remove_stale_temps(run_dir, checkpoints)  # left by a process killed mid-write (we hold the lock)
        first_epoch, rows = _restore(checkpoints / "last.pt", device, model, optimizer, scheduler, state, config, run_dir)

    def snapshot(epoch: int) -> dict:
        return {
            ckpt.MODEL: model.state_dict(), ckpt.OPTIMIZER: optimizer.state_dict(), ckpt.SCHEDULER: scheduler.state_dict(),
            ckpt.EPOCH: epoch, ckpt.RNG: env.rng_state(), ckpt.TRAINER_STATE: dict(state), ckpt.CONFIG: config,
            ckpt.VERSIONS: provenance.versions(), ckpt.GIT_COMMIT: provenance.git_commit(),
        }

    if first_epoch == 1:  # so Ctrl-C in the first epoch still leaves something to resume from
        ckpt.save(checkpoints / "last.pt", snapshot(0))
    network = torch.compile(model) if t.compile else model
    params = profiling.count_params(model)
    log.info(f"train {cfg.model._target_.rsplit('.', 1)[-1]} on {data.task} data {list(data.input_shape)}: "
             f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, {params:,} params, {device}")

    with ui.progress(steps_per_epoch * (t.epochs - first_epoch + 1), "training") as advance:
        for epoch in range(first_epoch, t.epochs + 1):
            stats = loop.train_epoch(
                network, data, optimizer, scheduler, loss_fn, epoch=epoch, batch_size=t.batch_size, seed=t.seed,
                precision=t.precision, grad_clip=t.grad_clip, nan_policy=t.nan_policy, on_step=advance,
            )
            model.eval()
            val = evaluate.evaluate(model, data.val, data, batch_size=t.eval_batch_size)
            row = {"epoch": epoch, "train_loss": stats.loss, **{f"val_{k}": v for k, v in val.items() if k != "samples"},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": stats.seconds, "samples_per_s": stats.samples_per_s}
            rows.append(row)
            improved = evaluate.is_better(val[metric], state["best"], mode)
            if improved:
                state.update(best=val[metric], best_epoch=epoch, stale_epochs=0)
            else:
                state["stale_epochs"] += 1
            files.write_rows(run_dir, "metrics", rows)
            snap = snapshot(epoch)
            if improved:
                ckpt.save(checkpoints / "best.pt", snap)
            ckpt.save(checkpoints / "last.pt", snap)
            log.info(f"epoch {epoch}/{t.epochs}  train_loss {stats.loss:.4f}  val_loss {val['loss']:.4f}  "
                     f"val_{headline} {val[headline]:.4f}{' *' if improved else ''}  lr {row['lr']:.3g}  "
                     f"{stats.seconds:.2f}s  {stats.samples_per_s:,.0f} samples/s"
                     + (f"  skipped {stats.skipped_batches} non-finite batches" if stats.skipped_batches else ""))
            if t.patience and state["stale_epochs"] >= t.patience:
                log.info(f"early stopping: no better val_{metric} for {t.patience} epochs")
                break

    best = ckpt.load(checkpoints / "best.pt", device)
    model.load_state_dict(best[ckpt.MODEL])
    model.eval()
    test = evaluate.evaluate(model, data.test, data, batch_size=t.eval_batch_size, confusion=True)
    val_best = {k.removeprefix("val_"): v for k, v in rows[state["best_epoch"] - 1].items() if k.startswith("val_")}
    flops = profiling.count_flops(model, data.example().cpu().to(device))
    contract.write_summary(
        run_dir, "train", config,
        metrics={"val": val_best, "test": test}, best_epoch=state["best_epoch"], epochs_run=rows[-1]["epoch"],
        params=params, flops=flops, train_seconds=sum(r["seconds"] for r in rows), wall_s=time.perf_counter() - started,
        device=str(device), checkpoint=rundir.relative(checkpoints / "best.pt"),
    )
    ui.metrics_table(f"{rundir.relative(run_dir)}: best epoch {state['best_epoch']}", {"val": val_best, "test": test})


def _restore(path: Path, device, model, optimizer, scheduler, state: dict, config: dict, run_dir: Path):
    """Load last.pt into the live objects; returns the next epoch and the metric rows up to it."""
    saved = ckpt.load(path, device)
    try:
        model.load_state_dict(saved[ckpt.MODEL])
        optimizer.load_state_dict(saved[ckpt.OPTIMIZER])
        scheduler.load_state_dict(saved[ckpt.SCHEDULER])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DlrunError(f"{path} does not match this run's model/optimizer config: {str(exc).splitlines()[0]}") from None
    env.set_rng_state(saved[ckpt.RNG])
    state.update(saved[ckpt.TRAINER_STATE])
    for key in ("trainer.seed", "trainer.batch_size", "optimizer", "scheduler", "dataset"):
        if OmegaConf.select(OmegaConf.create(saved[ckpt.CONFIG]), key) != OmegaConf.select(OmegaConf.create(config), key):
            log.warning(f"warning: {key} differs from the checkpoint's; the resumed run is not the same experiment")
    done = saved[ckpt.EPOCH]
    rows = []
    if (run_dir / "metrics.jsonl").is_file():  # rows written after last.pt (killed in between) are dropped
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["epoch"] <= done]
    log.info(f"resuming {run_dir} after epoch {done}")
    return done + 1, rows
