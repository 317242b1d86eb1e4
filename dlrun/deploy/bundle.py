"""ExecuTorch BundledPrograms (.bpte): a .pte together with test inputs and the outputs the eager model gave for them,
so that the artifact can check itself in the runtime it is deployed to (`dlrun eval artifact=model.bpte`).

    write_bundle(pte, inputs, expected, bpte)           # at `dlrun export format=pte bundle=true`
    check_bundle(bpte, cases, rtol=..., atol=...)       # in a child process: a runtime crash fails, never kills

The runtime's check is `torch.allclose`-like: |output - expected| <= atol + rtol * |expected| element-wise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrun.core.files import atomic_write_bytes, first_line
from dlrun.deploy import runtime


@dataclass
class CaseResult:
    index: int
    passed: bool
    reason: str = ""  # the runtime's message when it failed


def write_bundle(
    pte: str | os.PathLike, inputs: list[torch.Tensor], expected: list[torch.Tensor], path: str | os.PathLike
) -> int:
    """Bundle the program at `pte` with one test case per (input batch, expected output); returns the file size."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    cases = [
        MethodTestCase(inputs=(x.contiguous(),), expected_outputs=(y.detach().float().contiguous(),))
        for x, y in zip(inputs, expected, strict=True)
    ]
    bundled = BundledProgram(None, [MethodTestSuite("forward", cases)], pte_file_path=str(pte))
    path = Path(path)
    atomic_write_bytes(path, serialize_from_bundled_program_to_flatbuffer(bundled))
    return path.stat().st_size


def check_bundle(path: str | os.PathLike, cases: int, *, rtol: float, atol: float) -> list[CaseResult]:
    """Run each bundled input in a child process and compare with its bundled expected output.

    Raises runtime.ArtifactRunError when the file does not load or the runtime crashes (naming the signal)."""
    results = runtime.run_job("bundle", {"path": str(path), "cases": cases, "rtol": rtol, "atol": atol})
    return [CaseResult(**r) for r in results["cases"]]


def verify_in_process(path: str, cases: int, rtol: float, atol: float) -> dict:
    """The child's side of check_bundle (dlrun.deploy.verify_child --job bundle)."""
    from executorch.extension.pybindings import portable_lib

    runtime.executorch_runtime()  # starts the threadpool with its start-up noise filtered
    bundled = portable_lib._load_bundled_program_from_buffer(Path(path).read_bytes())
    results = []
    for index in range(cases):
        try:
            bundled.verify_result_with_bundled_expected_output("forward", index, rtol, atol)
            results.append(CaseResult(index, True))
        except RuntimeError as exc:  # "Result verification failed with status 32": a mismatch
            results.append(CaseResult(index, False, first_line(exc)))
    return {"cases": [r.__dict__ for r in results]}
