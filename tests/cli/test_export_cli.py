"""`dlrun export` end to end through the CLI: artifacts verified in their own runtime, delegation, failures, refusals,
and `dlrun eval artifact=` on what it writes.

In-process checks of the library (a tampered artifact fails `check_parity`, ONNX without its packages) are in
tests/test_exporting.py; here the same failures are seen the way a user sees them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import ONE_THREAD_ENV, crash_hook, error_line, ok, run_dirs, subprocess_env

ENV = subprocess_env(**ONE_THREAD_ENV)
VERIFY_SAMPLES = 256  # conf/export/*.yaml verify_samples; the digits test split has 359
PTE_BATCHES = (1, 32, 64)  # verified: batch 1, a middle size and max_batch (conf/export/pte.yaml: 64)
PT2_ONNX_BATCHES = (1, 512, 1024)  # max_batch 1024 (conf/export/pt2.yaml, onnx.yaml)


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def only_run(cwd: Path, command: str = "export") -> Path:
    (run,) = run_dirs(cwd, command)
    return run


def assert_verified(summary: dict, *, fmt: str, backend: str, source_kind: str, batch_sizes=PTE_BATCHES) -> None:
    assert summary["command"] == "export" and summary["format"] == fmt and summary["backend"] == backend
    assert summary["source_kind"] == source_kind
    verification = summary["verification"]
    assert verification["passed"] is True and verification["samples"] == VERIFY_SAMPLES
    assert verification["batch_sizes"] == list(batch_sizes)
    fp32 = source_kind == "fp32"
    assert verification["top1_agreement"] >= (0.99 if fp32 else 0.97)
    assert verification["max_abs_diff"] <= (1e-4 if fp32 else 0.5) and verification["relative_diff"] <= (
        1e-3 if fp32 else 0.1
    )
    assert summary["metrics"]["test"]["accuracy"] == verification["accuracy"] > 0.8
    assert summary["metrics"]["test"]["samples"] == verification["samples"] > 0  # every accuracy says out of how many
    assert summary["size_bytes"] > 0


def test_fp32_pte_xnnpack_is_verified_and_delegated(fp32_pte, pipeline):
    summary = summary_of(fp32_pte)
    assert_verified(summary, fmt="pte", backend="xnnpack", source_kind="fp32")
    assert (fp32_pte / "model.pte").stat().st_size == summary["size_bytes"]
    assert summary["artifact"] == str(Path("outputs/export") / fp32_pte.name / "model.pte")
    assert (pipeline.cwd / summary["train_run"]).resolve() == pipeline.train_run
    assert {p.name for p in (fp32_pte / ".hydra").iterdir()} >= {"config.yaml", "overrides.yaml", "hydra.yaml"}
    log = (fp32_pte / "export.log").read_text()
    assert "(fp32) -> outputs/export/" in log and "delegated_nodes" in log
    delegation = summary["delegation"]
    assert delegation["delegated_nodes"] > 0
    assert delegation["aten_convolution_default"] == {"delegated": 2, "portable": 0}
    assert delegation["aten_linear_default"] == {"delegated": 2, "portable": 0}


def test_int8_pte_runs_its_int8_ops_inside_xnnpack(int8_pte, ptq_run, pipeline):
    summary = summary_of(int8_pte)
    assert_verified(summary, fmt="pte", backend="xnnpack", source_kind="pt2e_int8")
    assert (pipeline.cwd / summary["source_run"]).resolve() == ptq_run[0]
    assert (pipeline.cwd / summary["train_run"]).resolve() == pipeline.train_run
    delegation = summary["delegation"]
    assert delegation["delegated_nodes"] > 0
    int8_ops = {op: counts for op, counts in delegation.items() if op.startswith("quantized_decomposed_")}
    assert {
        "quantized_decomposed_quantize_per_tensor_default",
        "quantized_decomposed_dequantize_per_tensor_default",
        "quantized_decomposed_dequantize_per_channel_default",
    } <= set(int8_ops)
    assert all(c["delegated"] > 0 and c["portable"] == 0 for c in int8_ops.values()), int8_ops  # none left to portable
    assert delegation["aten_convolution_default"]["portable"] == delegation["aten_linear_default"]["portable"] == 0


def test_eval_runs_an_exported_pte(fp32_pte, trained_run, cli):
    ok(cli("eval", f"artifact={fp32_pte / 'model.pte'}", "latency_repeats=5", env=ENV))
    evaluated = summary_of(only_run(cli.cwd, "eval"))
    assert evaluated["kind"] == "artifact"
    test, trained = evaluated["metrics"]["test"], trained_run.summary["metrics"]["test"]
    assert test["samples"] == trained["samples"]  # the whole test split, in batches the .pte accepts
    assert test["accuracy"] == pytest.approx(trained["accuracy"], abs=0.01)


def test_verification_that_cannot_pass_fails_the_export_and_keeps_the_evidence(trained_run, cli):
    result = cli("export", "format=pt2", "export.min_agreement=1.01", f"run={trained_run.run_dir}", env=ENV)
    error_line(result, 1, "verification failed", "top-1 agreement 1.0000 < 1.01", "kept for inspection")
    run = only_run(cli.cwd)
    summary = summary_of(run)
    assert summary["verification"]["passed"] is False and summary["verification"]["top1_agreement"] == 1.0
    assert (run / "model.pt2").is_file()


def test_a_runtime_crash_fails_the_export_in_one_line_and_never_labels_it_verified(trained_run, cli, tmp_path):
    # The verification child dies of SIGSEGV at max_batch, as issue 14's int8 mobilenet_v2 .pte did in dlrun itself.
    env = subprocess_env(**ONE_THREAD_ENV, PYTHONPATH=crash_hook(tmp_path / "hook", "SIGSEGV", at_batch=64))
    result = cli("export", "format=pt2", "export.max_batch=64", f"run={trained_run.run_dir}", env=env)
    reason = "the PyTorch runtime crashed (SIGSEGV) at batch 64"
    error_line(result, 1, f"verification failed: {reason}", "kept for inspection")
    assert "verified in its runtime" not in result.stdout
    run = only_run(cli.cwd)
    summary = summary_of(run)
    assert summary["verification"] == {
        "passed": False,
        "reason": reason,
        "batch_sizes": [1, 32, 64],
        "samples": 0,
        "max_abs_diff": 0.0,
        "relative_diff": 0.0,
        "top1_agreement": None,
        "accuracy": None,
    }
    assert summary["metrics"]["test"]["accuracy"] is None
    assert (run / "model.pt2").is_file()


def test_unknown_format_is_refused_listing_the_formats(cli):
    error_line(cli("export", "format=tflite"), 2, "'tflite'", "onnx, pt2, pte")


def test_unknown_backend_is_refused_listing_the_backends(trained_run, cli):
    line = error_line(
        cli("export", "format=pte", "backend=coreml", f"run={trained_run.run_dir}", env=ENV), 2, "backend=coreml"
    )
    assert "backend=xnnpack: fp32" in line and "backend=portable: fp32" in line


def hide_modules(tmp_path: Path, *names: str) -> dict:
    """An environment whose Python cannot import `names` (as on a machine without the optional extra)."""
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names))
    return subprocess_env(**ONE_THREAD_ENV, PYTHONPATH=str(site))


def test_onnx_export_without_its_packages_says_what_to_install(trained_run, cli, tmp_path):
    result = cli("export", "format=onnx", f"run={trained_run.run_dir}", env=hide_modules(tmp_path, "onnxscript"))
    error_line(result, 1, "ONNX export needs onnxscript", "pip install 'dlrun[onnx]'")


def test_eval_of_an_onnx_file_without_onnxruntime_says_what_to_install(fp32_pte, cli, tmp_path):
    artifact = tmp_path / "exported" / "model.onnx"
    artifact.parent.mkdir()
    artifact.write_bytes(b"never read: the runtime is missing")
    shutil.copy(fp32_pte / "summary.json", artifact.parent)
    result = cli("eval", f"artifact={artifact}", env=hide_modules(tmp_path, "onnxruntime"))
    error_line(result, 1, "needs onnxruntime", "pip install 'dlrun[onnx]'")


def test_eval_refuses_an_artifact_without_its_summary(fp32_pte, cli, tmp_path):
    lone = tmp_path / "lone" / "model.pte"
    lone.parent.mkdir()
    shutil.copy(fp32_pte / "model.pte", lone)
    error_line(cli("eval", f"artifact={lone}", env=ENV), 2, str(lone), "no summary.json beside it")


def test_eval_refuses_a_corrupt_artifact_in_one_line(fp32_pte, cli, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(fp32_pte / "summary.json", broken)
    (broken / "model.pt2").write_bytes(b"PK\x03\x04 truncated")  # .pt2: no ExecuTorch import, a cheaper test
    error_line(cli("eval", f"artifact={broken / 'model.pt2'}", env=ENV), 2, "cannot load", "truncated or corrupt")


# --- slow: the other formats and backends ----------------------------------------------------------------------

OTHER_EXPORTS = [
    ("pte", "portable", ()),
    ("pt2", "none", ()),
    ("onnx", "onnxruntime", ()),
    ("pte", "xnnpack", ("export.dynamic_batch=false",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "backend", "extra"), OTHER_EXPORTS, ids=["pte-portable", "pt2", "onnx", "pte-batch1"])
def test_fp32_exports_are_verified_in_their_runtime(fmt, backend, extra, trained_run, cli):
    ok(
        cli(
            "export",
            f"format={fmt}",
            *([f"backend={backend}"] if fmt == "pte" else []),
            *extra,
            f"run={trained_run.run_dir}",
            env=ENV,
        )
    )
    run = only_run(cli.cwd)
    summary = summary_of(run)
    dynamic = not extra
    if dynamic:
        assert_verified(
            summary,
            fmt=fmt,
            backend=backend,
            source_kind="fp32",
            batch_sizes=PTE_BATCHES if fmt == "pte" else PT2_ONNX_BATCHES,
        )
    else:  # a fixed batch of 1: verified one sample at a time (the first 64 test samples)
        assert summary["verification"]["passed"] and summary["verification"]["batch_sizes"] == [1]
        assert summary["verification"]["samples"] == 64 and summary["verification"]["top1_agreement"] == 1.0
    if backend == "portable":
        assert summary["delegation"]["delegated_nodes"] == 0 and summary["delegation"]["portable_nodes"] > 0
    if fmt in ("onnx", "pte"):  # and the artifact evaluates on the whole test split (.pte batch 1: one call per sample)
        ok(cli("eval", f"artifact={run / f'model.{fmt}'}", "latency_repeats=5", env=ENV))
        test = summary_of(only_run(cli.cwd, "eval"))["metrics"]["test"]
        assert test["accuracy"] == pytest.approx(trained_run.summary["metrics"]["test"]["accuracy"], abs=0.01)
