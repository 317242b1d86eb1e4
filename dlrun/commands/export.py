"""`dlrun export`: write a deployable artifact and prove it runs in its own runtime with the same answers.

    dlrun export format=pte backend=xnnpack   # ExecuTorch, int8 ops delegated to XNNPACK for quantized runs
    dlrun export format=pte backend=portable
    dlrun export format=pt2
    dlrun export format=onnx                  # verified in onnxruntime
    dlrun export format=pte bundle=true       # also model.bpte: the program with test inputs and expected outputs

Every export is verified: the artifact is loaded in its runtime (executorch.runtime, onnxruntime,
torch.export.load) in a child process, run on test samples at batch 1, a middle size and max_batch, and
compared with the eager source model. Agreement below the threshold, or a runtime that crashes or fails,
fails the command (exit 1); summary.json records the verdict and its reason either way.

A .pte comes with etrecord.bin (the lowering's debug record that `dlrun profile` names operators with; off with
export.etrecord=false). With
bundle=true, a verified .pte is also written as model.bpte, an ExecuTorch BundledProgram holding `bundle_inputs`
test samples (batch 1 each) and the eager source model's outputs for them, with the tolerance
(export.max_relative_diff of the largest output) that `dlrun eval artifact=model.bpte` checks them with.
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from dlrun.config import capabilities
from dlrun.core import contract, rundir, sources, ui
from dlrun.core.errors import DlrunError, UsageError
from dlrun.deploy import lower, runtime
from dlrun.deploy.parity import check_parity, verification_batch_sizes
from dlrun.deploy.program import export_program

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
    capabilities.check_export_supported(e.format, e.backend, kind)
    batch = "dynamic_batch" if e.dynamic_batch else "fixed_batch"
    capabilities.check_model_supported(source.config["model"], f"export/{e.format}/{batch}")
    if cfg.bundle and e.format != "pte":
        raise UsageError(f"bundle=true needs format=pte (a BundledProgram is ExecuTorch's), got format={e.format}")
    if not isinstance(cfg.bundle_inputs, int) or isinstance(cfg.bundle_inputs, bool) or cfg.bundle_inputs < 1:
        raise UsageError(f"bundle_inputs must be an integer >= 1, got {cfg.bundle_inputs!r}")
    run_dir = rundir.current()
    data = sources.load_data(source, torch.device("cpu"))
    module = sources.load_predictor(source)
    # A dynamic batch needs an example batch >= 16, or lowering caps the batch dimension at 15.
    example = data.example(batch=min(32, e.max_batch)) if e.dynamic_batch else data.example(batch=1)
    artifact = run_dir / f"model.{e.format}"
    log.info(f"export {source.label} ({kind}) -> {rundir.relative(artifact)} [{e.format}/{e.backend}]")

    try:
        if e.format == "onnx":
            result = lower.to_onnx(module, example, artifact, dynamic_batch=e.dynamic_batch, max_batch=e.max_batch)
        else:
            program = export_program(module, example, dynamic_batch=e.dynamic_batch, max_batch=e.max_batch)
            result = (
                lower.to_pte(
                    program, artifact, backend=e.backend, etrecord=run_dir / "etrecord.bin" if e.etrecord else None
                )
                if e.format == "pte"
                else lower.to_pt2(program, artifact)
            )
    except ImportError as exc:  # an optional runtime (onnx, onnxruntime) is missing: the message says what to install
        raise DlrunError(str(exc)) from None

    x, y = _test_samples(data, e.verify_samples)
    batch_sizes = verification_batch_sizes(e.max_batch) if e.dynamic_batch else [1]
    parity, verification = _verify(artifact, module, x, y, batch_sizes, kind, e, data.task == "classification")
    bundled = _bundle(artifact, module, x[: cfg.bundle_inputs], kind, e) if cfg.bundle and verification.passed else {}
    record = contract.ExportRecord(
        format=e.format,
        backend=e.backend,
        source_kind=kind,
        artifact=rundir.relative(artifact),
        size_bytes=result.size_bytes,
        max_batch=e.max_batch,
        dynamic_batch=e.dynamic_batch,
        verification=verification,
    )
    contract.write_summary(
        run_dir,
        contract.Summary(
            "export",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=record,
            metrics={"test": {"accuracy": verification.accuracy, "samples": verification.samples}},
            lineage=source.lineage,
            extra={
                "delegation": {
                    "delegated_nodes": result.delegated_nodes,
                    "portable_nodes": result.portable_nodes,
                    **(result.delegation or {}),
                },
                **({"bundle": bundled} if bundled else {}),
            },
        ),
    )
    if parity is not None:  # a runtime that died before the comparison has no numbers to show
        shown = {
            "size_bytes": result.size_bytes,
            **{k: v for k, v in parity.__dict__.items() if v is not None and k != "batch_sizes"},
        }
        if result.delegated_nodes is not None:
            shown.update(delegated_nodes=result.delegated_nodes, portable_nodes=result.portable_nodes)
        if bundled:
            shown.update(bundle_inputs=bundled["inputs"], bundle_atol=bundled["atol"])
        outcome = "verified" if verification.passed else "FAILED verification"
        ui.metrics_table(f"{artifact.name} {outcome} in its runtime vs the eager source", {"artifact": shown})
    if not verification.passed:
        kept = f"{rundir.relative(artifact)} kept for inspection"
        raise DlrunError(f"verification failed: {verification.reason} ({kept})")


def source_kind(source: sources.Source) -> str:
    """fp32 checkpoint, or which kind of quantized program (see capabilities.SOURCE_KINDS)."""
    if source.kind == "checkpoint":
        return "fp32"
    quantized = contract.read_summary(source.run_dir, "quantize").record
    return capabilities.quantized_source_kind(quantized.mode, quantized.backend, quantized.dtype or "int8")


def _test_samples(data, n: int):
    xs, ys, seen = [], [], 0
    for x, y in data.test.batches(256):
        xs.append(x)
        ys.append(y)
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _verify(artifact, module, x, y, batch_sizes: list[int], kind: str, e, classification: bool):
    """(parity, contract.Verification) of the artifact run in a child process against the eager module.

    In the child, a runtime crash (SIGSEGV, or SIGABRT from a heap it corrupted) fails the verification with its
    reason instead of killing dlrun; parity is then None, and the record compares nothing (samples 0)."""
    try:
        with runtime.isolated_runner(artifact) as runner:
            parity = check_parity(module, runner, x, y, batch_sizes=batch_sizes, classification=classification)
    except ImportError as exc:  # the artifact's runtime package is missing: the message says what to install
        raise DlrunError(str(exc)) from None
    except runtime.ArtifactRunError as exc:  # it does not load, or its runtime crashed or failed on a batch
        return None, contract.Verification(
            passed=False, samples=0, max_abs_diff=0.0, relative_diff=0.0, batch_sizes=batch_sizes, reason=str(exc)
        )
    passed, reason = _verdict(parity, kind, e)
    return parity, contract.Verification(passed=passed, reason=reason, **parity.__dict__)


def _bundle(artifact, module, inputs: torch.Tensor, kind: str, e) -> dict:
    """Write model.bpte beside the .pte: each input at batch 1 with the eager source model's output for it, and
    the tolerance the runtime checks them with (what summary.json's `bundle` records for `dlrun eval`)."""
    from dlrun.deploy import bundle

    cases = list(inputs.split(1))
    with torch.no_grad():
        expected = [module(x).float() for x in cases]
    # As in the parity check: a difference relative to the largest output, so rtol is 0 and atol scales.
    atol = _thresholds(kind, e)[1] * max(y.abs().max().item() for y in expected)
    path = artifact.with_suffix(".bpte")
    size = bundle.write_bundle(artifact, cases, expected, path)
    log.info(f"bundled {len(cases)} test inputs and expected outputs -> {rundir.relative(path)}")
    return {"file": rundir.relative(path), "size_bytes": size, "inputs": len(cases), "rtol": 0.0, "atol": atol}


def _thresholds(kind: str, e) -> tuple[float, float]:
    """(min top-1 agreement, max relative output difference) for this source kind, or the user's overrides."""
    precision = "fp32" if kind == "fp32" else "int8"
    min_agreement = e.min_agreement if e.min_agreement is not None else MIN_AGREEMENT[precision]
    max_relative = e.max_relative_diff if e.max_relative_diff is not None else MAX_RELATIVE_DIFF[precision]
    return min_agreement, max_relative


def _verdict(parity, kind: str, e) -> tuple[bool, str]:
    min_agreement, max_relative = _thresholds(kind, e)
    if parity.top1_agreement is not None and parity.top1_agreement < min_agreement:
        return False, f"top-1 agreement {parity.top1_agreement:.4f} < {min_agreement} with the eager model"
    if parity.relative_diff > max_relative:
        return (
            False,
            f"max output difference {parity.relative_diff:.3g} of the output range > {max_relative} "
            "with the eager model",
        )
    return True, ""
