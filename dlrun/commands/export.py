"""`dlrun export`: write a deployable artifact and prove it runs in its own runtime with the same answers.

    dlrun export format=pte backend=xnnpack   # ExecuTorch, int8 ops delegated to XNNPACK for quantized runs
    dlrun export format=pte backend=portable
    dlrun export format=pt2
    dlrun export format=onnx                  # verified in onnxruntime

Every export is verified: the artifact is loaded in its runtime (executorch.runtime, onnxruntime,
torch.export.load), run on test samples at batch 1 and >1, and compared with the eager source model.
Agreement below the threshold fails the command (exit 1); the numbers land in summary.json either way.
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from dlrun import exporting, rundir, sources, ui
from dlrun.errors import DlrunError, UsageError

log = logging.getLogger("dlrun")
# Default pass marks (export.min_agreement / export.max_relative_diff override them). Top-1 agreement alone
# is not enough: a weight-only XNNPACK .pte kept 0.996 agreement with outputs thousands off, so the largest
# output difference relative to the largest output must stay small too (measured: fp32 <= 1.2e-6, int8 <= 0.03).
MIN_AGREEMENT = {"fp32": 0.99, "int8": 0.97}
MAX_RELATIVE_DIFF = {"fp32": 1e-3, "int8": 0.1}


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    e = cfg.export
    source = sources.resolve(run=cfg.run, ckpt=cfg.ckpt, default=("train", "quantize"), trusted=cfg.trust_targets)
    if source.kind == "artifact":
        raise UsageError(f"{source.label} is already an exported artifact; export from a train or quantize run")
    kind = source_kind(source)
    try:
        exporting.check_export_supported(e.format, e.backend, kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run_dir = rundir.current()
    data = sources.load_data(source, torch.device("cpu"))
    module = sources.load_predictor(source)
    # A dynamic batch needs an example batch >= 16, or lowering caps the batch dimension at 15.
    example = data.example(batch=min(32, e.max_batch)) if e.dynamic_batch else data.example(batch=1)
    artifact = run_dir / f"model.{e.format}"
    log.info(f"export {source.label} ({kind}) -> {rundir.relative(artifact)} [{e.format}/{e.backend}]")

    try:
        if e.format == "onnx":
            result = exporting.to_onnx(module, example, artifact, dynamic_batch=e.dynamic_batch, max_batch=e.max_batch)
        else:
            program = exporting.export_program(module, example, dynamic_batch=e.dynamic_batch, max_batch=e.max_batch)
            result = exporting.to_pte(program, artifact, backend=e.backend) if e.format == "pte" else exporting.to_pt2(program, artifact)
        runner = exporting.load_runner(artifact)
    except ValueError as exc:
        raise DlrunError(f"export failed: {str(exc).splitlines()[0]}") from None
    except ImportError as exc:  # an optional runtime (onnx, onnxruntime) is missing: the message says what to install
        raise DlrunError(str(exc)) from None

    x, y = _test_samples(data, e.verify_samples)
    batch_sizes = (1, min(32, e.max_batch)) if e.dynamic_batch else (1,)
    parity = exporting.check_parity(module, runner, x, y, batch_sizes=batch_sizes, classification=data.task == "classification")
    verdict, problem = _verdict(parity, kind, e)

    rundir.write_summary(
        run_dir, "export", OmegaConf.to_container(cfg, resolve=True),
        format=e.format, backend=e.backend, source_kind=kind, artifact=rundir.relative(artifact),
        size_bytes=result.size_bytes, delegation={"delegated_nodes": result.delegated_nodes,
                                                  "portable_nodes": result.portable_nodes, **(result.delegation or {})},
        verification={**parity.__dict__, "passed": verdict}, metrics={"test": {"accuracy": parity.accuracy}},
        source_run=rundir.relative(source.run_dir) if source.run_dir else None,
        train_run=rundir.relative(source.train_run) if source.train_run else None,
        source_config=source.config, wall_s=time.perf_counter() - started,
    )
    shown = {"size_bytes": result.size_bytes, **{k: v for k, v in parity.__dict__.items() if v is not None and k != "batch_sizes"}}
    if result.delegated_nodes is not None:
        shown.update(delegated_nodes=result.delegated_nodes, portable_nodes=result.portable_nodes)
    ui.metrics_table(f"{rundir.relative(artifact)} verified in its runtime vs the eager source", {"artifact": shown})
    if not verdict:
        raise DlrunError(f"verification failed: {problem} ({rundir.relative(artifact)} kept for inspection)")


def source_kind(source: sources.Source) -> str:
    """fp32 checkpoint, or which kind of quantized program (see exporting.SOURCE_KINDS)."""
    if source.kind == "checkpoint":
        return "fp32"
    summary = rundir.read_json(source.run_dir / rundir.SUMMARY)
    return exporting.quantized_source_kind(summary["mode"], summary["backend"], summary.get("dtype") or "int8")


def _test_samples(data, n: int):
    xs, ys, seen = [], [], 0
    for x, y in data.test.batches(256):
        xs.append(x)
        ys.append(y)
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _verdict(parity, kind: str, e) -> tuple[bool, str]:
    precision = "fp32" if kind == "fp32" else "int8"
    min_agreement = e.min_agreement if e.min_agreement is not None else MIN_AGREEMENT[precision]
    max_relative = e.max_relative_diff if e.max_relative_diff is not None else MAX_RELATIVE_DIFF[precision]
    if parity.top1_agreement is not None and parity.top1_agreement < min_agreement:
        return False, f"top-1 agreement {parity.top1_agreement:.4f} < {min_agreement} with the eager model"
    if parity.relative_diff > max_relative:
        return False, f"max output difference {parity.relative_diff:.3g} of the output range > {max_relative} with the eager model"
    return True, ""
