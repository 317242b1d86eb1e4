"""Reliability: faults (kill, Ctrl-C, NaN, full disk, locks), bad input, and files from strangers.

Every CLI test runs dlrun as a user would (a subprocess in a temporary working directory) and checks
what the user is promised: one `error:` line and the right exit code instead of a traceback, and files
that are either the old or the new version, never half of one.

Covered elsewhere (not repeated here):
- two concurrent `dlrun train` get distinct run dirs, `name=../../etc` stays inside outputs/:
  test_train_cli.py::test_concurrent_runs_get_distinct_dirs_inside_outputs, ::test_reserve_run_dir_in_the_same_second
- a single Ctrl-C (exit 130, resume hint, resume == uninterrupted):
  test_train_cli.py::test_interrupted_run_resumes_to_the_same_result
- mistyped keys, unknown options, wrong types/ranges on the CLI: test_config.py
- checkpoint.load refusing malicious/truncated/garbage/foreign files, and eval of a malicious one: test_eval_cli.py
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train_cli import assert_same_training

from dlrun.config import compose, validate
from dlrun.core import checkpoint, files, locks, rundir
from dlrun.core.errors import DlrunError, UsageError
from helpers import (
    INTERRUPT_IN_EPOCH_1,
    PYTHON,
    TIMESTAMP,
    TINY_EPOCHS,
    TINY_MODEL,
    TINY_TRAIN,
    Result,
    error_line,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    run_script,
    subprocess_env,
)

# A few seconds of work at most: for tests that need *a* finished run, not a good model.
SMALL = ("trainer.device=cpu", "dataset=synthetic", "dataset.num_samples=256", *TINY_MODEL, "trainer.epochs=2")


def popen_dlrun(args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "dlrun", *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


def wait_for_epochs(cwd: Path, proc: subprocess.Popen, epochs: int = 1, timeout: float = 120) -> Path:
    """Poll until the run's metrics.jsonl has `epochs` rows (written atomically: never half a row); returns the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for metrics in cwd.glob("outputs/train/*/metrics.jsonl"):
            if len(read_jsonl(metrics)) >= epochs:
                return metrics.parent
        assert proc.poll() is None, finish(proc)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no {epochs} epoch(s) within {timeout}s")


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> content), to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.glob(".*.tmp")]


def copy_run(run_dir: Path, cwd: Path) -> Path:
    """A private copy of a finished train run under cwd/outputs/train/ (the shared one stays read-only)."""
    dest = cwd / "outputs" / "train" / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_nothing_but_logs(cwd: Path, command: str = "train") -> None:
    """A rejected run leaves at most its run directory with .hydra/ and <command>.log: no checkpoints or results."""
    for run in run_dirs(cwd, command):
        left = {p.name for p in run.iterdir()} - {".hydra", f"{command}.log"}
        assert not left, f"{run} holds {sorted(left)}"


# Wraps `dlrun train` in-process (like helpers.interrupt_when) to act just before epoch AT starts:
# copy checkpoints/ to ./snapshot (the files as they were before that epoch) and, with FAULT=enospc, make the
# fsync of every later checkpoint write fail as a full disk does.
BEFORE_EPOCH = """
import errno, os, shutil, types
from pathlib import Path
import dlrun.core.checkpoint as checkpoint, dlrun.training.loop as loop, dlrun.core.files as files
AT, FAULT = int(os.environ["AT"]), os.environ.get("FAULT", "")
armed = saving = False
train_epoch, save = loop.train_epoch, checkpoint.save
def before(*args, **kwargs):
    global armed
    if kwargs["epoch"] == AT:
        (checkpoints,) = Path("outputs/train").glob("*/checkpoints")
        shutil.copytree(checkpoints, "snapshot")
        armed = FAULT == "enospc"
    return train_epoch(*args, **kwargs)
def saving_checkpoint(*args, **kwargs):
    global saving
    saving = True
    try:
        return save(*args, **kwargs)
    finally:
        saving = False
def fsync(fd):
    if armed and saving:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return os.fsync(fd)
loop.train_epoch, checkpoint.save = before, saving_checkpoint
files.os = types.SimpleNamespace(**{**vars(os), "fsync": fsync})
from dlrun.cli import main
main()
"""


def run_before_epoch(args, cwd: Path, at: int, fault: str = "") -> Result:
    proc = subprocess.run(
        [PYTHON, "-c", BEFORE_EPOCH, *args],
        cwd=cwd,
        env=subprocess_env(AT=str(at), FAULT=fault),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ==== faults ====================================================================================


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(trained_run, tmp_path):
    """SIGKILL (no cleanup at all) once epoch 1 is written, then `dlrun train resume=RUN`: same dir, same result.

    trained_run is the same command run straight through (deterministic, step schedule independent of epochs).
    """
    proc = popen_dlrun(["train", *TINY_TRAIN, f"trainer.epochs={TINY_EPOCHS}", "name=killed"], tmp_path)
    run = wait_for_epochs(tmp_path, proc, 1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert finish(proc).returncode == -signal.SIGKILL
    done = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert done < TINY_EPOCHS  # killed mid-run
    assert int((run / ".lock").read_text()) == proc.pid  # the dead process's lock is left behind...
    stale = run / "checkpoints" / ".last.pt.k1ll3d.tmp"  # ...and so is the temp file of a write it was doing
    stale.write_bytes(b"half a checkpoint")

    result = ok(run_dlrun(["train", f"resume={run.relative_to(tmp_path)}"], tmp_path))
    assert f"after epoch {done}" in result.stdout
    assert run_dirs(tmp_path) == [run] and not (run / ".lock").exists()  # stale lock taken over, then released
    assert not temp_files(run, run / "checkpoints")
    assert_same_training(run, trained_run.run_dir)  # weights, optimizer, metrics rows (but timings), summary metrics


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_leaves_a_resumable_run(trained_run, tmp_path):
    """Two SIGINTs close together: exit 130 right after the second, no traceback, last.pt loads, resume works."""
    proc = popen_dlrun(["train", *TINY_TRAIN, f"trainer.epochs={TINY_EPOCHS}", "name=ctrl-c"], tmp_path)
    run = wait_for_epochs(tmp_path, proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # the first one is being handled (stop, say how to resume, shut down: >1 s with torch loaded)
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    result = finish(proc)
    assert time.monotonic() - second < 1.0
    # 130 from dlrun's handler; -SIGINT once Python's finalization has restored the default handler (a shell
    # reports both as 130). Either way at once, and never Python's KeyboardInterrupt traceback from atexit.
    assert result.returncode in (130, -signal.SIGINT), result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) <= 1, result.stderr
    assert not (run / ".lock").exists() and not temp_files(run, run / "checkpoints")
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] < TINY_EPOCHS

    ok(run_dlrun(["train", f"resume={run.relative_to(tmp_path)}"], tmp_path))
    assert_same_training(run, trained_run.run_dir)


def test_ctrl_c_handler_first_interrupts_then_exits_at_once(tmp_path, monkeypatch):
    """The handler `dlrun train` installs: KeyboardInterrupt first, then os._exit(130) without unwinding."""
    from dlrun.training import session

    lock = locks.acquire_lock(tmp_path)
    handler = session.on_interrupt(lock)
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)
    assert lock.exists()
    monkeypatch.setattr(session.os, "_exit", lambda code: sys.exit(f"os._exit({code})"))
    with pytest.raises(SystemExit, match=r"os._exit\(130\)"):
        handler(signal.SIGINT, None)
    assert not lock.exists()  # released on the way out


def test_ctrl_c_hint_is_a_relative_path(tmp_path):
    """The printed resume command names outputs/train/<run>, not this machine's absolute path."""
    result = run_script(INTERRUPT_IN_EPOCH_1, ["train", *SMALL], tmp_path)
    line = error_line(result, 130, "dlrun train resume=outputs/train/")
    assert str(tmp_path) not in line
    (run,) = run_dirs(tmp_path)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 0  # saved before the first epoch


# ---- atomic writes ------------------------------------------------------------------------------


def _write_metrics(path: Path, version: int) -> None:
    from dlrun.core.files import write_rows

    write_rows(path.parent, "metrics", [{"epoch": e, "train_loss": version / (e + 1)} for e in range(1, version + 2)])


WRITERS = {
    "atomic_write_bytes": ("last.pt", lambda path, v: files.atomic_write_bytes(path, bytes([v]) * 100_000)),
    "checkpoint.save": (
        "best.pt",
        lambda path, v: checkpoint.save(path, {"model": {"w": torch.full((1000,), v)}, "config": {}}),
    ),
    "write_json": ("summary.json", lambda path, v: files.write_json(path, {"version": v, "rows": list(range(1000))})),
    "metrics": ("metrics.jsonl", _write_metrics),
}


class FailingFile:
    """A file object whose write stores half the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def raises(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


FAULTS = {  # where the write breaks (all inside dlrun.core.files.atomic_write_bytes)
    "write": lambda mp: mp.setattr(files.os, "fdopen", lambda fd, mode: FailingFile(open(fd, mode))),
    "fsync": lambda mp: mp.setattr(files.os, "fsync", raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))),
    "replace": lambda mp: mp.setattr(files.os, "replace", raises(OSError(errno.EIO, os.strerror(errno.EIO)))),
    "interrupt": lambda mp: mp.setattr(files.os, "replace", raises(KeyboardInterrupt())),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("writer", WRITERS)
def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, writer, fault):
    """Disk full mid-write, fsync failing, a crash before the rename, Ctrl-C: the target stays the old version."""
    name, write = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    before = file_bytes(tmp_path)
    with monkeypatch.context() as mp:
        FAULTS[fault](mp)
        expected = KeyboardInterrupt if fault == "interrupt" else DlrunError
        with pytest.raises(expected) as info:
            write(path, 2)
    if expected is DlrunError:  # one line naming the file, as the CLI prints it
        assert f"cannot write {tmp_path}/" in str(info.value) and "previous file is intact" in str(info.value)
    assert file_bytes(tmp_path) == before  # same files, same bytes: no temp file left either
    write(path, 3)  # and the next write works
    assert file_bytes(tmp_path) != before and not temp_files(tmp_path)


KEEP_WRITING = """
import sys, itertools
from pathlib import Path
from dlrun.core.files import atomic_write_bytes, write_json
folder = Path(sys.argv[1])
for version in itertools.count():
    atomic_write_bytes(folder / "last.pt", bytes([version % 256]) * 4_000_000)
    write_json(folder / "summary.json", {"version": version, "rows": list(range(200_000))})
    (folder / "written").write_text(str(version))
"""


def test_sigkill_while_writing_leaves_the_old_or_the_new_file(tmp_path):
    """A writer killed at arbitrary moments: last.pt and summary.json are always one complete version."""
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([PYTHON, "-c", KEEP_WRITING, str(tmp_path)], env=subprocess_env())
        deadline = time.monotonic() + 60
        while not (tmp_path / "written").exists() and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        data = (tmp_path / "last.pt").read_bytes()
        assert len(data) == 4_000_000 and data == bytes([data[0]]) * len(data)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["rows"] == list(range(200_000))
        assert abs(summary["version"] % 256 - data[0]) <= 1 or {summary["version"] % 256, data[0]} == {0, 255}
        locks.remove_stale_temps(tmp_path)  # what `dlrun train resume=` does once it holds the run's lock
        assert not temp_files(tmp_path)
        (tmp_path / "written").unlink()


# ---- NaN / inf ----------------------------------------------------------------------------------

# Epoch 1 trains normally; scheduler=step multiplies the lr by 1e30 from epoch 2 on, so Adam's first step
# there makes the weights astronomically large and the next forward pass overflows: loss inf/NaN at step 2.
EXPLODE_IN_EPOCH_2 = (
    *SMALL,
    "trainer.deterministic=true",
    "optimizer.lr=0.01",
    "scheduler=step",
    "scheduler.step_epochs=1",
    "scheduler.gamma=1e30",
)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoints_bitwise(tmp_path):
    result = run_before_epoch(["train", *EXPLODE_IN_EPOCH_2, "trainer.nan_policy=stop"], tmp_path, at=2)
    error_line(result, 1, "NaN/inf at epoch 2, step 2", "trainer.nan_policy=skip_batch")
    (run,) = run_dirs(tmp_path)
    assert file_bytes(run / "checkpoints") == file_bytes(tmp_path / "snapshot")  # best.pt/last.pt of epoch 1
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()
    assert "NaN/inf at epoch 2, step 2" in (run / "train.log").read_text()


def test_nan_skip_batch_completes_and_reports_skipped_batches(tmp_path):
    result = ok(run_dlrun(["train", *EXPLODE_IN_EPOCH_2, "trainer.nan_policy=skip_batch"], tmp_path))
    (run,) = run_dirs(tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.startswith("epoch 2/2"))
    skipped = int(re.search(r"skipped (\d+) non-finite batches", line).group(1))
    assert skipped >= 1
    assert f"skipped {skipped} non-finite batches" in (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["epochs_run"] == 2  # the exploded epoch is not the best
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    weights = [v for k, v in last["model"].items() if "running" not in k and v.is_floating_point()]
    assert all(torch.isfinite(w).all() for w in weights)  # skipped batches never stepped with NaN gradients


# ---- locks, unwritable outputs, full disk -------------------------------------------------------


def test_resume_of_a_run_another_live_process_writes_is_refused_then_a_stale_lock_is_taken_over(trained_run, cli):
    run = copy_run(trained_run.run_dir, cli.cwd)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (run / ".lock").write_text(str(sleeper.pid))
        before = file_bytes(run)
        error_line(cli("train", f"resume={run}"), 2, f"in use by process {sleeper.pid}", ".lock")
        assert file_bytes(run) == before  # not even .hydra/overrides.yaml or train.log of the live run changed
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock, now of a dead process: stale, taken over (a finished run resumes to its summary again)
    ok(cli("train", f"resume={run}"))
    assert not (run / ".lock").exists() and run_dirs(cli.cwd) == [run]
    assert json.loads((run / "summary.json").read_text())["metrics"] == trained_run.summary["metrics"]


def test_lock_file_never_reads_empty(tmp_path):
    """acquire_lock writes the pid before the lock exists (link), so a reader never sees an empty lock as stale."""
    lock = locks.acquire_lock(tmp_path)
    assert lock.read_text() == str(os.getpid()) and sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    locks.acquire_lock(tmp_path)  # our own lock: fine
    lock.write_text(str(dead_pid()))
    assert locks.acquire_lock(tmp_path).read_text() == str(os.getpid())  # stale: taken over
    locks.release_lock(lock)
    assert not lock.exists()


@pytest.mark.parametrize("blocker", ["outputs", "outputs/train"])
def test_outputs_not_writable_is_one_line_and_touches_nothing(cli, blocker):
    """Tests run as root, where chmod stops nothing: a *file* where the folder should be makes every mkdir fail."""
    path = cli.cwd / blocker
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("precious\n")
    error_line(cli("train", *SMALL), 1, "cannot create a run directory under outputs/train")
    assert path.read_text() == "precious\n" and sorted(p.name for p in cli.cwd.iterdir()) == ["outputs"]


def test_disk_full_on_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoints(tmp_path):
    result = run_before_epoch(["train", *SMALL, "scheduler=none"], tmp_path, at=2, fault="enospc")
    (run,) = run_dirs(tmp_path)
    error_line(result, 1, "cannot write", "checkpoints/", ".pt: No space left on device", "previous file is intact")
    assert file_bytes(run / "checkpoints") == file_bytes(tmp_path / "snapshot")  # epoch 1's, bit for bit
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]  # resume drops rows after last.pt
    assert not temp_files(run, run / "checkpoints") and not (run / ".lock").exists()


# ==== bad input =================================================================================


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.epochs=1,2"], "trainer.epochs=1,2 is a sweep: add --multirun"),
        (["-m", "trainer.seed=1,2", "--cfg", "job"], "--cfg prints one job's config"),
        (["name=${oops}"], "cannot resolve the config: Interpolation key 'oops' not found"),
        (["dataset=image_folder"], "dataset.root is required"),
        (["trainer.device=cuda:x"], "trainer.device must be one of auto, cpu, cuda, cuda:N"),
        (["optimizer.lr=inf"], "optimizer.lr must be a number > 0 and finite, got inf"),
        (["trainer.nan_policy=ignore"], "trainer.nan_policy must be one of stop, skip_batch"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_caught_before_any_run_directory(cli, args, message):
    error_line(cli("train", *args), 2, message)
    assert not (cli.cwd / "outputs").exists()


def test_cuda_without_a_gpu_is_a_usage_error(cli):
    result = cli("train", *SMALL, "trainer.device=cuda", env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    error_line(result, 2, "no CUDA GPU is available", "device=cpu")
    assert_nothing_but_logs(cli.cwd)


def test_model_dataset_mismatch_is_caught_before_training(cli):
    error_line(
        cli("train", "dataset=diabetes", "model=lenet", "trainer.device=cpu"),
        2,
        "model lenet needs image input",
        "model=mlp",
    )
    assert_nothing_but_logs(cli.cwd)


def _image_folder(root: Path, case: str) -> tuple[Path, str]:
    """A broken image folder and the message naming what is wrong with it."""
    from PIL import Image

    if case == "missing":
        return root / "nowhere", f"image_folder root {root / 'nowhere'} does not exist"
    root.mkdir()
    if case == "empty":
        return root, f"image_folder root {root} has no class sub-folders"
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / name / f"{i}.png")
    if case == "class_without_images":
        (root / "bird").mkdir()
        (root / "bird" / "notes.txt").write_text("no images here")
        return root, f"class folder {root / 'bird'} has no images"
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, f"unreadable image {root / 'dog' / 'broken.jpg'}"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("missing", marks=pytest.mark.slow),
        pytest.param("empty", marks=pytest.mark.slow),
        pytest.param("class_without_images", marks=pytest.mark.slow),
        "unreadable",
    ],
)
def test_bad_image_folder_is_one_line_naming_the_path(cli, case):
    root, message = _image_folder(cli.cwd / "images", case)
    error_line(
        cli(
            "train",
            "dataset=image_folder",
            f"dataset.root={root}",
            "dataset.num_workers=0",
            "trainer.device=cpu",
            "model=linear",
        ),
        2,
        message,
    )
    assert_nothing_but_logs(cli.cwd)


class RunsCode:
    """Unpickling this runs a shell command (creates `marker`): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def foreign_checkpoints(trained_run, tmp_path):
    real = (trained_run.run_dir / "checkpoints" / "best.pt").read_bytes()
    files = {
        "truncated": tmp_path / "truncated.pt",
        "text": tmp_path / "notes.pt",
        "mismatch": tmp_path / "mismatch.pt",
    }
    files["truncated"].write_bytes(real[: len(real) * 2 // 3])
    files["text"].write_text("definitely not weights\n")
    # Its config says LeNet channels [8,16], its weights come from channels [32,64].
    saved = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    from dlrun import models

    wide = models.LeNet((1, 8, 8), 10, channels=[32, 64], hidden=32)
    torch.save({**saved, "model": wide.state_dict()}, files["mismatch"])
    assert saved["config"]["model"]["channels"] == [8, 16]
    return files


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "is not a readable checkpoint (truncated or corrupt)"),
        pytest.param("text", "is not a torch checkpoint file", marks=pytest.mark.slow),  # load() itself: test_eval_cli
        ("mismatch", "does not fit its own model config"),
    ],
)
def test_eval_refuses_broken_checkpoints(foreign_checkpoints, cli, kind, message):
    error_line(
        cli("eval", f"ckpt={foreign_checkpoints[kind]}", "device=cpu"), 2, message, foreign_checkpoints[kind].name
    )
    assert_nothing_but_logs(cli.cwd, "eval")


def test_eval_of_a_run_dir_without_checkpoint(cli):
    (cli.cwd / "empty_run").mkdir()
    error_line(cli("eval", "run=empty_run", "device=cpu"), 2, "empty_run holds no checkpoints/best.pt")
    assert_nothing_but_logs(cli.cwd, "eval")


# ---- property-based: validation never crashes -----------------------------------------------------

_DEFAULTS = validate._leaves(compose.compose("train", []))
_LEAVES = sorted(k for k, v in _DEFAULTS.items() if not isinstance(v, dict))
_GROUPS = {g: o for g, o in compose.groups().items() if g in ("dataset", "model", "optimizer", "scheduler", "trainer")}
_VALUES = [
    "1",
    "0",
    "-1",
    "2.5",
    "1e30",
    "nan",
    "inf",
    "-inf",
    "true",
    "false",
    "null",
    "abc",
    "''",
    "'a b'",
    "[]",
    "[1,2]",
    "[8,16]",
    "[a,b]",
    "{a:1}",
    "{}",
    "${trainer.seed}",
    "${oops}",
    "???",
    "1,2",
    "range(1,3)",
    "cpu",
    "cuda",
    "cuda:0",
    "tpu",
    "auto",
    "stop",
    "skip_batch",
    "bf16",
    "fp16",
    "../../etc",
    "ü",
    "a=b",
    "",
]

_key = st.one_of(
    st.sampled_from(_LEAVES),
    st.sampled_from(_LEAVES).flatmap(
        lambda k: st.sampled_from([k + "x", k[:-1], k.replace(".", "_"), k.upper(), k + ".sub"])
    ),
    st.sampled_from(sorted(_GROUPS)),
    st.text(alphabet=string.ascii_letters + "._-/ ü0", min_size=0, max_size=12),
)
_value = st.one_of(
    st.sampled_from(_VALUES),
    st.sampled_from(sorted({o for options in _GROUPS.values() for o in options})),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=8),
)


def _typed_value(key: str):
    """Values of the default's type (mostly valid, some out of range: epochs=0, lr=-0.5...)."""
    default = _DEFAULTS[key]
    if isinstance(default, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(default, int):
        return st.integers(-2, 100).map(str)
    if isinstance(default, float):
        return st.floats(-1, 2, allow_nan=False).map(repr)
    if isinstance(default, list):
        return st.lists(st.integers(1, 64), max_size=3).map(lambda v: "[" + ",".join(map(str, v)) + "]")
    return st.sampled_from(["null", "cpu", "auto", "cuda:1", "stop", "skip_batch", "fp32", "bf16", "run1"])


_mostly_valid = st.one_of(
    st.sampled_from(_LEAVES).flatmap(lambda k: _typed_value(k).map(lambda v: f"{k}={v}")),
    st.sampled_from(sorted(_GROUPS)).flatmap(lambda g: st.sampled_from(_GROUPS[g]).map(lambda o: f"{g}={o}")),
)
_anything = st.one_of(
    st.tuples(st.sampled_from(["", "", "", "+", "++", "~"]), _key, _value).map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
    _key.map(lambda k: f"~{k}"),
)
_overrides = st.lists(st.one_of(_mostly_valid, _mostly_valid, _anything), max_size=5)


def _validate_or_usage_error(overrides: list[str]) -> None:
    try:
        cfg = validate.validate("train", overrides)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc), overrides
        return
    # what the CLI does next with an accepted config: these may only raise UsageError too
    for check in (
        lambda: validate.check_no_sweep(overrides),
        lambda: validate.check_complete(cfg),
        lambda: cfg.get("name"),
    ):
        try:
            check()
        except UsageError:
            return


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_overrides)
def test_validate_raises_only_usage_errors(overrides):
    _validate_or_usage_error(overrides)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_overrides)
def test_validate_raises_only_usage_errors_500(overrides):
    _validate_or_usage_error(overrides)


@pytest.mark.slow
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(overrides=_overrides)
def test_cli_cfg_job_never_shows_a_traceback(tmp_path, overrides):
    result = run_dlrun(["train", *overrides, "--cfg", "job"], tmp_path, timeout=120)
    assert result.returncode in (0, 2), (overrides, result)
    assert "Traceback" not in result.stderr + result.stdout, (overrides, result.stderr)
    if result.returncode == 2:
        assert result.stderr.strip(), overrides
    assert not (tmp_path / "outputs").exists()


# ==== security ==================================================================================


@pytest.mark.parametrize("command", ["quantize", "resume"])
def test_code_running_checkpoint_is_refused(trained_run, cli, command):
    """eval is covered in test_eval_cli.py; quantize ckpt= and train resume= (evil last.pt) refuse it the same way."""
    marker = cli.cwd / "PWNED"
    evil = {"model": {}, "config": {}, "epoch": 0, "payload": RunsCode(marker)}
    if command == "quantize":
        path = cli.cwd / "evil.pt"
        torch.save(evil, path)
        result = cli("quantize", f"ckpt={path}")
    else:
        run = copy_run(trained_run.run_dir, cli.cwd)
        path = run / "checkpoints" / "last.pt"
        torch.save(evil, path)
        best = (run / "checkpoints" / "best.pt").read_bytes()
        result = cli("train", f"resume={run}")
        assert (run / "checkpoints" / "best.pt").read_bytes() == best and not (run / ".lock").exists()
    error_line(result, 2, "refusing to load", "would run Python code", str(path.name))
    assert not marker.exists()


def test_checkpoint_naming_a_blocked_module_is_called_code_running(tmp_path):
    """torch words it differently for os.system ("whose module posix is blocked") than for builtins.open."""
    marker = tmp_path / "PWNED"
    torch.save({"model": {}, "config": {}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match=r"refusing to load .*evil.pt: it would run Python code \(posix.system\)"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=100))
def test_any_run_name_is_one_path_component_inside_outputs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    run = rundir.reserve_run_dir("train", name)
    try:
        assert run.parent == rundir.OUTPUTS / "train"
        assert re.fullmatch(TIMESTAMP + r"(_[\w.-]{1,80})?(-\d+)?", run.name), run.name
        assert run.resolve().parent == (tmp_path / "outputs" / "train").resolve()
    finally:
        run.rmdir()


def test_summaries_and_checkpoints_hold_no_absolute_paths(cli):
    """train (with a name full of slashes, spaces and unicode) + eval of it: nothing records this machine's cwd."""
    ok(cli("train", *SMALL, "name='../../my run/ü'"))
    (run,) = run_dirs(cli.cwd)
    assert re.fullmatch(TIMESTAMP + "_my-run-ü", run.name) and run.parent == cli.cwd / "outputs" / "train"
    ok(cli("eval", f"run={run.relative_to(cli.cwd)}", "device=cpu", "latency_repeats=2"))
    (evaluated,) = run_dirs(cli.cwd, "eval")
    cwd_forms = {str(cli.cwd), str(cli.cwd.resolve())}
    texts = {
        "train summary": (run / "summary.json").read_text(),
        "eval summary": (evaluated / "summary.json").read_text(),
        "metrics": (run / "metrics.jsonl").read_text() + (run / "metrics.csv").read_text(),
    }
    for name in ("last.pt", "best.pt"):
        saved = torch.load(run / "checkpoints" / name, weights_only=True)
        texts[name] = json.dumps(
            {k: v for k, v in saved.items() if k not in ("model", "optimizer", "rng")}, default=str
        )
        assert saved["config"]["name"] == "../../my run/ü"  # as given: the user's words, not a path
    for what, text in texts.items():
        for form in cwd_forms:
            assert form not in text, f"{what} embeds {form}"
