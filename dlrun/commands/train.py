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
from dlrun.training import adapters, distributed, env, session
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
    device = distributed.device_for(env.resolve_device(t.device))  # a DDP rank's own GPU on CUDA
    env.seed_everything(t.seed, t.deterministic)
    data = datasets.build(cfg.dataset, device)
    # Sizes only the data knows (image_folder's class folders, a CSV's columns, a text vocabulary) go into the
    # config: the model's ${dataset.*} interpolations and the stored config (eval/quantize/export) get real values.
    known = {"input_shape": list(data.input_shape), "num_outputs": data.num_outputs, "vocab_size": data.vocab_size}
    for key, value in known.items():
        if key in cfg.dataset and cfg.dataset[key] is None:
            cfg.dataset[key] = value
    model = models.build(cfg.model, data.input_shape).to(device)
    if cfg.get("init_from") and not cfg.resume:  # a resumed run continues from its own last.pt
        session.init_weights(model, str(cfg.init_from), device, cfg.trust_targets)
    params = profiling.count_params(model)
    # adapter=lora: `trained` wraps `model` in place; fit merges the adapters back, leaving `model` plain.
    trained = adapters.wrap(model, cfg.adapter) if cfg.get("adapter") else model
    log.info(
        f"train {cfg.model._target_.rsplit('.', 1)[-1]} on {data.task} data {list(data.input_shape)}: "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, "
        f"{params:,} params, {device}"
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    fitted = session.fit(
        trained, data, cfg, run_dir, config, device=device, resume=bool(cfg.resume), extra_callbacks=extra_callbacks
    )

    if not distributed.is_main():  # every rank has the same metrics; rank 0 writes them
        return
    flops = profiling.count_flops(model, data.example().cpu().to(device))
    metrics = {"val": fitted.val, "test": fitted.test}
    world = distributed.world_size()
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
            extra={
                "params": params,
                "trainable_params": fitted.trainable_params,
                "flops": flops,
                "train_seconds": fitted.train_seconds,
                "device": str(device),
                "world_size": world,
                "global_batch_size": world * t.batch_size,
            },
        ),
    )
    ui.metrics_table(f"train: best epoch {fitted.state.best_epoch}", metrics)
