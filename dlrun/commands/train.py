"""`dlrun train`: fit a model, keep the best checkpoint on validation, report test metrics from it.

    dlrun train model=resnet optimizer.lr=0.05
    dlrun train resume=outputs/train/2026-11-22_10-00-00

The run directory's mechanics (lock, Ctrl-C, resume, checkpoints) are dlrun.training.session's, shared with distill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlrun import data as datasets
from dlrun import models
from dlrun.core import contract, profiling, rundir, ui
from dlrun.training import env, session
from dlrun.training.loop import Callback

log = logging.getLogger("dlrun")


def run(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> None:
    """Train in the current run directory; `extra_callbacks` join the fit's (`dlrun tune` adds trial pruning)."""
    started = time.perf_counter()
    run_dir = rundir.current()
    with session.guarded(run_dir, "train"):
        _train(cfg, run_dir, started, extra_callbacks)


def _train(cfg: DictConfig, run_dir: Path, started: float, extra_callbacks: Sequence[Callback]) -> None:
    t = cfg.trainer
    device = env.resolve_device(t.device)
    env.seed_everything(t.seed, t.deterministic)
    data = datasets.build(cfg.dataset, device)
    if cfg.dataset.num_outputs is None:  # image_folder: as many outputs as class folders
        cfg.dataset.num_outputs = data.num_outputs
    model = models.build(cfg.model, data.input_shape).to(device)
    if cfg.get("init_from") and not cfg.resume:  # a resumed run continues from its own last.pt
        session.init_weights(model, str(cfg.init_from), device, cfg.trust_targets)
    params = profiling.count_params(model)
    log.info(
        f"train {cfg.model._target_.rsplit('.', 1)[-1]} on {data.task} data {list(data.input_shape)}: "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, "
        f"{params:,} params, {device}"
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    fitted = session.fit(
        model, data, cfg, run_dir, config, device=device, resume=bool(cfg.resume), extra_callbacks=extra_callbacks
    )

    flops = profiling.count_flops(model, data.example().cpu().to(device))
    metrics = {"val": fitted.val, "test": fitted.test}
    contract.write_summary(
        run_dir,
        contract.Summary(
            "train",
            config,
            wall_s=time.perf_counter() - started,
            metrics=metrics,
            record=contract.TrainRecord(
                checkpoint=rundir.relative(run_dir / "checkpoints" / "best.pt"),
                best_epoch=fitted.state.best_epoch,
                epochs_run=fitted.epochs_run,
            ),
            extra={"params": params, "flops": flops, "train_seconds": fitted.train_seconds, "device": str(device)},
        ),
    )
    ui.metrics_table(f"train: best epoch {fitted.state.best_epoch}", metrics)
