"""`dlrun bench`: one table answering, for every variant of a trained model, how big, how accurate, how fast.

    dlrun bench                        # the latest train run and everything quantized/exported from it
    dlrun bench run=RUN_DIR formats=[eager,pte]
    dlrun bench export_missing=true    # first make the standard set: ptq-xnnpack .pte, fp32 .pte, fp32 and int8 .onnx

Variants are found through lineage: every prune/quantize/export/distill summary.json records its `train_run`; a
variant whose lineage passes through a prune run is named `pruned ...`, through a distill run (a student taught by
this run) `distilled <model> ...`, and shows that model's params and FLOPs.
A variant that fails is a row marked `failed: <reason>`; it never aborts the table.
Sizes: `weights_mb` is the bytes of the variant's tensors, the like-for-like size of fp32 vs int8 (none for
runtime artifacts, which PyTorch cannot look into); `file_mb` is the file it loads from (for the fp32 rows the
train checkpoint, which also holds the optimizer's state). `metric` is measured on `samples` test samples.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.core import contract, profiling, reports, rundir, sources, ui
from dlrun.core.errors import UsageError
from dlrun.training import evaluate

log = logging.getLogger("dlrun")
FORMATS = ("eager", "compile", "quantized", "pte", "pt2", "onnx")
# The standard set `export_missing=true` creates: (command, overrides, record fields of an existing run that counts
# as this one), the export of the quantized run marked by `{quantized}`.
STANDARD_SET = [
    ("quantize", ["mode=ptq", "backend=xnnpack"], {"mode": "ptq", "backend": "xnnpack"}),
    (
        "export",
        ["format=pte", "backend=xnnpack", "run={quantized}"],
        {"format": "pte", "backend": "xnnpack", "source_kind": "pt2e_int8"},
    ),
    ("export", ["format=pte", "backend=xnnpack"], {"format": "pte", "backend": "xnnpack", "source_kind": "fp32"}),
    ("export", ["format=onnx"], {"format": "onnx", "backend": "onnxruntime", "source_kind": "fp32"}),
    # The same int8 program in ONNX Runtime (QDQ graph): the other CPU runtime users choose between.
    (
        "export",
        ["format=onnx", "run={quantized}"],
        {"format": "onnx", "backend": "onnxruntime", "source_kind": "pt2e_int8"},
    ),
]
TABLE_COLUMNS = (
    "variant",
    "status",
    "metric",
    "samples",
    "top1_agreement",
    "weights_mb",
    "file_mb",
    "latency_ms_p50",
    "latency_ms_p90",
    "throughput_sps",
    "speedup",
)


@dataclass
class Variant:
    name: str
    format: str
    path: Path
    run: str  # the run directory it came from
    load: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    max_batch: int | None = None  # None: any batch size
    facts: dict | None = None  # params and FLOPs of a pruned model; None: the train run's model


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
    model_facts = {"params": profiling.count_params(fp32), "flops": profiling.count_flops(fp32, example)}
    variants = [v for v in _variants(source, fp32, train_run) if v.format in cfg.formats]
    threads = torch.get_num_threads()
    log.info(
        f"bench {rundir.relative(train_run)}: {len(variants)} variants on {len(data.test)} test samples, "
        f"{threads} threads"
    )

    rows = []
    for variant in variants:
        rows.append(_row(variant, fp32, data, example, cfg, model_facts))
        log.info(f"  {variant.name}: {rows[-1]['status']}")
    _add_speedups(rows)

    run_dir = rundir.current()
    reports.write_table(run_dir, "bench", rows)
    _plot(run_dir / "bench.png", rows, "test accuracy" if data.task == "classification" else "test MSE")
    contract.write_summary(
        run_dir,
        contract.Summary(
            "bench",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=contract.BenchRecord(rows=rows, threads=threads),
            lineage=source.lineage,
        ),
    )
    ui.rows_table(
        f"bench: {model_facts['params']:,} params, "
        f"{model_facts['flops']:,} FLOPs, {threads} threads (all columns in bench.csv)",
        [{k: row.get(k) for k in TABLE_COLUMNS} for row in rows],
    )


def _variants(source: sources.Source, fp32, train_run: Path) -> list[Variant]:
    """Eager fp32, compiled fp32, then every prune/quantize/export run whose lineage leads to `train_run`."""
    from dlrun.deploy.program import load_program
    from dlrun.deploy.runtime import load_runner

    variants = [
        Variant("fp32 eager", "eager", source.path, train_run.name, lambda: fp32),
        Variant("fp32 torch.compile", "compile", source.path, train_run.name, lambda: torch.compile(fp32)),
    ]
    # Run directory -> the prune run its model comes from (None: the train run's model), along prune <- quantize
    # <- export lineages.
    origins = {run_dir.resolve(): _Origin.of(summary) for run_dir, summary in _descendants("prune", train_run)}
    for run_dir, origin in list(origins.items()):
        # A prune checkpoint holds the train run's config (checked above) and the pruned widths.
        best = run_dir / "checkpoints" / "best.pt"
        checkpoint = sources.Source("checkpoint", best, source.config, run_dir, train_run)
        variants.append(
            Variant(
                f"{origin.label} fp32 eager",
                "eager",
                best,
                run_dir.name,
                lambda c=checkpoint: sources.load_model(c),
                facts=origin.facts,
            )
        )
    # Distilled students (their teacher's lineage leads here) are variants too, and roots of their own quantize/export
    # runs, whose lineage starts at the distill run.
    distilled = _descendants("distill", train_run)
    for run_dir, summary in distilled:
        origin = origins[run_dir.resolve()] = _Origin.distilled(summary)
        # The student's stored config is checked (config.trust) when it is loaded: a refused one is a failed row.
        load = lambda r=run_dir: sources.load_model(sources.from_run_dir(r))  # noqa: E731
        best = run_dir / "checkpoints" / "best.pt"
        variants.append(Variant(f"{origin.label} fp32 eager", "eager", best, run_dir.name, load, facts=origin.facts))
    roots = [train_run, *(run_dir for run_dir, _ in distilled)]
    for run_dir, summary in _descendants("quantize", *roots):
        origin = origins[run_dir.resolve()] = origins.get(_source_run(summary))
        quantized: contract.QuantizeRecord = summary.record
        program = run_dir / sources.QUANTIZED_PROGRAM
        # x86_inductor programs get their speed from inductor's int8 kernels, i.e. through torch.compile.
        if quantized.backend == "x86_inductor":
            how, load = "compiled", lambda p=program: torch.compile(load_program(p))
        else:
            how, load = "(eager reference)", lambda p=program: load_program(p)
        name = f"{quantized.mode} {quantized.backend} program {how}"
        variants.append(
            Variant(
                _Origin.prefix(origin) + name, "quantized", program, run_dir.name, load, facts=origin and origin.facts
            )
        )
    for run_dir, summary in _descendants("export", *roots):
        origin = origins.get(_source_run(summary))
        exported: contract.ExportRecord = summary.record
        artifact = run_dir / Path(exported.artifact).name
        what = exported.source_kind + ("" if exported.verification.passed else " (failed its export verification)")
        variants.append(
            Variant(
                f"{_Origin.prefix(origin)}{what} .{exported.format} {exported.backend}",
                exported.format,
                artifact,
                run_dir.name,
                lambda a=artifact: load_runner(a),
                max_batch=exported.largest_batch,
                facts=origin and origin.facts,
            )
        )
    return variants


@dataclass(frozen=True)
class _Origin:
    """The prune or distill run a variant comes from: how to name it, and its model's params and FLOPs."""

    label: str
    facts: dict

    @classmethod
    def distilled(cls, summary: contract.Summary) -> _Origin:
        student = summary.config["model"]["_target_"].rsplit(".", 1)[-1].lower()
        return cls(f"distilled {student}", {k: summary.extra.get(k) for k in ("params", "flops")})

    @classmethod
    def of(cls, summary: contract.Summary) -> _Origin:
        record: contract.PruneRecord = summary.record
        if record.method == "unstructured":
            label = f"sparse {record.ratio:.0%}"  # zeros only: the same size as the train model
        elif record.flops_ratio is not None:
            label = f"pruned {record.flops_ratio:.0%} FLOPs"
        else:
            label = f"pruned {record.ratio:.0%}"
        return cls(label, {k: summary.extra.get(k) for k in ("params", "flops")})

    @staticmethod
    def prefix(origin: _Origin | None) -> str:
        return f"{origin.label} " if origin else ""


def _source_run(summary: contract.Summary) -> Path | None:
    """The resolved run a derived run read its model from (relative paths: to the working directory, as
    _descendants reads train_run)."""
    lineage = summary.lineage
    return Path(lineage.source_run).resolve() if lineage and lineage.source_run else None


def _row(variant: Variant, fp32, data, example, cfg, model_facts: dict) -> dict:
    """One table row; a broken variant (missing file, runtime error) is a row with status `failed: ...`."""
    row = {
        "variant": variant.name,
        "format": variant.format,
        "run": variant.run,
        "status": "ok",
        "weights_mb": None,
        "file_mb": None,
        **(variant.facts or model_facts),
    }
    try:
        row["file_mb"] = variant.path.stat().st_size / 1e6  # a deleted artifact is a failed row too
        row.update(_measure(variant, fp32, data, example, cfg))
    except Exception as exc:  # a broken variant is a row, never a crash
        row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return row


def _measure(variant: Variant, fp32, data, example, cfg) -> dict:
    predict = variant.load()
    eval_batch = min(cfg.throughput_batch, variant.max_batch or cfg.throughput_batch)
    metrics = evaluate.evaluate(predict, data.test, data, batch_size=eval_batch, reference=fp32)
    latency = profiling.latency_ms(predict, example, repeats=cfg.latency_repeats, warmup=cfg.warmup)
    out = {
        "weights_mb": profiling.tensor_bytes(predict) / 1e6 if isinstance(predict, nn.Module) else None,
        "metric": metrics.get("accuracy", metrics.get("mse")),
        "samples": metrics["samples"],
        "top1_agreement": metrics.get("top1_agreement"),
        "max_abs_diff": metrics["max_abs_diff"],
        "latency_ms_p50": latency["p50"],
        "latency_ms_p90": latency["p90"],
    }
    if variant.max_batch is None or variant.max_batch >= cfg.throughput_batch:
        out["throughput_sps"] = profiling.throughput(
            predict, example, batch=cfg.throughput_batch, repeats=cfg.throughput_repeats
        )
    return out


def _add_speedups(rows: list[dict]) -> None:
    """Batch-1 latency speedup over the fp32 eager row (None without a measured eager row)."""
    baseline = next((r["latency_ms_p50"] for r in rows if r["format"] == "eager" and r["status"] == "ok"), None)
    for row in rows:
        row["speedup"] = baseline / row["latency_ms_p50"] if baseline and row.get("latency_ms_p50") else None


def _descendants(command: str, *roots: Path) -> list[tuple[Path, contract.Summary]]:
    """(run dir, summary) of every completed `command` run whose lineage's train_run is one of `roots` (the train
    run, or a distill run for its student's variants), oldest first. A run whose summary.json cannot be read is
    skipped with a warning: it cannot say whose variant it is."""
    wanted = {root.resolve() for root in roots}
    found = []
    for run_dir in rundir.completed_runs(command):
        try:
            summary = contract.read_summary(run_dir, command)
        except UsageError as exc:
            log.warning(f"warning: skipped {rundir.relative(run_dir)}: {exc}")
            continue
        lineage = summary.lineage
        if lineage and lineage.train_run and Path(lineage.train_run).resolve() in wanted:
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
        existing = [
            run_dir
            for run_dir, summary in _descendants(command, train_run)
            if all(getattr(summary.record, k) == v for k, v in fields.items())
            and (command != "export" or summary.record.verification.passed)
            and (source is None or Path(summary.lineage.source_run or "").resolve() == source.resolve())
        ]
        if existing:
            log.info(
                f"export_missing: {command} {' '.join(f'{k}={v}' for k, v in fields.items())} exists: "
                f"{rundir.relative(existing[-1])}"
            )
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


def _plot(path: Path, rows: list[dict], metric_label: str) -> None:
    """bench.png: metric vs batch-1 latency, one legend entry per measured variant."""
    measured = [r for r in rows if r["status"] == "ok" and r.get("metric") is not None]
    repeated = {name for name, count in Counter(r["variant"] for r in measured).items() if count > 1}
    points = [
        (f"{r['variant']} ({r['run']})" if r["variant"] in repeated else r["variant"], r["latency_ms_p50"], r["metric"])
        for r in measured
    ]
    samples = f" on {measured[0]['samples']} samples" if measured else ""  # every variant sees the same test split
    reports.tradeoff_plot(
        path,
        points,
        xlabel="batch-1 latency p50 (ms, log scale)",
        ylabel=metric_label + samples,
        title=f"{metric_label} vs latency per variant",
        log_x=True,
    )
