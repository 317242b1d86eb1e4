"""Config composition and validation (conf/ + dlrun.config), `dlrun ls`, `--help`, startup imports, packaging."""

from __future__ import annotations

import math
import shutil
import subprocess
import zipfile

import pytest
import yaml
from omegaconf import OmegaConf

from dlrun.config import compose, validate
from dlrun.core.errors import UsageError
from helpers import PYTHON, REPO, error_line, ok, run_dlrun, subprocess_env

TRAIN_GROUPS = ("dataset", "model", "optimizer", "scheduler", "trainer")
OPTIONS = [(group, option) for group in TRAIN_GROUPS for option in compose.groups()[group]]


def test_train_groups_have_options():
    available = compose.groups()
    for group in TRAIN_GROUPS:
        assert available[group], group
    assert {"digits", "diabetes", "synthetic", "mnist", "fashion_mnist", "cifar10", "image_folder"} <= set(
        available["dataset"]
    )
    assert {"linear", "mlp", "lenet", "googlenet", "resnet", "resnet18", "mobilenet_v2"} <= set(available["model"])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_is_described(group, option):
    cfg = validate.validate("train", [f"{group}={option}"])
    own = OmegaConf.load(compose.conf_dir() / group / f"{option}.yaml")
    if "_target_" in own:
        assert cfg[group]._target_ == own._target_
    else:  # trainer options: compare a value the option sets
        assert cfg.trainer.epochs == (own.epochs if "epochs" in own else 15)
    assert compose.describe(group, option), f"{group}/{option}.yaml has no description comment"


def test_defaults_compose_to_a_runnable_config():
    cfg = validate.validate("train", [])
    assert cfg.dataset._target_ == "dlrun.data.digits"
    assert cfg.model._target_ == "dlrun.models.LeNet"
    # model shapes follow the dataset through interpolation
    assert list(cfg.model.input_shape) == [1, 8, 8] and cfg.model.num_outputs == 10
    cfg = validate.validate("train", ["dataset=cifar10"])
    assert list(cfg.model.input_shape) == [3, 32, 32]


def test_eval_config_composes():
    cfg = validate.validate("eval", ["ckpt=x.pt", "device=cpu", "batch_size=8"])
    assert cfg.ckpt == "x.pt" and cfg.batch_size == 8
    with pytest.raises(UsageError, match="batch_size must be an integer >= 1"):
        validate.validate("eval", ["batch_size=0"])


def test_sweep_values_are_all_checked():
    validate.validate("train", ["optimizer.lr=0.1,0.01"])
    with pytest.raises(UsageError, match="optimizer.lr must be a number"):
        validate.validate("train", ["optimizer.lr=0.1,abc"])
    with pytest.raises(UsageError, match="unknown model 'resnt'"):
        validate.validate("train", ["model=lenet,resnt"])


def test_every_optimizer_and_scheduler_instantiates():
    import torch
    from hydra.utils import instantiate

    for optimizer in compose.groups()["optimizer"]:
        for scheduler in compose.groups()["scheduler"]:
            cfg = validate.validate("train", [f"optimizer={optimizer}", f"scheduler={scheduler}"])
            params = [torch.nn.Parameter(torch.ones(3))]
            opt = instantiate(cfg.optimizer)(params)
            sched = instantiate(cfg.scheduler)(opt, total_steps=20, steps_per_epoch=5)
            lrs = []
            for _ in range(20):
                params[0].sum().backward()
                opt.step()
                sched.step()
                lrs.append(opt.param_groups[0]["lr"])
            assert all(math.isfinite(lr) and lr >= 0 for lr in lrs), (optimizer, scheduler, lrs)
            assert max(lrs) <= cfg.optimizer.lr * (cfg.scheduler.get("max_lr_ratio", 1.0)) + 1e-12


def test_add_and_delete_keys_are_accepted():
    cfg = validate.validate("train", ["+optimizer.betas=[0.9,0.99]", "~optimizer.weight_decay"])
    assert list(cfg.optimizer.betas) == [0.9, 0.99]
    assert "weight_decay" not in cfg.optimizer


# ---- what the user sees on the command line ---------------------------------------------------


def test_mistyped_key_suggests_the_right_one(cli):
    line = error_line(cli("train", "optimizer.lrr=0.1"), 2, "optimizer.lrr", "did you mean 'optimizer.lr'")
    assert "+optimizer.lrr" in line  # tells how to add a key on purpose
    assert not (cli.cwd / "outputs").exists()  # rejected before any run directory is made


def test_unknown_option_names_the_closest_and_lists_all(cli):
    line = error_line(cli("train", "model=resnt"), 2, "'resnt'", "did you mean 'resnet'")
    for option in compose.groups()["model"]:
        assert option in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=abc", "optimizer.lr must be a number, got 'abc'"),
        ("optimizer.lr=0", "optimizer.lr must be a number > 0"),
        ("trainer.epochs=-1", "trainer.epochs must be an integer >= 1, got -1"),
        ("trainer.epochs=2.5", "trainer.epochs must be an integer"),
        ("trainer.batch_size=0", "trainer.batch_size must be an integer >= 1, got 0"),
        ("trainer.device=tpu", "trainer.device must be one of auto, cpu, cuda"),
        ("trainer.deterministic=maybe", "trainer.deterministic must be true or false"),
        ("model.channels=3", "model.channels must be a list"),
        ("dataset.val_fraction=1.5", "dataset.val_fraction must be a number in [0, 1)"),
    ],
)
def test_bad_values_are_one_line_usage_errors(cli, override, message):
    error_line(cli("train", override), 2, message)
    assert not (cli.cwd / "outputs").exists()  # rejected before any run directory (let alone checkpoints/) is made


def test_unknown_device_for_eval(cli):
    error_line(cli("eval", "device=tpu"), 2, "device must be one of auto, cpu, cuda")


def test_add_and_delete_keys_on_the_command_line(cli):
    result = ok(cli("train", "+optimizer.betas=[0.9,0.99]", "~optimizer.weight_decay", "--cfg", "job"))
    printed = yaml.safe_load(result.stdout)
    assert printed["optimizer"]["betas"] == [0.9, 0.99]
    assert "weight_decay" not in printed["optimizer"] and printed["optimizer"]["lr"] == 0.002


def test_ls_lists_every_group_option_with_its_description(cli):
    out = ok(cli("ls")).stdout
    for group in TRAIN_GROUPS:
        for option in compose.groups()[group]:
            assert option in out
            assert compose.describe(group, option)[:30] in out, (group, option)


def test_ls_one_group(cli):
    out = ok(cli("ls", "model")).stdout
    assert "lenet" in out and compose.describe("model", "resnet18")[:30] in out
    assert "digits" not in out and "adamw" not in out


def test_ls_unknown_group(cli):
    error_line(cli("ls", "nosuchgroup"), 2, "unknown config group 'nosuchgroup'", "model")


def test_help_lists_commands(cli):
    out = ok(cli("--help")).stdout
    for command in ("train", "eval", "ls"):
        assert command in out


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["train", "--cfg", "job"]], ids=" ".join)
def test_light_commands_do_not_import_torch(tmp_path, args):
    result = run_dlrun(args, tmp_path, python_args=["-X", "importtime"])
    assert result.returncode == 0, result.stderr
    modules = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "dlrun.cli" in modules  # the import log is really there
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "torchvision", "executorch", "torchao")}
    assert not heavy, sorted(heavy)[:5]


def test_wheel_ships_the_configs_and_finds_them_installed(tmp_path):
    """Build the wheel from a copy of the checkout, unpack it as an install would, and run from there."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "dlrun", src / "dlrun", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", src / "conf")
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    build = subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dlrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"dlrun/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert {
        "dlrun/conf/train.yaml",
        "dlrun/conf/model/lenet.yaml",
        "dlrun/conf/hydra/job_logging/dlrun.yaml",
    } <= expected
    assert expected <= names, sorted(expected - names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = subprocess_env(PYTHONPATH=str(site))
    where = subprocess.run(
        [PYTHON, "-c", "import dlrun.config.compose as c; print(c.__file__); print(c.conf_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert module_file.startswith(str(site)) and conf == str(site / "dlrun" / "conf")
    result = ok(run_dlrun(["train", "model=resnet", "--cfg", "job"], tmp_path, env=env))
    assert yaml.safe_load(result.stdout)["model"]["_target_"] == "dlrun.models.ResNet"
