"""`dlrun distill`: train a small student to match a trained teacher (knowledge distillation) on the teacher's data.

    dlrun distill teacher=outputs/train/<run> model=lenet model.channels=[8,16] model.hidden=32 baseline=true
    dlrun distill teacher_ckpt=teacher.pt model=mlp distiller.temperature=2 distiller.alpha=0.5
    dlrun distill teacher=outputs/train/<run> init_from=outputs/prune/<run>   # recover a pruned model's accuracy
    dlrun distill resume=outputs/distill/<run>

The run directory is a train run's (checkpoints/best.pt and last.pt, metrics.csv, summary.json with the student's
val and test metrics), so eval, quantize, export and bench take it as run=. summary.json adds the teacher's test
metrics and, with baseline=true, those of the same student trained without the teacher (its checkpoints and
metrics in baseline/), so the gain is measured on the same test split, not claimed.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun import data as datasets
from dlrun import models
from dlrun.compression import distillation
from dlrun.core import checkpoint as ckpt
from dlrun.core import contract, profiling, reports, rundir, sources, ui
from dlrun.core.errors import UsageError
from dlrun.data import Data
from dlrun.training import callbacks, env, evaluate, loop, session

log = logging.getLogger("dlrun")
COMPARISON_PLOT = "comparison.png"  # bars: teacher vs student (vs the baseline student)
BASELINE = "baseline"  # the run's sub-folder for the student trained without the teacher


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    teacher = _teacher_source(cfg)
    refused = _typed_overrides("dataset")
    if refused:
        raise UsageError(f"the student learns on the teacher's dataset (stored with it): drop {refused[0]}")
    run_dir = rundir.current()
    with session.guarded(run_dir, "distill"):
        _distill(cfg, teacher, run_dir, started)


def _teacher_source(cfg: DictConfig) -> sources.Source:
    """The teacher's checkpoint, with its stored config checked (config.trust) before anything is built from it."""
    if not cfg.teacher and not cfg.teacher_ckpt:
        raise UsageError("dlrun distill needs a teacher: teacher=RUN_DIR (a train or prune run) or teacher_ckpt=PATH")
    if cfg.teacher and cfg.teacher_ckpt:
        raise UsageError("give only one of teacher=, teacher_ckpt=")
    source = sources.resolve(run=cfg.teacher, ckpt=cfg.teacher_ckpt, trusted=cfg.trust_targets)
    if source.kind != "checkpoint":
        raise UsageError(
            f"the teacher must be a float model (a train or prune run, or a checkpoint), "
            f"{source.label} is a {source.kind}"
        )
    return source


def _distill(cfg: DictConfig, teacher_source: sources.Source, run_dir: Path, started: float) -> None:
    t, d = cfg.trainer, cfg.distiller
    device = env.resolve_device(t.device)
    env.seed_everything(t.seed, t.deterministic)
    cfg.dataset = teacher_source.config["dataset"]  # the student's ${dataset.*} sizes now resolve to the teacher's
    data = datasets.build(cfg.dataset, device)
    student, student_task, widths = _student(cfg, data, device)
    # The student is built before the teacher, so its initial weights are those `dlrun train` would give it.
    baseline_student = copy.deepcopy(student) if cfg.baseline else None
    teacher = sources.load_model(teacher_source, device)
    example = data.example()
    distillation.check_compatible(
        (data.task, _outputs(teacher, example)),
        (student_task, _outputs(student, example)),
        teacher_source.label,
    )

    params, teacher_params = profiling.count_params(student), profiling.count_params(teacher)
    log.info(
        f"distill {_name(teacher_source.config)} ({teacher_params:,} params, {teacher_source.label}) into "
        f"{_name(cfg)} ({params:,} params) on {data.task} data {list(data.input_shape)}: "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, "
        f"T={d.temperature} alpha={d.alpha}, {device}"
    )
    config = OmegaConf.to_container(cfg, resolve=True)  # in the checkpoints: later commands rebuild the student
    kd = distillation.distillation_loss(
        teacher, session.task_loss(data.task, t), task=data.task, temperature=d.temperature, alpha=d.alpha
    )
    fitted, baseline, baseline_checkpoint = _fit(
        cfg, student, baseline_student, data, kd, run_dir, config, device, widths
    )
    metrics = {
        "val": fitted.val,
        "test": fitted.test,
        "teacher": evaluate.evaluate(teacher, data.test, data, batch_size=t.eval_batch_size),
    }
    if baseline is not None:
        metrics[BASELINE] = baseline.test
    comparison = _comparison(metrics, data, teacher, student, baseline_student, t.eval_batch_size)
    extra = {
        "params": params,
        "teacher_params": teacher_params,
        "teacher_flops": profiling.count_flops(teacher, example),
        "flops": profiling.count_flops(student, example),
        "train_seconds": fitted.train_seconds,
        "device": str(device),
        "comparison": comparison,
    }
    _write_summary(cfg, config, run_dir, started, teacher_source, fitted, metrics, baseline_checkpoint, extra)
    ui.metrics_table(
        f"distill: student best epoch {fitted.state.best_epoch}, test split",
        {k: v for k, v in metrics.items() if k != "val"},
    )
    log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in comparison.items()))
    plot = run_dir / COMPARISON_PLOT
    columns = {
        "teacher": {**metrics["teacher"], "params": teacher_params, "flops": extra["teacher_flops"]},
        "student (KD)": {**metrics["test"], "params": params, "flops": extra["flops"]},
    }
    if baseline is not None:
        columns["student (no KD)"] = {**metrics[BASELINE], "params": params, "flops": extra["flops"]}
    title = f"distill: teacher vs student, test split (T={d.temperature}, alpha={d.alpha})"
    shown = [comparison["metric"], "loss", "params", "flops"]
    callbacks.guarded(plot, lambda: reports.comparison_plot(plot, columns, shown, title=title))


def _fit(cfg, student, baseline_student, data, kd, run_dir, config, device, widths):
    """The distilled student's fit and, with baseline=true, the same student's fit without the teacher."""
    t = cfg.trainer
    resume = bool(cfg.resume)
    # Both fits start from the same weights and RNG state (a resume restores its own): the baseline differs from the
    # distilled student only in the loss, so with alpha=0 the two are the same run.
    env.seed_everything(t.seed, t.deterministic)
    stamp = [_StructureStamp(run_dir / "checkpoints", widths)] if widths else []
    fitted = session.fit(
        student,
        data,
        cfg,
        run_dir,
        config,
        device=device,
        resume=resume,
        compute_loss=kd,
        label="distill",
        extra_callbacks=stamp,
    )
    baseline, baseline_checkpoint = None, None
    if baseline_student is not None:
        env.seed_everything(t.seed, t.deterministic)
        stamp = [_StructureStamp(run_dir / BASELINE / "checkpoints", widths)] if widths else []
        baseline = session.fit(
            baseline_student,
            data,
            cfg,
            run_dir / BASELINE,
            config,
            device=device,
            resume=resume,
            label=BASELINE,
            extra_callbacks=stamp,
        )
        baseline_checkpoint = rundir.relative(run_dir / BASELINE / "checkpoints" / "best.pt")

    return fitted, baseline, baseline_checkpoint


def _write_summary(cfg, config, run_dir, started, teacher_source, fitted, metrics, baseline_checkpoint, extra):
    """summary.json: the train contract for the student, lineage to the teacher's run, KD settings and comparison."""
    d = cfg.distiller
    contract.write_summary(
        run_dir,
        contract.Summary(
            "distill",
            config,
            wall_s=time.perf_counter() - started,
            metrics=metrics,
            lineage=teacher_source.lineage,
            record=contract.DistillRecord(
                checkpoint=rundir.relative(run_dir / "checkpoints" / "best.pt"),
                best_epoch=fitted.state.best_epoch,
                epochs_run=fitted.epochs_run,
                teacher=teacher_source.label,
                temperature=float(d.temperature),
                alpha=float(d.alpha),
                baseline_checkpoint=baseline_checkpoint,
            ),
            extra=extra,
        ),
    )


def _student(cfg: DictConfig, data: Data, device: torch.device) -> tuple[nn.Module, str, dict | None]:
    """The student, the task it was built for and its pruned layer widths (None: as its config builds it): from the
    model group, or init_from's stored model and weights."""
    if not cfg.init_from:
        return models.build(cfg.model, data.input_shape).to(device), data.task, None
    refused = _typed_overrides("model")
    if refused:
        raise UsageError(f"init_from={cfg.init_from} sets the student (the model stored there): drop {refused[0]}")
    init = sources.resolve(run=cfg.init_from, trusted=cfg.trust_targets)
    if init.kind != "checkpoint":
        raise UsageError(f"init_from needs a run with checkpoints/best.pt, {init.label} is a {init.kind}")
    cfg.model = init.config["model"]
    # A structurally pruned run's model is narrower than its config builds it: load_model narrows it to the stored
    # widths, and the distill checkpoints carry them too (_StructureStamp) so later commands rebuild the same.
    student = sources.load_model(init, device).train()
    widths = ckpt.load(init.path).get(ckpt.STRUCTURE)
    return student, init.config["dataset"]["task"], widths


class _StructureStamp(loop.Callback):
    """A pruned student's checkpoints carry its layer widths (checkpoint.STRUCTURE), as a prune run's do, so that
    eval/quantize/export/resume rebuild the narrow student from the config. Runs after session.fit's Checkpointer."""

    rank_zero_only = True

    def __init__(self, folder: Path, widths: dict):
        self.folder, self.widths = folder, widths

    def on_fit_start(self, fit: loop.Loop) -> None:
        self._stamp(callbacks.LAST)

    def on_epoch_end(self, fit: loop.Loop, result) -> None:
        if result.improved:
            self._stamp(callbacks.BEST)
        self._stamp(callbacks.LAST)

    def _stamp(self, name: str) -> None:
        path = self.folder / name
        if path.is_file():
            ckpt.save(path, {**ckpt.load(path), ckpt.STRUCTURE: self.widths})


def _outputs(model: nn.Module, example: torch.Tensor) -> int:
    """How many outputs `model` gives for the teacher's data ([batch] and [batch, 1] are both one output)."""
    with torch.no_grad():
        return math.prod(model.eval()(example).shape[1:])


def _comparison(
    metrics: dict, data: Data, teacher: nn.Module, student: nn.Module, baseline: nn.Module | None, batch_size: int
) -> dict:
    """The headline test metric of teacher, student and baseline side by side, and (classification) how often the
    student's and the baseline's top-1 agree with the teacher's: distillation should raise both."""
    metric = "accuracy" if data.task == "classification" else "r2"
    comparison = {"metric": metric, "teacher": metrics["teacher"][metric], "student": metrics["test"][metric]}
    if baseline is not None:
        comparison |= {
            BASELINE: metrics[BASELINE][metric],
            "gain_over_baseline": metrics["test"][metric] - metrics[BASELINE][metric],
        }
    if data.task == "classification":
        for name, model in (("student", student), (BASELINE, baseline)):
            if model is not None:
                agreement = evaluate.evaluate(model, data.test, data, batch_size=batch_size, reference=teacher)
                comparison[f"{name}_teacher_agreement"] = agreement["top1_agreement"]
    return comparison


def _typed_overrides(section: str) -> list[str]:
    """This run's command-line overrides of a config section (`model=mlp`, `+model.foo=1`), replayed ones included."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if re.match(rf"[+~]*{section}([.=]|$)", o)]


def _name(config) -> str:
    return config["model"]["_target_"].rsplit(".", 1)[-1]
