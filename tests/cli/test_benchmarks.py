"""The benchmark scripts run in --quick mode, so that they cannot rot. Their numbers are not checked here (quick
settings on a shared machine mean nothing); that each runs to the end and prints its ratio lines is."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from helpers import ONE_THREAD_ENV, PYTHON, REPO, subprocess_env

# benchmark -> substrings its output must contain
EXPECTED = {
    "startup": (
        "dlrun --help",
        "dlrun ls",
        "dlrun train --cfg job",
        "(goal <= 0.25 s: ",
        "(goal <= 3.0 s: ",
        "train overhead beyond it (dlrun's own): ",
    ),
    "train_throughput": ("a: dlrun engine", "b: notes' DataLoader loop", "c: tuned hand loop", "a/b = ", "a/c = "),
    "time_to_accuracy": ("99% test accuracy", "whole `dlrun train` process:", "(goal <= 12 s)"),
    "quantized_latency": ("lenet@8 (digits):", "int8.pte/fp32.pte = ", "int8.pte/eager = ", "size int8/fp32 .pte = "),
    "compression": ("(goal <= 0.5)", "pruned/unpruned = ", "student with KD", "mobilenet_v2 prune"),
}


def run_benchmark(name: str) -> str:
    # Run from the repository root: benchmarks/ is a package there, not an installed one.
    done = subprocess.run(
        [PYTHON, "-m", f"benchmarks.{name}", "--quick"],
        cwd=REPO,
        env=subprocess_env(**ONE_THREAD_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


# Peer benchmarks (issue 13): their peer is an optional extra, `pip install 'dlrun[bench]'`.
PEERS = {"vs_lightning": ("lightning",), "vs_onnxruntime": ("onnx", "onnxscript", "onnxruntime")}
EXPECTED |= {
    "vs_lightning": ("digits+lenet (default)", "lightning/dlrun train = ", "(goal train >= 1.5x: "),
    "vs_onnxruntime": ("fp32 .pte", "int8 ORT", "int8 .pte/ORT int8 at b1 = ", "fp32 .pte/ORT fp32 at b1 = "),
}
# Slow suite: quantized_latency (~20 s) lowers two .pte programs, as the fast quantize/export CLI tests already do;
# vs_lightning's quick mode imports lightning (~8 s) and trains twice in two processes (~40 s idle, minutes busy);
# vs_onnxruntime's lowers two .pte and quantizes with ORT (~30 s idle).
# compression's quick mode runs ten dlrun commands in subprocesses (~1 min idle, ~4 min on a busy 2-core machine).
SLOW = ("quantized_latency", "vs_lightning", "vs_onnxruntime", "compression")


def marks(name: str) -> list:
    missing = [m for m in PEERS.get(name, ()) if importlib.util.find_spec(m) is None]
    skip = (
        [pytest.mark.skip(reason=f"{name} needs {', '.join(missing)}: pip install 'dlrun[bench]'")] if missing else []
    )
    return ([pytest.mark.slow] if name in SLOW else []) + skip


PARAMS = [pytest.param(name, marks=marks(name)) for name in EXPECTED]


@pytest.mark.parametrize("name", PARAMS)
def test_benchmark_runs_quick(name):
    out = run_benchmark(name)
    for needle in EXPECTED[name]:
        assert needle in out, f"{needle!r} not in the output of benchmarks.{name}:\n{out}"
    if name == "startup":  # the one property a quick run does measure: config-only commands never import torch
        for line in out.splitlines():
            if line.strip().startswith(("dlrun --help", "dlrun ls", "dlrun train --cfg")):
                assert "imports torch: False" in line, line
