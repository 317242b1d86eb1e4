"""Data-parallel training (trainer.devices=N, torchrun) on CPU with gloo: one run directory, rank-0 writers, the
single-process accuracy, resume, a killed rank, and the launcher's bad input."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from dlrun.core import checkpoint
from helpers import (
    PYTHON,
    TINY_EPOCHS,
    TINY_TRAIN,
    Result,
    error_line,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    subprocess_env,
)

# trainer.devices is capped at the CPU cores on a machine without GPUs.
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two CPU cores")

# The single-process TINY_TRAIN run uses batches of 64: two ranks of 32 see the same global batches.
DDP_TRAIN = (*TINY_TRAIN, "trainer.devices=2", "trainer.batch_size=32")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    result = ok(run_dlrun(["train", *DDP_TRAIN, f"trainer.epochs={TINY_EPOCHS}"], cwd))
    return cwd, result


def test_ddp_matches_single_process_in_one_run_directory(ddp_run, trained_run):
    cwd, result = ddp_run
    (run,) = run_dirs(cwd)  # one directory for both ranks
    summary = json.loads((run / "summary.json").read_text())
    single = trained_run.summary["metrics"]["test"]["accuracy"]
    assert abs(summary["metrics"]["test"]["accuracy"] - single) <= 0.01
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    # Rank 0 writes the run's files; rank 1 only its log, and nothing of it reaches the terminal.
    assert (run / "checkpoints" / "best.pt").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert "epoch 1/" in (run / "rank1.log").read_text()
    assert result.stdout.count("epoch 1/") == 1 and result.stdout.count("wrote outputs/train/") == 1
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, TINY_EPOCHS + 1))
    # The checkpoint is an ordinary one: eval (one process) reproduces the test accuracy over the whole split.
    evaluated = ok(run_dlrun(["eval", f"run={run}"], cwd))
    eval_run = run_dirs(cwd, "eval")[0]
    measured = json.loads((eval_run / "summary.json").read_text())["metrics"]["test"]["accuracy"]
    assert measured == pytest.approx(summary["metrics"]["test"]["accuracy"]), evaluated.stdout


def test_ddp_resume_continues_the_run(tmp_path):
    ok(run_dlrun(["train", *DDP_TRAIN, "trainer.epochs=1"], tmp_path))
    (run,) = run_dirs(tmp_path)
    result = ok(run_dlrun(["train", f"resume={run}", "trainer.epochs=2"], tmp_path))
    assert "resuming" in result.stdout
    assert run_dirs(tmp_path) == [run]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


def _kill_rank_1_in_epoch_3(folder) -> str:
    """A PYTHONPATH whose sitecustomize makes rank 1 SIGKILL itself as epoch 3 starts, as the OOM killer would.
    Rank 1 gets there only after rank 0 finished epoch 1 (its checkpoint included): epoch 2's steps wait for it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os

        if os.environ.get("RANK") == "1":
            import signal

            import dlrun.training.loop as loop

            train_epoch = loop.train_epoch

            def killed(*args, epoch, **kwargs):
                if epoch == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return train_epoch(*args, epoch=epoch, **kwargs)

            loop.train_epoch = killed
        """)
    )
    return str(folder)


def test_a_killed_rank_stops_the_job_in_one_line(tmp_path):
    env = subprocess_env(PYTHONPATH=_kill_rank_1_in_epoch_3(tmp_path / "hook"))
    result = run_dlrun(["train", *DDP_TRAIN, "trainer.epochs=4", "trainer.dist_timeout_s=30"], tmp_path, env=env)
    line = error_line(result, 1, "rank 1 was killed by SIGKILL")
    assert "rank1.log" in line and "resume" in line
    (run,) = run_dirs(tmp_path)
    # Epoch 1 (maybe 2) completed before the kill; nothing half-written is left.
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] in (1, 2)
    assert not list(run.rglob("*.tmp*"))
    assert "Traceback" not in result.stderr


def test_torchrun_launch_shares_one_run_directory(tmp_path):
    """An outside launcher: rank 0 reserves the run directory and broadcasts it."""
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "dlrun", "train", *TINY_TRAIN, "trainer.epochs=1", "name=torchrun"]
    proc = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    ok(Result(proc.returncode, proc.stdout, proc.stderr))
    (run,) = run_dirs(tmp_path)
    assert run.name.endswith("_torchrun") and (run / "rank1.log").is_file()
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


def test_unreachable_master_times_out_in_one_line(tmp_path):
    env = subprocess_env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
    result = run_dlrun(["train", *TINY_TRAIN, "trainer.dist_timeout_s=2"], tmp_path, env=env, timeout=120)
    error_line(result, 2, "could not join the process group at 127.0.0.1:9 within 2s")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["trainer.devices=512"], "this machine has"),
        (["trainer.devices=0"], "trainer.devices must be an integer >= 1"),
        (["-m", "trainer.devices=2", "trainer.seed=0,1"], "with --multirun"),
    ],
)
def test_bad_device_counts_are_refused(tmp_path, args, needle):
    error_line(run_dlrun(["train", *args], tmp_path), 2, needle)
    assert not run_dirs(tmp_path)


def test_commands_that_run_in_one_process_refuse_a_launcher(tmp_path):
    env = subprocess_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
    error_line(run_dlrun(["eval", "ckpt=missing.pt"], tmp_path, env=env), 2, "runs in one process")


def test_ctrl_c_stops_every_rank_and_says_how_to_resume(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the launcher and both ranks."""
    import signal
    import time

    command = [PYTHON, "-m", "dlrun", "train", *DDP_TRAIN, "trainer.epochs=500"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    # Two metric rows: epoch 1's last.pt (written after its row) is on disk.
    while time.monotonic() < deadline and not any(
        len(path.read_text().splitlines()) >= 2 for path in tmp_path.glob("outputs/train/*/metrics.jsonl")
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    line = error_line(Result(proc.returncode, stdout, stderr), 130, "interrupted", "dlrun train resume=outputs/train/")
    assert stderr.strip().splitlines() == [line]  # nothing else: no launcher chatter, no second rank's line
    (run,) = run_dirs(tmp_path)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] >= 1
