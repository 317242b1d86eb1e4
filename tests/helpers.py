"""Shared test helpers: run `python -m dlrun` like a user does and check what the user sees.

Every CLI test runs dlrun as a subprocess in its own temporary working directory, because run
directories (outputs/...) are relative to the working directory and because the CLI's contract
is what the user sees: the exit code, stdout/stderr and the files written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]  # the checkout
PYTHON = sys.executable  # the venv's python when run as `.venv/bin/python -m pytest`
TIMESTAMP = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}"

# A tiny LeNet on the bundled digits (1797 8x8 images): 4 epochs take well under a second on a CPU.
# Deterministic so that the resume tests can compare an interrupted+resumed run with it bit for bit;
# step decay (per epoch, independent of trainer.epochs) so that extending a run with a larger
# trainer.epochs is the same experiment as running that many epochs straight.
TINY_MODEL = ("model.channels=[8,16]", "model.hidden=32")
TINY_TRAIN = (
    "trainer.device=cpu",
    "trainer.deterministic=true",
    "optimizer.lr=0.01",
    "scheduler=step",
    "scheduler.step_epochs=1",
    "scheduler.gamma=0.5",
    *TINY_MODEL,
)
TINY_EPOCHS = 4
# Even smaller, for tests that only need *a* run (names, directories, multirun).
MICRO_TRAIN = ("trainer.device=cpu", "trainer.epochs=1", "model=linear", "dataset=synthetic", "dataset.num_samples=128")


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(COLUMNS="250", PYTHONUNBUFFERED="1", **extra)  # wide rich tables: no wrapped descriptions
    return env


def run_dlrun(args, cwd: Path, *, env: dict | None = None, timeout: float = 300, python_args=()) -> Result:
    return _run([PYTHON, *python_args, "-m", "dlrun", *map(str, args)], cwd, env, timeout)


def _run(argv: list[str], cwd: Path, env: dict | None, timeout: float) -> Result:
    proc = subprocess.run(argv, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def error_line(result: Result, exit_code: int = 2, *needles: str) -> str:
    """Assert the run failed with `exit_code` and exactly one `error:` line (no traceback); return that line."""
    assert result.returncode == exit_code, (
        f"exit {result.returncode}, expected {exit_code}\n{result.stdout}\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def ok(result: Result) -> Result:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def run_dirs(cwd: Path, command: str = "train") -> list[Path]:
    """Run directories directly under outputs/<command>/ (multirun sweeps excluded)."""
    root = cwd / "outputs" / command
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "multirun") if root.is_dir() else []


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class TrainedRun:
    cwd: Path  # the working directory it ran in
    run_dir: Path  # absolute path of outputs/train/<timestamp>_tiny
    result: Result
    args: tuple[str, ...]

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


# --- One tiny train -> quantize -> export pipeline, shared by test_quantize_cli, test_export_cli, test_bench_cli ---

# Quantize runs compare fp32 and int8 on the backend's runtime; these keep that measurement cheap.
CHEAP_QUANTIZE = ("latency_repeats=5", "throughput_batch=8")
# One intra-op thread: on a small shared machine, two spinning OpenMP threads make a 0.2 s QAT epoch take 7 s.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


def copy_train_run(trained: TrainedRun, cwd: Path) -> Path:
    """A copy of the session's train run at cwd/outputs/train/<name>, so that commands run in cwd find it as
    the latest train run (no run=) and write their lineage relative to cwd, as a user's project would."""
    import shutil

    target = cwd / "outputs" / "train" / trained.run_dir.name
    shutil.copytree(trained.run_dir, target)
    return target.resolve()


def tree_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Pipeline:
    cwd: Path  # the working directory: outputs/train/<copy of the tiny run>, then quantize/ and export/ runs
    train_run: Path

    def run(self, *args, timeout: float = 600) -> Result:
        return run_dlrun(args, self.cwd, env=subprocess_env(**ONE_THREAD_ENV), timeout=timeout)

    def new_run(self, command: str, *args) -> Path:
        """Run a command that must succeed and return the one run directory it added under outputs/<command>/."""
        before = set(run_dirs(self.cwd, command))
        ok(self.run(command, *args))
        (added,) = set(run_dirs(self.cwd, command)) - before
        return added.resolve()


def crash_hook(folder: Path, signal_name: str, at_batch: int) -> str:
    """A PYTHONPATH whose sitecustomize makes the verification child (`python -m dlrun.deploy.verify_child`) kill
    itself with `signal_name` on a batch of `at_batch`, as a runtime kernel writing out of bounds does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import sys

        if "dlrun.deploy.verify_child" in sys.orig_argv:
            import os
            import signal

            from dlrun.deploy import runtime

            load_runner = runtime.load_runner

            def crashing_runner(path):
                run = load_runner(path)

                def crash_on_batch(x):
                    if len(x) == {at_batch}:
                        os.kill(os.getpid(), signal.{signal_name})
                    return run(x)

                return crash_on_batch

            runtime.load_runner = crashing_runner
    """)
    )
    return str(folder)


def interrupt_when(target: str, epoch: int | None = None) -> str:
    """A `python -c` script running dlrun's CLI (give it dlrun's arguments) with a real SIGINT, what Ctrl-C sends,
    delivered as `target` ("module:function") is called, and only at `epoch` when given (the function's `epoch`
    keyword): the interruption lands at the same point every time instead of racing a timer."""
    module, function = target.split(":")
    when = f'kwargs["epoch"] == {epoch}' if epoch is not None else "True"
    return textwrap.dedent(f"""
        import os, signal
        import {module} as patched
        original = patched.{function}
        def interrupted(*args, **kwargs):
            if {when}:
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args, **kwargs)
        patched.{function} = interrupted
        from dlrun.cli import main
        main()
    """)


# Ctrl-C as the first epoch is about to train (last.pt holds epoch 0).
INTERRUPT_IN_EPOCH_1 = interrupt_when("dlrun.training.loop:train_epoch")


def run_script(script: str, args, cwd: Path, *, env: dict | None = None, timeout: float = 300) -> Result:
    """`python -c script <args>` in `cwd`, as run_dlrun runs `python -m dlrun <args>`."""
    return _run([PYTHON, "-c", script, *map(str, args)], cwd, env, timeout)


def assert_comparison_png(path: Path) -> None:
    """A real PNG of a sensible size: the before/after bar chart, a few panels wide."""
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 2_000_000, len(data)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 600 and 200 < height < width, (width, height)
