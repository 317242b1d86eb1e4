"""The benchmark scripts run in --quick mode, so that they cannot rot. Their numbers are not checked here (quick
settings on a shared machine mean nothing); that each runs to the end and prints its ratio lines is."""

from __future__ import annotations

import subprocess

import pytest

from helpers import ONE_THREAD_ENV, PYTHON, REPO, subprocess_env

# benchmark -> substrings its output must contain
EXPECTED = {
    "startup": ("dlrun --help", "dlrun ls", "dlrun train --cfg job", "(goal <= 0.35 s)"),
    "train_throughput": ("a: dlrun engine", "b: notes' DataLoader loop", "c: tuned hand loop", "a/b = ", "a/c = "),
    "time_to_accuracy": ("99% test accuracy", "whole `dlrun train` process:", "(goal <= 12 s)"),
    "quantized_latency": ("lenet@8 (digits):", "int8.pte/fp32.pte = ", "int8.pte/eager = ", "size int8/fp32 .pte = "),
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


# quantized_latency (~20 s) lowers two .pte programs, as the fast quantize/export CLI tests already do: slow suite.
PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name == "quantized_latency" else name for name in EXPECTED]


@pytest.mark.parametrize("name", PARAMS)
def test_benchmark_runs_quick(name):
    out = run_benchmark(name)
    for needle in EXPECTED[name]:
        assert needle in out, f"{needle!r} not in the output of benchmarks.{name}:\n{out}"
    if name == "startup":  # the one property a quick run does measure: config-only commands never import torch
        for line in out.splitlines():
            if line.strip().startswith(("dlrun --help", "dlrun ls", "dlrun train --cfg")):
                assert "imports torch: False" in line, line
