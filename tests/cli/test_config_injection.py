"""A stored config never runs code: checkpoints, summaries and resumed runs name only dlrun's builders.

A checkpoint made with plain `torch.save` of a dict passes `weights_only=True`, and eval/quantize/export/
bench/resume rebuild the model from the config stored in it (or in the summary.json beside an artifact).
Hydra's instantiate imports and calls any `_target_`, so every such config goes through an allowlist
before anything is built: each test plants a file-writing payload and checks it never ran.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dlrun.config.trust import builtin_targets, check_stored_config, check_targets
from dlrun.core.errors import UsageError
from helpers import error_line, ok, tree_hashes


def write_text_payload(target_file) -> dict:
    """A model config that, instantiated, would write `target_file`."""
    return {"_target_": "pathlib.Path.write_text", "_args_": [str(target_file), "pwned"]}


def evil_checkpoint(trained_run, path, payload_file, section: str = "model") -> None:
    saved = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    saved["config"][section] = write_text_payload(payload_file)
    torch.save(saved, path)


def copied_run(trained_run, cwd):
    run = cwd / "outputs" / "train" / trained_run.run_dir.name
    shutil.copytree(trained_run.run_dir, run)
    return run


# --- the check itself ----------------------------------------------------------------------------------


def test_builtin_targets_are_read_from_conf():
    targets = builtin_targets()
    assert {
        "dlrun.models.LeNet",
        "dlrun.data.digits",
        "torch.optim.Adam",
        "dlrun.training.schedulers.cosine",
    } <= targets
    assert not any(t.startswith(("pathlib", "os", "subprocess", "builtins")) for t in targets)


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"_target_": "pathlib.Path.write_text", "data": "x"}, "pathlib.Path.write_text"),
        ({"_target_": "dlrun.models.LeNet", "_args_": ["x"]}, "model._args_"),
        ({"_target_": "dlrun.models.LeNet", "_recursive_": True}, "model._recursive_"),
        ({"_target_": "dlrun.models.LeNet", "hidden": {"_target_": "dlrun.models.LeNet"}}, "model.hidden._target_"),
        ({"_target_": "dlrun.models.LeNet", "channels": [{"_target_": "os.getcwd"}]}, "model.channels[0]._target_"),
        ({"_target_": "dlrun.models.LeNet", "hidden": "${oc.env:HOME}"}, "interpolation"),
    ],
)
def test_stored_config_refused(model, needle):
    config = {"dataset": {"_target_": "dlrun.data.digits"}, "model": model}
    with pytest.raises(UsageError, match="refusing the config in ckpt.pt") as error:
        check_stored_config(config, "ckpt.pt")
    assert needle in str(error.value)


@pytest.mark.parametrize(
    "config", [None, [], {"model": {}}, {"dataset": {"_target_": "dlrun.data.digits"}, "model": {}}]
)
def test_stored_config_of_the_wrong_shape_is_refused(config):
    with pytest.raises(UsageError, match="holds no usable config"):
        check_stored_config(config, "ckpt.pt")


def test_a_trusted_target_passes_and_others_still_fail():
    config = {"dataset": {"_target_": "dlrun.data.digits"}, "model": {"_target_": "mine.Net", "width": 3}}
    check_stored_config(config, "ckpt.pt", trusted=["mine.Net"])
    with pytest.raises(UsageError, match="'mine.Net' is not one of dlrun's builders"):
        check_stored_config(config, "ckpt.pt", trusted=["other.Net"])
    check_targets(
        {"model": {"_target_": "x", "n": "${dataset.n}"}}, "cli", ["x"], stored=False
    )  # composed: interpolations ok


# --- every command that reads a stored config ----------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "quantize", "export"])
@pytest.mark.parametrize("section", ["model", "dataset"])
def test_checkpoint_with_an_injected_target_is_refused(trained_run, cli, command, section):
    payload = cli.cwd / "PWNED"
    evil_checkpoint(trained_run, cli.cwd / "evil.pt", payload, section)
    error_line(cli(command, "ckpt=evil.pt"), 2, "refusing the config in evil.pt", "pathlib.Path.write_text")
    assert not payload.exists()


@pytest.mark.parametrize("command", ["eval", "bench", "quantize", "export"])
def test_run_directory_with_an_injected_target_is_refused(trained_run, cli, command):
    payload = cli.cwd / "PWNED"
    run = copied_run(trained_run, cli.cwd)
    evil_checkpoint(trained_run, run / "checkpoints" / "best.pt", payload)
    error_line(cli(command, f"run={run}"), 2, "refusing the config", "best.pt")
    assert not payload.exists()


def test_summary_beside_an_artifact_with_an_injected_target_is_refused(fp32_pte, cli):
    payload = cli.cwd / "PWNED"
    export_dir = cli.cwd / "export"
    shutil.copytree(fp32_pte, export_dir)
    summary = json.loads((export_dir / "summary.json").read_text())
    summary["source_config"]["model"] = write_text_payload(payload)
    (export_dir / "summary.json").write_text(json.dumps(summary))
    error_line(cli("eval", f"artifact={export_dir / 'model.pte'}"), 2, "source_config", "pathlib.Path.write_text")
    assert not payload.exists()


def test_resume_replaying_an_injected_override_is_refused_and_touches_nothing(trained_run, cli):
    payload = cli.cwd / "PWNED"
    run = copied_run(trained_run, cli.cwd)
    overrides = run / ".hydra" / "overrides.yaml"
    overrides.write_text(
        overrides.read_text() + "- model._target_=pathlib.Path.write_text\n"
        f"- +model.self={payload}\n- +model.data=pwned\n"
    )
    before = tree_hashes(run)
    error_line(cli("train", f"resume={run}"), 2, "resumed run's .hydra/overrides.yaml", "pathlib.Path.write_text")
    assert not payload.exists()
    assert tree_hashes(run) == before


def test_a_users_own_model_class_needs_trust_to_be_rebuilt_from_a_checkpoint(trained_run, cli):
    """The allowlist is not a refuse-all: a target the user vouches for with trust_targets= is rebuilt."""
    (cli.cwd / "my_models.py").write_text("from dlrun.models import LeNet\n\n\nclass MyNet(LeNet):\n    pass\n")
    saved = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    saved["config"]["model"]["_target_"] = "my_models.MyNet"
    torch.save(saved, cli.cwd / "mine.pt")
    error_line(cli("eval", "ckpt=mine.pt"), 2, "'my_models.MyNet' is not one of dlrun's builders", "trust_targets=")
    ok(cli("eval", "ckpt=mine.pt", "trust_targets=[my_models.MyNet]", "latency_repeats=3"))
