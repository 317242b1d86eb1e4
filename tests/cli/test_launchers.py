"""Sweeps through `hydra/launcher=...` (hydra-submitit-launcher): the local launcher runs a 2-job sweep in child
processes; dlrun's SLURM config composes without SLURM; an unknown launcher is one line."""

from __future__ import annotations

import json

from helpers import MICRO_TRAIN, error_line, ok, run_dlrun


def test_submitit_local_runs_a_two_job_sweep_and_reports_it(tmp_path):
    result = ok(run_dlrun(["train", "-m", "hydra/launcher=submitit_local", "trainer.seed=0,1", *MICRO_TRAIN], tmp_path))
    (sweep,) = (tmp_path / "outputs" / "train" / "multirun").iterdir()
    seeds = {}
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        seeds[job] = summary["config"]["trainer"]["seed"]
    assert seeds == {"0": 0, "1": 1}
    assert (sweep / ".submitit").is_dir()  # the jobs ran through submitit, in their own processes
    assert "2 of 2 jobs ok" in result.stdout and "trainer.seed=1" in result.stdout


def test_the_slurm_launcher_config_composes_without_slurm(tmp_path):
    out = ok(
        run_dlrun(["train", "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path)
    ).stdout
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    for line in ("partition: gpu", "nodes: 1", "gpus_per_node: 1", "tasks_per_node: 1", "timeout_min: 240"):
        assert f"    {line}\n" in out, line
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_launcher_is_one_line(tmp_path):
    line = error_line(run_dlrun(["train", "-m", "hydra/launcher=slurmm", "trainer.seed=0,1"], tmp_path), 2)
    assert "unknown hydra/launcher 'slurmm'" in line and "submitit_local" in line
    assert not (tmp_path / "outputs").exists()
