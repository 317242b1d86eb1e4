"""`dlrun bench`: one table answering, for every variant of a trained model, how big, how accurate, how fast.

    dlrun bench                        # the latest train run and everything quantized/exported from it
    dlrun bench run=RUN_DIR formats=[eager,pte]
    dlrun bench export_missing=true    # first make the standard set: ptq-xnnpack .pte, fp32 .pte, fp32 .onnx

Variants are found through lineage: every quantize/export summary.json records its `train_run`.
A variant that fails is a row marked `failed: <reason>`; it never aborts the table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from dlrun.core import contract, files, profiling, rundir, sources, ui
from dlrun.core.errors import UsageError
from dlrun.training import evaluate

log = logging.getLogger("dlrun")
FORMATS = ("eager", "compile", "quantized", "pte", "pt2", "onnx")
# The standard set `export_missing=true` creates: (command, overrides, summary fields of an existing run that counts
# as this one), the export of the quantized run marked by `{quantized}`.
STANDARD_SET = [
    ("quantize", ["mode=ptq", "backend=xnnpack"], {"mode": "ptq", "backend": "xnnpack"}),
    ("export", ["format=pte", "backend=xnnpack", "run={quantized}"], {"format": "pte", "backend": "xnnpack", "source_kind": "pt2e_int8"}),
    ("export", ["format=pte", "backend=xnnpack"], {"format": "pte", "backend": "xnnpack", "source_kind": "fp32"}),
    ("export", ["format=onnx"], {"format": "onnx", "backend": "onnxruntime", "source_kind": "fp32"}),
]


@dataclass
class Variant:
    name: str
    format: str
    path: Path
    run: str  # the run directory it came from
    load: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    max_batch: int | None = None  # None: any batch size


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    unknown = [f for f in cfg.formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown bench format(s) {', '.join(unknown)}; available: {', '.join(FORMATS)}")
    train_run = rundir.run_dir_arg(cfg.run) if cfg.run else rundir.latest_run("train")
    source = sources.from_run_dir(train_run, cfg.trust_targets)
    if source.kind != "checkpoint":
        raise UsageError(f"bench needs a train run, {train_run} is a {source.kind} run")
    if cfg.export_missing:
        _export_standard_set(train_run)
    cpu = torch.device("cpu")
    data = sources.load_data(source, cpu)
    fp32 = sources.load_model(source, cpu)
    example = data.example(batch=2)
    flops = profiling.count_flops(fp32, example)
    params = profiling.count_params(fp32)
    variants = [v for v in _variants(source, fp32, train_run) if v.format in cfg.formats]
    log.info(f"bench {rundir.relative(train_run)}: {len(variants)} variants on {len(data.test)} test samples, "
             f"{torch.get_num_threads()} threads")

    rows, baseline = [], None
    for variant in variants:
        row = {"variant": variant.name, "format": variant.format, "run": variant.run, "status": "ok",
               "size_mb": None, "params": params, "flops": flops}
        try:
            row["size_mb"] = variant.path.stat().st_size / 1e6  # a deleted artifact is a failed row too
            row.update(_measure(variant, fp32, data, example, cfg))
        except Exception as exc:  # a broken variant is a row, never a crash
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if variant.format == "eager" and row["status"] == "ok":
            baseline = row["latency_ms_p50"]
        row["speedup"] = baseline / row["latency_ms_p50"] if baseline and row.get("latency_ms_p50") else None
        rows.append(row)
        log.info(f"  {variant.name}: {row['status']}")

    run_dir = rundir.current()
    _write_reports(run_dir, rows, data.task)
    contract.write_summary(
        run_dir, "bench", OmegaConf.to_container(cfg, resolve=True), rows=rows, threads=torch.get_num_threads(),
        train_run=rundir.relative(train_run), source_config=source.config, wall_s=time.perf_counter() - started,
    )
    shown = ("variant", "status", "size_mb", "metric", "top1_agreement", "latency_ms_p50", "latency_ms_p90", "throughput_sps", "speedup")
    ui.rows_table(f"bench {rundir.relative(train_run)}: {params:,} params, {flops:,} FLOPs, {torch.get_num_threads()} threads "
                  f"(all columns in bench.csv)", [{k: row.get(k) for k in shown} for row in rows])


def _variants(source: sources.Source, fp32, train_run: Path) -> list[Variant]:
    """Eager fp32, compiled fp32, then every quantize/export run whose lineage leads to `train_run`."""
    from dlrun import exporting
    from dlrun.compression import quantization

    variants = [
        Variant("fp32 eager", "eager", source.path, train_run.name, lambda: fp32),
        Variant("fp32 torch.compile", "compile", source.path, train_run.name, lambda: torch.compile(fp32)),
    ]
    for command in ("quantize", "export"):
        for run_dir, summary in _descendants(command, train_run):
            if command == "quantize":
                name = f"{summary['mode']} {summary['backend']}"
                program = run_dir / sources.QUANTIZED_PROGRAM
                # x86_inductor programs get their speed from inductor's int8 kernels, i.e. through torch.compile.
                compiled = summary["backend"] == "x86_inductor"
                load = (lambda p=program: torch.compile(quantization.load_program(p))) if compiled else (
                    lambda p=program: quantization.load_program(p))
                variants.append(Variant(f"{name} program{' compiled' if compiled else ' (eager reference)'}", "quantized", program, run_dir.name, load))
            else:
                artifact = run_dir / Path(summary["artifact"]).name
                what = "fp32" if summary.get("source_kind") == "fp32" else summary.get("source_kind", "?")
                if not summary.get("verification", {}).get("passed", True):
                    what += " (failed its export verification)"
                config = summary["config"]["export"]
                variants.append(Variant(
                    f"{what} .{summary['format']} {summary['backend']}", summary["format"], artifact, run_dir.name,
                    lambda a=artifact: exporting.load_runner(a),
                    max_batch=config["max_batch"] if config.get("dynamic_batch", True) else 1,
                ))
    return variants


def _measure(variant: Variant, fp32, data, example, cfg) -> dict:
    predict = variant.load()
    eval_batch = min(cfg.throughput_batch, variant.max_batch or cfg.throughput_batch)
    metrics = evaluate.evaluate(predict, data.test, data, batch_size=eval_batch, reference=fp32)
    latency = profiling.latency_ms(predict, example, repeats=cfg.latency_repeats, warmup=cfg.warmup)
    out = {
        "metric": metrics.get("accuracy", metrics.get("mse")),
        "top1_agreement": metrics.get("top1_agreement"),
        "max_abs_diff": metrics["max_abs_diff"],
        "latency_ms_p50": latency["p50"],
        "latency_ms_p90": latency["p90"],
    }
    if variant.max_batch is None or variant.max_batch >= cfg.throughput_batch:
        out["throughput_sps"] = profiling.throughput(predict, example, batch=cfg.throughput_batch, repeats=cfg.throughput_repeats)
    return out


def _descendants(command: str, train_run: Path) -> list[tuple[Path, dict]]:
    """(run dir, summary) of every completed `command` run whose lineage leads to `train_run`, oldest first."""
    found = []
    for run_dir in rundir.completed_runs(command):
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        if summary.get("train_run") and Path(summary["train_run"]).resolve() == train_run.resolve():
            found.append((run_dir, summary))
    return found


def _export_standard_set(train_run: Path) -> None:
    """Run the standard quantize/export commands that have no run yet, each as its own run (own run dir and lineage)."""
    quantized = None
    for command, overrides, fields in STANDARD_SET:
        needs_quantized = any("{quantized}" in o for o in overrides)
        if needs_quantized and quantized is None:
            log.warning(f"export_missing: no quantized run to {command} ({' '.join(overrides)}): skipped")
            continue
        source = quantized if needs_quantized else None
        existing = [run_dir for run_dir, summary in _descendants(command, train_run)
                    if all(summary.get(k) == v for k, v in fields.items())
                    and (command != "export" or summary.get("verification", {}).get("passed"))
                    and (source is None or Path(summary.get("source_run") or "").resolve() == source.resolve())]
        if existing:
            log.info(f"export_missing: {command} {' '.join(f'{k}={v}' for k, v in fields.items())} exists: {rundir.relative(existing[-1])}")
            if command == "quantize":
                quantized = existing[-1]
            continue
        args = [o.replace("{quantized}", str(quantized)) for o in overrides]
        if not any(a.startswith("run=") for a in args):
            args.append(f"run={train_run}")
        log.info(f"export_missing: dlrun {command} {' '.join(args)}")
        done = subprocess.run([sys.executable, "-m", "dlrun", command, *args], capture_output=True, text=True)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning(f"  dlrun {command} {' '.join(args)} failed: {message}")
            continue
        if command == "quantize":
            quantized = rundir.completed_runs("quantize")[-1]


def _write_reports(run_dir: Path, rows: list[dict], task: str) -> None:
    """bench.csv, bench.json, bench.md and bench.png (metric vs latency per variant)."""
    headers = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=headers)
    writer.writeheader()
    writer.writerows(rows)
    files.atomic_write_text(run_dir / "bench.csv", buffer.getvalue())
    files.write_json(run_dir / "bench.json", rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(ui.fmt(row.get(h, "")) if row.get(h) is not None else "" for h in headers) + " |" for row in rows]
    files.atomic_write_text(run_dir / "bench.md", "\n".join(lines) + "\n")
    _plot(run_dir / "bench.png", rows, "test accuracy" if task == "classification" else "test MSE")


def _plot(path: Path, rows: list[dict], metric_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get("metric") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in ok:
        ax.scatter(row["latency_ms_p50"], row["metric"], s=40)
        ax.annotate(row["variant"], (row["latency_ms_p50"], row["metric"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
    ax.set_ylabel(metric_label)
    ax.set_title("accuracy vs latency per variant")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())
