"""`dlrun eval`: test metrics, size, FLOPs and batch-1 latency of a checkpoint, quantized program or artifact.

    dlrun eval                       # the latest train run's best checkpoint
    dlrun eval run=outputs/quantize/2026-11-22_10-00-00
    dlrun eval artifact=outputs/export/2026-11-22_10-05-00/model.pte
    dlrun eval artifact=outputs/export/2026-11-22_10-05-00/model.bpte   # the bundled self-check, pass/fail

Two sizes, because a file size alone misleads: `weights_bytes` (the model's tensors: fp32 and int8
compare like with like) and `file_bytes` (the evaluated file, which for a checkpoint also holds the
optimizer's state and for a program its graph). A runtime artifact has only its file size.

A BundledProgram (.bpte, `dlrun export format=pte bundle=true`) is not evaluated on the dataset: the runtime runs
each bundled input and compares its output with the bundled expected one, within the tolerances the export
recorded (or bundle_rtol=/bundle_atol=). Any mismatch, or a runtime crash, exits 1.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.core import contract, profiling, rundir, sources, ui
from dlrun.core.errors import DlrunError, UsageError
from dlrun.training import env, evaluate

log = logging.getLogger("dlrun")


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    if cfg.artifact and Path(cfg.artifact).suffix == ".bpte":
        check_bundle(cfg, Path(cfg.artifact), started)
        return
    source = sources.resolve(
        run=cfg.run, ckpt=cfg.ckpt, artifact=cfg.artifact, default=("train",), trusted=cfg.trust_targets
    )
    # Quantized programs and runtime artifacts run on the CPU they were made for.
    device = env.resolve_device(cfg.device) if source.kind == "checkpoint" else env.resolve_device("cpu")
    data = sources.load_data(source, device)
    predict = sources.load_predictor(source, device)
    log.info(f"eval {source.kind} {source.label} on {len(data.test)} test samples ({device})")

    batch_size = min(cfg.batch_size, source.max_batch or cfg.batch_size)
    test = evaluate.evaluate(predict, data.test, data, batch_size=batch_size, confusion=True)
    example = data.example()
    record = contract.EvalRecord(
        kind=source.kind,
        evaluated=source.label,
        file_bytes=source.path.stat().st_size,
        weights_bytes=profiling.tensor_bytes(predict) if isinstance(predict, nn.Module) else None,
    )
    extra = {"latency_ms": profiling.latency_ms(predict, example, repeats=cfg.latency_repeats)}
    if source.kind == "checkpoint":
        extra["params"] = profiling.count_params(predict)
        extra["flops"] = profiling.count_flops(predict, example)
    contract.write_summary(
        rundir.current(),
        contract.Summary(
            "eval",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=record,
            metrics={"test": test},
            lineage=source.lineage,
            extra=extra,
        ),
    )
    shown = {
        "weights_bytes": record.weights_bytes,
        "file_bytes": record.file_bytes,
        "latency_ms_p50": extra["latency_ms"]["p50"],
        "params": extra.get("params"),
        "flops": extra.get("flops"),
    }
    ui.metrics_table(
        f"eval of the {source.kind} (test split)",
        {"test": {**test, **{k: v for k, v in shown.items() if v is not None}}},
    )


def check_bundle(cfg: DictConfig, path: Path, started: float) -> None:
    """Run a .bpte's bundled check in a child process: a table of pass/fail per input, exit 1 on any failure."""
    from dlrun.deploy import bundle, runtime

    if not path.is_file():
        raise UsageError(f"artifact {path} does not exist")
    summary = contract.read_summary(path.parent / rundir.SUMMARY, "export")
    recorded = summary.extra.get("bundle")
    if not isinstance(recorded, dict) or Path(recorded.get("file", "")).name != path.name:
        raise UsageError(f"{path.parent / rundir.SUMMARY} records no bundle {path.name} (export it with bundle=true)")
    rtol = cfg.bundle_rtol if cfg.bundle_rtol is not None else recorded["rtol"]
    atol = cfg.bundle_atol if cfg.bundle_atol is not None else recorded["atol"]
    try:
        results = bundle.check_bundle(path, recorded["inputs"], rtol=rtol, atol=atol)
    except runtime.ArtifactRunError as exc:  # it does not load, or the runtime crashed
        raise DlrunError(str(exc)) from None
    failed = [r for r in results if not r.passed]
    label = rundir.relative(path)
    contract.write_summary(
        rundir.current(),
        contract.Summary(
            "eval",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=contract.EvalRecord(
                kind="bundle", evaluated=label, weights_bytes=None, file_bytes=path.stat().st_size
            ),
            metrics={
                "bundle": {"inputs": len(results), "passed": len(results) - len(failed), "rtol": rtol, "atol": atol}
            },
            lineage=summary.lineage,
            extra={"bundle_cases": [r.__dict__ for r in results]},
        ),
    )
    rows = [{"input": r.index, "result": "pass" if r.passed else "FAIL", "rtol": rtol, "atol": atol} for r in results]
    ui.rows_table(f"bundled check of {label} in the ExecuTorch runtime", rows)
    if failed:
        raise DlrunError(
            f"bundled check failed on {len(failed)} of {len(results)} inputs "
            f"({', '.join(str(r.index) for r in failed)}) at rtol={rtol:g}, atol={atol:g}"
        )
