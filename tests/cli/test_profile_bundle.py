"""`dlrun profile` (per-operator time of a .pte from its ETDump and ETRecord) and `dlrun export bundle=true` ->
`dlrun eval artifact=model.bpte` (the BundledProgram's self-check), end to end through the CLI on the default model
(issue 13)."""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from helpers import ONE_THREAD_ENV, error_line, ok, run_dirs, run_dlrun, subprocess_env


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def only_new_run(cwd: Path, command: str, before: set[Path]) -> Path:
    (added,) = set(run_dirs(cwd, command)) - before
    return added


def test_profile_names_delegated_operators_of_fp32_pte(pipeline, fp32_pte):
    assert (fp32_pte / "etrecord.bin").is_file()  # written by every export to .pte
    before = set(run_dirs(pipeline.cwd, "profile"))
    result = ok(pipeline.run("profile", f"run={fp32_pte}", "warmup=2", "iterations=12", "batch=4"))
    run = only_new_run(pipeline.cwd, "profile", before)
    assert "Convolution (NHWC, F32)" in result.stdout and "XNNPACK" in result.stdout
    summary = summary_of(run)
    assert summary["batch"] == 4 and summary["iterations"] == 12 and summary["threads"] >= 1
    operators = summary["operators"]
    convolutions = [o for o in operators if o["operator"].startswith("Convolution")]
    assert convolutions and all(o["delegate"] == "XNNPACK" for o in convolutions)
    assert sum(o["calls"] for o in convolutions) == 2  # lenet: two convolutions, both inside the delegate
    assert [o["p50_us"] for o in operators] == sorted((o["p50_us"] for o in operators), reverse=True)
    # The rows (operators, delegate and runtime overheads) split one whole run: shares of its median add up.
    assert 0.6 < sum(o["share"] for o in operators) < 1.4
    assert summary["metrics"]["run_us_p50"] > 0
    with (run / "events.csv").open() as f:
        events = list(csv.DictReader(f))
    assert {"Method::execute", "DELEGATE_CALL"} <= {e["event"] for e in events}
    assert all(int(e["runs"]) == 12 for e in events)  # warm-up runs dropped


def test_profile_shows_int8_operators_in_xnnpack(pipeline, int8_pte):
    before = set(run_dirs(pipeline.cwd, "profile"))
    ok(pipeline.run("profile", f"artifact={int8_pte / 'model.pte'}", "warmup=1", "iterations=5"))
    operators = summary_of(only_new_run(pipeline.cwd, "profile", before))["operators"]
    int8_convolutions = [
        o for o in operators if o["operator"].startswith("Convolution (NHWC, QC8)")
    ]  # int8, per-channel
    assert int8_convolutions and all(o["delegate"] == "XNNPACK" for o in int8_convolutions)


def test_profile_refuses_what_is_not_a_pte(pipeline, fp32_pte):
    error_line(pipeline.run("profile", f"artifact={fp32_pte / 'summary.json'}"), 2, "must be an ExecuTorch .pte")
    error_line(pipeline.run("profile", f"run={fp32_pte}", "batch=65"), 2, "exceeds the 64")
    error_line(pipeline.run("profile", f"run={fp32_pte}", "iterations=0"), 2, "iterations must be an integer >= 1")


def test_runtime_crash_while_profiling_is_one_error_line(pipeline, fp32_pte, tmp_path):
    """The ETDump run happens in a child: a runtime that dies there fails the command, naming the signal."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os, signal, sys

        if "dlrun.deploy.verify_child" in sys.orig_argv and "--job" in sys.orig_argv:
            os.kill(os.getpid(), signal.SIGSEGV)
        """)
    )
    env = subprocess_env(PYTHONPATH=str(tmp_path), **ONE_THREAD_ENV)
    result = run_dlrun(["profile", f"run={fp32_pte}", "iterations=2"], pipeline.cwd, env=env)
    error_line(result, 1, "the ExecuTorch runtime crashed (SIGSEGV) in the etdump job")


@pytest.fixture(scope="module")
def bundled_export(pipeline) -> Path:
    before = set(run_dirs(pipeline.cwd, "export"))
    ok(pipeline.run("export", "format=pte", f"run={pipeline.train_run}", "bundle=true", "bundle_inputs=4"))
    return only_new_run(pipeline.cwd, "export", before)


def test_bundled_program_passes_its_own_check(pipeline, bundled_export):
    bundle = summary_of(bundled_export)["bundle"]
    assert bundle["inputs"] == 4 and bundle["rtol"] == 0 and 0 < bundle["atol"] < 0.1
    assert (bundled_export / "model.bpte").stat().st_size == bundle["size_bytes"]
    before = set(run_dirs(pipeline.cwd, "eval"))
    result = ok(pipeline.run("eval", f"artifact={bundled_export / 'model.bpte'}"))
    assert result.stdout.count("pass") == 4 and "FAIL" not in result.stdout
    summary = summary_of(only_new_run(pipeline.cwd, "eval", before))
    assert summary["kind"] == "bundle" and summary["metrics"]["bundle"]["passed"] == 4


def test_wrong_expected_output_fails_the_bundled_check(pipeline, bundled_export, tmp_path):
    """A .bpte whose expected output for input 2 is off by more than the tolerance: eval says which, exit 1."""
    import torch

    from dlrun.deploy import bundle

    copy = tmp_path / "export"
    shutil.copytree(bundled_export, copy)
    atol = summary_of(copy)["bundle"]["atol"]
    inputs = [torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]  # digits' shape
    expected = _pte_outputs(copy / "model.pte", inputs)
    expected[2][0, 0] += 10 * atol
    bundle.write_bundle(copy / "model.pte", inputs, expected, copy / "model.bpte")

    result = pipeline.run("eval", f"artifact={copy / 'model.bpte'}")
    error_line(result, 1, "bundled check failed on 1 of 4 inputs (2)")
    assert result.stdout.count("pass") == 3 and "FAIL" in result.stdout
    # and a looser tolerance given on the command line lets the same outputs pass
    ok(pipeline.run("eval", f"artifact={copy / 'model.bpte'}", f"bundle_atol={20 * atol}"))


def _pte_outputs(pte: Path, inputs):
    from dlrun.deploy import runtime

    with runtime.isolated_runner(pte) as run:
        return [run(x) for x in inputs]


def test_bundle_needs_format_pte(pipeline):
    error_line(
        pipeline.run("export", "format=onnx", f"run={pipeline.train_run}", "bundle=true"),
        2,
        "bundle=true needs format=pte",
    )
