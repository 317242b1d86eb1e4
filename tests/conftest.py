"""Shared fixtures: a `cli` runner in a temporary directory, and one tiny train -> quantize -> export pipeline
trained once per session and reused (read-only) by many tests. Helpers live in tests/helpers.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import (
    CHEAP_QUANTIZE,
    TIMESTAMP,
    TINY_EPOCHS,
    TINY_TRAIN,
    Pipeline,
    Result,
    TrainedRun,
    copy_train_run,
    ok,
    run_dirs,
    run_dlrun,
    tree_hashes,
)


@pytest.fixture
def cli(tmp_path):
    """cli(*args) runs `python -m dlrun *args` in tmp_path and returns (returncode, stdout, stderr)."""

    def run(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> Result:
        return run_dlrun(args, cwd or tmp_path, env=env, timeout=timeout)

    run.cwd = tmp_path
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """ONE tiny deterministic digits run, trained once per session (read-only for the tests using it)."""
    cwd = tmp_path_factory.mktemp("trained")
    args = ("train", *TINY_TRAIN, f"trainer.epochs={TINY_EPOCHS}", "name=tiny")
    result = ok(run_dlrun(args, cwd))
    dirs = run_dirs(cwd)
    assert len(dirs) == 1, dirs
    assert re.fullmatch(TIMESTAMP + "_tiny", dirs[0].name), dirs[0].name
    return TrainedRun(cwd=cwd, run_dir=dirs[0].resolve(), result=result, args=args)


@pytest.fixture(scope="session")
def pipeline(trained_run, tmp_path_factory) -> Pipeline:
    cwd = tmp_path_factory.mktemp("pipeline")
    return Pipeline(cwd=cwd, train_run=copy_train_run(trained_run, cwd))


@pytest.fixture(scope="session")
def ptq_run(pipeline) -> tuple[Path, dict, dict]:
    """`dlrun quantize mode=ptq backend=xnnpack` on the latest (only) train run:
    (run dir, source hashes before, after)."""
    before = tree_hashes(pipeline.train_run)
    run = pipeline.new_run("quantize", "mode=ptq", "backend=xnnpack", "quantizer.calib_batches=4", *CHEAP_QUANTIZE)
    return run, before, tree_hashes(pipeline.train_run)


@pytest.fixture(scope="session")
def fp32_pte(pipeline) -> Path:
    """The tiny fp32 model exported to an XNNPACK .pte (run dir)."""
    return pipeline.new_run("export", "format=pte", "backend=xnnpack", f"run={pipeline.train_run}")


@pytest.fixture(scope="session")
def int8_pte(pipeline, ptq_run) -> Path:
    """The ptq-xnnpack program exported to an XNNPACK .pte (run dir)."""
    return pipeline.new_run("export", "format=pte", "backend=xnnpack", f"run={ptq_run[0]}")
