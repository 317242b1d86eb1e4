"""`dlrun quantize`: make a trained model int8 with the real PyTorch stack, then say exactly what was lost.

    dlrun quantize mode=ptq backend=xnnpack          # PT2E static, calibrated on training batches
    dlrun quantize mode=dynamic backend=x86_inductor # PT2E dynamic activations
    dlrun quantize mode=qat backend=xnnpack          # PT2E quantization-aware fine-tuning
    dlrun quantize mode=weight_only quantizer.dtype=int4
    dlrun quantize mode=ptq max_drop=0.5             # keep the fewest most-sensitive layers float within 0.5 pt
    dlrun quantize mode=ptq report=sensitivity       # the per-layer table (SQNR, accuracy) without a budget

The quantized program is saved with torch.export.save as model.pt2 (dynamic batch), which
`dlrun eval run=...`, `dlrun export` and `dlrun bench` load. fp32 and int8 are compared on the same
test split: metric, top-1 agreement, max abs output difference, size, latency and throughput (comparison.png).
Under max_drop the program is the mixed one (float layers are left unannotated, so they stay float through
export); a budget that even max_float_layers float layers cannot meet exits 1 and saves no program.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dlrun.compression import quantization, sensitivity
from dlrun.config import capabilities
from dlrun.core import contract, profiling, reports, rundir, sources, ui
from dlrun.core.errors import UsageError
from dlrun.deploy.program import export_program, load_program, save_program
from dlrun.training import callbacks, env, evaluate, loop, schedulers

log = logging.getLogger("dlrun")
COMPARISON_PLOT = "comparison.png"  # before/after bars: fp32 vs the quantized program


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    q = cfg.quantizer
    capabilities.check_supported(q.mode, q.backend)
    if q.mode == "ptq" and q.calib_batches < 1:  # before loading anything
        raise UsageError("quantizer.calib_batches must be >= 1 for ptq (calibration sets the activation ranges)")
    source = sources.resolve(run=cfg.run, ckpt=cfg.ckpt, default=("train",), trusted=cfg.trust_targets)
    capabilities.check_model_supported(source.config["model"], f"quantize/{q.backend}")
    if source.kind != "checkpoint":
        raise UsageError(f"quantize needs a train run or checkpoint, got a {source.kind} ({source.label})")
    run_dir = rundir.current()
    cpu = torch.device("cpu")  # int8 kernels (XNNPACK, x86) run on the CPU
    data = sources.load_data(source, cpu)
    fp32 = sources.load_model(source, cpu)
    _check_exclude(fp32, list(q.exclude))
    example = data.example(batch=2)
    log.info(
        f"quantize {source.label}: mode={q.mode} backend={q.backend} "
        f"({len(data.train)} train / {len(data.test)} test samples)"
    )

    exclude = list(q.exclude)
    # qat calibrates only for the accuracy-aware search, which measures layers with PTQ
    calibrated = q.mode == "ptq" or (q.mode == "qat" and _accuracy_aware_on(cfg))
    calibration = list(_calibration(data, q)) if calibrated else []
    tuned = _accuracy_aware(cfg, fp32, data, example, calibration) if _accuracy_aware_on(cfg) else None
    float_layers = tuned.float_layers if tuned else []
    qat_rows: list[dict] = []
    if q.mode == "qat":  # the float layers come from a PTQ search; QAT then trains with them excluded
        quantized, qat_rows = _quantization_aware_training(cfg, source, fp32, data, example, [*exclude, *float_layers])
    elif tuned and tuned.search:
        quantized = tuned.search.quantized  # the search's last candidate: the one that met the budget
    else:
        quantized = _post_training(q, fp32, example, calibration, exclude)
    val_drop = tuned.validation.loss(quantized) if tuned else None
    if cfg.max_drop is not None and val_drop > cfg.max_drop:  # before anything is saved: no artifact of a failure
        found = sensitivity.Search(float_layers, val_drop, False, quantized)
        raise sensitivity.budget_error(found, cfg.max_drop, len(tuned.layers), tuned.max_float, data.task)

    program = run_dir / sources.QUANTIZED_PROGRAM
    save_program(quantized, example, program)
    quantized = load_program(program)  # measure exactly what later commands will load

    report = _compare(fp32, quantized, program, data, example, cfg)
    contract.write_summary(
        run_dir,
        contract.Summary(
            "quantize",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            metrics={"test": report["quantized"], "fp32": report["fp32"]},
            lineage=source.lineage,
            record=contract.QuantizeRecord(
                mode=q.mode,
                backend=q.backend,
                dtype=q.get("dtype"),
                program=rundir.relative(program),
                size_bytes=program.stat().st_size,
                max_drop=cfg.max_drop,
                val_drop=val_drop,
                float_layers=float_layers,
                sensitivity=[dataclasses.asdict(row) for row in tuned.rows] if tuned else [],
            ),
            extra={"comparison": report["comparison"], "qat_epochs": qat_rows},
        ),
    )
    ui.metrics_table(
        f"{q.mode} ({q.backend}) vs fp32 on the test split", {"fp32": report["fp32"], "int8": report["quantized"]}
    )
    plot = run_dir / COMPARISON_PLOT
    columns = {"fp32": report["fp32"], q.mode: report["quantized"]}
    shown = [
        _headline(data.task),
        "weights_bytes",
        "program_bytes",
        "latency_ms_p50",
        f"throughput_b{cfg.throughput_batch}",
    ]
    title = f"quantize {q.mode} ({q.backend}) vs fp32, test split"
    callbacks.guarded(plot, lambda: reports.comparison_plot(plot, columns, shown, title=title))
    comparison = report["comparison"]
    log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in comparison.items()))


def _headline(task: str) -> str:
    return "accuracy" if task == "classification" else "r2"


def _check_exclude(model: torch.nn.Module, names: list[str]) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in modules:
            near = difflib.get_close_matches(name, modules, n=3)
            raise UsageError(
                f"quantizer.exclude: the model has no module '{name}'"
                + (f"; did you mean {', '.join(near)}?" if near else "")
            )


def _calibration(data, q):
    """The first `calib_batches` batches of a seeded shuffle of the training split (no augmentation)."""
    for i, (x, _) in enumerate(data.train.batches(q.calib_batch_size, shuffle_seed=0)):
        if i >= q.calib_batches:
            return
        yield x


def _post_training(q, fp32, example, calibration: list, exclude: list[str]):
    """The PT2E post-training modes and weight-only, with the `exclude` layers left float."""
    if q.mode in ("ptq", "qat"):  # qat: its accuracy-aware search measures layers with PTQ (see _accuracy_aware)
        return quantization.quantize_ptq(
            fp32, example, calibration, backend=q.backend, per_channel=q.per_channel, exclude=exclude
        )
    if q.mode == "dynamic":
        return quantization.quantize_dynamic(
            fp32, example, backend=q.backend, per_channel=q.per_channel, exclude=exclude
        )
    return quantization.quantize_weight_only(fp32, dtype=q.dtype, group_size=q.group_size, exclude=exclude)


def _accuracy_aware_on(cfg) -> bool:
    return cfg.max_drop is not None or cfg.report == "sensitivity"


@dataclasses.dataclass
class _Tuned:
    layers: list[str]  # the candidates: every layer the mode quantizes, outside quantizer.exclude
    rows: list[sensitivity.LayerSensitivity]
    validation: sensitivity.Validation
    max_float: int
    search: sensitivity.Search | None  # None without max_drop (report=sensitivity alone)

    @property
    def float_layers(self) -> list[str]:
        return self.search.float_layers if self.search else []


def _accuracy_aware(cfg, fp32, data, example, calibration: list) -> _Tuned:
    """The per-layer sensitivity table and, under max_drop, the fewest layers to keep float (searched with the
    mode itself; for qat with PTQ on the same backend, since a QAT fine-tune per candidate would cost epochs each)."""
    q = cfg.quantizer
    exclude = list(q.exclude)
    layers = sensitivity.candidate_layers(fp32, linear_only=q.mode == "weight_only", skip=exclude)
    if not layers:
        raise UsageError(f"max_drop/report: {q.mode} has no layer left to quantize outside quantizer.exclude")
    max_float = len(layers) - 1 if cfg.max_float_layers is None else min(cfg.max_float_layers, len(layers))

    def quantize(float_layers):
        return _post_training(q, fp32, example, calibration, [*exclude, *float_layers])

    validation = sensitivity.Validation.of(fp32, data)
    log.info(f"per-layer sensitivity of {len(layers)} layers on the val split ({2 * len(layers)} quantizations)")
    rows = sensitivity.analyse(fp32, layers, quantize, validation)
    search = None
    if cfg.max_drop is not None:
        search = sensitivity.search(sensitivity.ranked(rows), quantize, validation, cfg.max_drop, max_float)
    chosen = set(search.float_layers) if search else set()
    ui.rows_table(
        f"per-layer sensitivity ({q.mode}, {q.backend}; quality lost in {sensitivity.unit(data.task)}, val split)",
        [
            {
                "layer": r.layer,
                "params": r.params,
                "sqnr_db (only it int8)": r.sqnr_db,
                "lost (only it int8)": r.only_quantized,
                "lost (only it float)": r.only_float,
                "kept float": "yes" if r.layer in chosen else "",
            }
            for r in rows
        ],
    )
    if search:
        log.info(
            f"max_drop={cfg.max_drop:g}: {len(search.float_layers)} of {len(layers)} layers kept float "
            f"({', '.join(search.float_layers) or 'none'}); {search.loss:.2f} {sensitivity.unit(data.task)} lost on val"
            + ("" if search.met else " (over budget)")
        )
    return _Tuned(layers, rows, validation, max_float, search)


def _quantization_aware_training(cfg, source, fp32, data, example, exclude: list[str]):
    """Fine-tune with fake quantization, freezing ranges and BN statistics after the configured epochs."""
    q = cfg.quantizer
    train_cfg = OmegaConf.create(source.config)
    opt_cfg = cfg.optimizer if cfg.get("optimizer") is not None else train_cfg.optimizer
    sched_cfg = cfg.scheduler if cfg.get("scheduler") is not None else train_cfg.scheduler
    batch_size = q.batch_size or train_cfg.trainer.batch_size
    seed = train_cfg.trainer.seed
    env.seed_everything(seed, False)
    prepared = quantization.prepare_qat(  # on a copy: the exported graph shares fp32's parameters
        copy.deepcopy(fp32), example, backend=q.backend, per_channel=q.per_channel, exclude=exclude
    )
    optimizer, scheduler = schedulers.build_optimization(
        opt_cfg,
        sched_cfg,
        prepared.parameters(),
        train_size=len(data.train),
        batch_size=batch_size,
        epochs=q.epochs,
        lr_scale=q.lr_scale,
    )
    qat = loop.Loop(
        prepared,
        data,
        optimizer,
        scheduler,
        evaluate.loss_function(data.task),
        loop.FitConfig(epochs=q.epochs, batch_size=batch_size, seed=seed, nan_advice="Lower quantizer.lr_scale"),
        callbacks=[
            callbacks.MetricsWriter(rundir.current()),
            callbacks.EpochLog(prefix="qat "),
            quantization.QATPhase(q.disable_observers_after, q.freeze_bn_after),
        ],
        set_mode=quantization.set_qat_mode,  # an exported graph refuses .train()/.eval()
    )
    rows = qat.fit().rows  # the metric rows of train, in metrics.csv/.jsonl as train writes them
    return quantization.convert_qat(prepared), rows


def _compare(fp32, quantized, program: Path, data, example, cfg) -> dict:
    """fp32 vs quantized on the same test split, then size, batch-1 latency and batch-N throughput
    measured where each backend is meant to run (a PT2E program run eagerly is a slow reference)."""
    fp32_metrics = evaluate.evaluate(fp32, data.test, data)
    int8_metrics = evaluate.evaluate(quantized, data.test, data, reference=fp32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_program = Path(tmp) / "fp32.pt2"  # fp32 serialized the same way, for a like-for-like file size
        save_program(fp32, example, fp32_program)
        fp32_metrics["program_bytes"] = fp32_program.stat().st_size
        int8_metrics["program_bytes"] = program.stat().st_size
        runtime, fp32_fn, int8_fn = _deployed(
            cfg.quantizer.backend, fp32, quantized, data, Path(tmp), cfg.throughput_batch
        )
        for metrics, model, fn in ((fp32_metrics, fp32, fp32_fn), (int8_metrics, quantized, int8_fn)):
            metrics["weights_bytes"] = profiling.tensor_bytes(model)
            metrics["latency_ms_p50"] = profiling.latency_ms(fn, example, repeats=cfg.latency_repeats)["p50"]
            metrics[f"throughput_b{cfg.throughput_batch}"] = profiling.throughput(
                fn, example, batch=cfg.throughput_batch
            )
    # Signed so that a positive number is quality lost: accuracy down, or (regression) error up.
    quality = (
        {"accuracy_drop": fp32_metrics["accuracy"] - int8_metrics["accuracy"]}
        if data.task == "classification"
        else {"mse_increase": int8_metrics["mse"] - fp32_metrics["mse"]}
    )
    comparison = {
        "runtime": runtime,
        **quality,
        "size_ratio": int8_metrics["weights_bytes"] / fp32_metrics["weights_bytes"],
        "program_size_ratio": int8_metrics["program_bytes"] / fp32_metrics["program_bytes"],
        "latency_speedup": fp32_metrics["latency_ms_p50"] / int8_metrics["latency_ms_p50"],
        "throughput_speedup": int8_metrics[f"throughput_b{cfg.throughput_batch}"]
        / fp32_metrics[f"throughput_b{cfg.throughput_batch}"],
    }
    if "top1_agreement" in int8_metrics:
        comparison["top1_agreement"] = int8_metrics["top1_agreement"]
    comparison["max_abs_diff"] = int8_metrics["max_abs_diff"]
    return {"fp32": fp32_metrics, "quantized": int8_metrics, "comparison": comparison}


def _deployed(backend: str, fp32, quantized, data, tmp: Path, max_batch: int):
    """(runtime label, fp32 callable, int8 callable) as each backend deploys them."""
    if backend == "xnnpack":  # both lowered to ExecuTorch with the XNNPACK delegate, run by executorch.runtime
        from dlrun.deploy import lower, runtime

        example = data.example(batch=min(32, max_batch))  # lowering needs a batch >= 16 to keep the batch dynamic
        runners = []
        for name, module in (("fp32", fp32), ("int8", quantized)):
            program = export_program(module, example, dynamic_batch=True, max_batch=max_batch)
            lower.to_pte(program, tmp / f"{name}.pte", backend="xnnpack")
            runners.append(runtime.load_runner(tmp / f"{name}.pte"))
        return "executorch xnnpack .pte", *runners
    if backend == "x86_inductor":  # inductor fuses the quantize/dequantize pairs into int8 kernels
        return "torch.compile (inductor)", torch.compile(fp32), torch.compile(quantized)
    return "eager pytorch (torchao kernels)", fp32, quantized
