"""Bad input: one `error:` line, exit code 2, and nothing left behind (no run directory, no rewritten resumed run).

Whether the mistake is caught by validation (before any run directory exists) or only by the recipe (a dataset
that is not there, a model that cannot take the data, a checkpoint that is refused), the user sees the same:
a usage error and an outputs/ folder without a new run in it. A sweep reports a bad job and runs the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlrun.config import validate
from dlrun.core.errors import UsageError
from helpers import (
    MICRO_TRAIN,
    TINY_TRAIN,
    error_line,
    ok,
    read_jsonl,
    run_dirs,
    subprocess_env,
    tree_hashes,
)

CPU = "trainer.device=cpu"
# An image_folder run that gets as far as reading the folder, cheaply.
IMAGES = ("dataset=image_folder", "dataset.num_workers=0", "dataset.image_size=8", "model=linear", CPU)


def assert_no_run_left(cwd: Path, command: str = "train") -> None:
    assert run_dirs(cwd, command) == [], [sorted(p.name for p in d.rglob("*")) for d in run_dirs(cwd, command)]


def image_folder(root: Path, classes=("cat", "dog"), broken: int = 0) -> Path:
    """root/<class>/<i>.png, three tiny images per class, plus `broken` files that are not images at all."""
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / name / f"{i}.png")
    for i in range(broken):
        (root / classes[-1] / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# ---- caught by validation: exit 2, one line, before any run directory -----------------------------------


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (
            "train",
            ["dataset.val_fraction=0.5", "dataset.test_fraction=0.6"],
            "dataset.val_fraction + dataset.test_fraction must be < 1",
        ),
        ("train", ["model.channels=[]"], "model.channels must be a list of two integers >= 1"),
        ("train", ["dataset=synthetic", "dataset.num_outputs=0"], "dataset.num_outputs must be null or an integer"),
        ("train", ["dataset=synthetic", "dataset.num_outputs=1"], "dataset.num_outputs must be >= 2 for classif"),
        ("train", ["model.dropout=1.5"], "model.dropout must be a number in [0, 1), got 1.5"),
        ("train", ["~trainer"], "cannot delete 'trainer': dlrun train needs a trainer; choose one with trainer="),
        ("train", ["~trainer.epochs"], "cannot delete 'trainer.epochs'"),
        ("train", ["+warm_start=outputs/train/x"], "unknown key 'warm_start'"),
        ("train", ["+trainer.epoch=3"], "unknown key 'trainer.epoch'; did you mean 'trainer.epochs'?"),
        ("quantize", ["mode=qat", "quantizer.epochs=0"], "quantizer.epochs must be an integer >= 1, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_config_mistakes_are_usage_errors_before_any_run(cli, command, args, message):
    error_line(cli(command, *args), 2, message)
    assert not (cli.cwd / "outputs").exists()


def test_added_keys_go_only_where_a_constructor_takes_them():
    cfg = validate.validate("train", ["+optimizer.betas=[0.9,0.99]", "++model.hidden=64", "~optimizer.weight_decay"])
    assert list(cfg.optimizer.betas) == [0.9, 0.99] and cfg.model.hidden == 64 and "weight_decay" not in cfg.optimizer
    for added in ("+trainer.epoch=3", "++trainer.epoch=3", "+warm_start=x", "+dataset.augment.vflip=true"):
        with pytest.raises(UsageError, match="adds keys only under dataset, model, optimizer, scheduler"):
            validate.validate("train", [added])
    with pytest.raises(UsageError, match="'trainer.epochs' already exists: set it with trainer.epochs="):
        validate.validate("train", ["+trainer.epochs=3"])
    with pytest.raises(UsageError, match=r"use \+optimizer.lrr=\.\.\. to pass a new argument to the optimizer"):
        validate.validate("train", ["optimizer.lrr=0.1"])


# ---- caught by the recipe: exit 2, one line, and the run directory Hydra made is gone -----------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing root", "image_folder root {root} does not exist"),
        ("root is a file", "image_folder root {root} is not a directory"),
        ("no classes", "image_folder root {root} has no class sub-folders"),
        ("one class", "image_folder root {root} has one class folder (cat); a classifier needs at least 2"),
        ("empty class", "class folder {root}/bird has no images"),
        ("corrupt image", "unreadable image {root}/dog/broken0.jpg"),
    ],
)
def test_bad_image_folders_are_usage_errors_that_leave_no_run(cli, case, message):
    root = cli.cwd / "images"
    if case == "root is a file":
        root.write_text("not a folder")
    elif case == "no classes":
        root.mkdir()
    elif case != "missing root":
        classes = ("cat",) if case == "one class" else ("cat", "dog")
        image_folder(root, classes, broken=1 if case == "corrupt image" else 0)
        if case == "empty class":
            (root / "bird").mkdir()
    error_line(cli("train", *IMAGES, f"dataset.root={root}"), 2, message.format(root=root))
    assert_no_run_left(cli.cwd)


def test_every_unreadable_image_is_counted_and_the_first_ones_named(cli):
    root = image_folder(cli.cwd / "images", broken=5)
    line = error_line(cli("train", *IMAGES, f"dataset.root={root}"), 2, "5 unreadable images: ", "and 2 more")
    assert sum(f"{root}/dog/broken{i}.jpg" in line for i in range(5)) == 3, line
    assert_no_run_left(cli.cwd)


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_dataset_files_are_usage_errors_that_leave_no_run(cli, dataset, folder):
    data = cli.cwd / "data"
    error_line(
        cli("train", f"dataset={dataset}", f"dataset.root={data}", CPU),
        2,
        f"not found in {data / folder}",
        "dataset.download=true",
    )
    assert_no_run_left(cli.cwd)


def test_a_model_that_cannot_take_the_data_leaves_no_run(cli):
    error_line(cli("train", "model=lenet", "dataset=diabetes", CPU), 2, "model lenet needs image input", "model=mlp")
    assert_no_run_left(cli.cwd)


def test_a_constructor_refusing_an_added_argument_is_a_usage_error(cli):
    error_line(cli("train", "+model.depth=3", CPU), 2, "cannot build model dlrun.models.LeNet", "'depth'")
    assert_no_run_left(cli.cwd)


def test_cuda_without_a_gpu_leaves_no_run(cli):
    micro = [arg for arg in MICRO_TRAIN if not arg.startswith("trainer.device=")]
    result = cli("train", *micro, "trainer.device=cuda", env=subprocess_env(CUDA_VISIBLE_DEVICES=""))
    error_line(result, 2, "no CUDA GPU is available")
    assert_no_run_left(cli.cwd)


@pytest.fixture(scope="module")
def refused_checkpoints(trained_run, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints dlrun must refuse: truncated, not a checkpoint at all, weights that do not fit their config."""
    folder = tmp_path_factory.mktemp("refused")
    real = (trained_run.run_dir / "checkpoints" / "best.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(real[: len(real) // 2])
    (folder / "notes.pt").write_text("definitely not weights\n")
    saved = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    saved["model"] = {name: torch.zeros(3) for name in saved["model"]}
    torch.save(saved, folder / "mismatch.pt")
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.parametrize(
    ("command", "kind", "message"),
    [
        ("eval", "truncated", "is not a readable checkpoint"),
        ("eval", "notes", "is not a torch checkpoint file"),
        ("eval", "mismatch", "does not fit its own model config"),
        ("quantize", "truncated", "is not a readable checkpoint"),
        ("quantize", "mismatch", "does not fit its own model config"),
        ("export", "mismatch", "does not fit its own model config"),
    ],
)
def test_refused_checkpoints_leave_no_run(refused_checkpoints, cli, command, kind, message):
    error_line(cli(command, f"ckpt={refused_checkpoints[kind]}"), 2, message, refused_checkpoints[kind].name)
    assert_no_run_left(cli.cwd, command)


# ---- a refused resume leaves the run as it was -------------------------------------------------------------


def test_a_refused_resume_does_not_rewrite_the_run(cli):
    ok(cli("train", *TINY_TRAIN, "trainer.epochs=1", "name=lenet"))
    (run,) = run_dirs(cli.cwd)
    hydra_files = {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}
    before = tree_hashes(run / "checkpoints")
    # Valid overrides, but a LeNet whose head does not fit the checkpoint: refused only once the model is built.
    result = cli("train", f"resume={run}", "model.hidden=64")
    assert result.returncode != 0 and "does not fit this run's model config" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")} == hydra_files
    assert tree_hashes(run / "checkpoints") == before
    ok(cli("train", f"resume={run}", "trainer.epochs=2"))  # the run's own config: resumes as before
    assert [row["epoch"] for row in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert run_dirs(cli.cwd) == [run]


# ---- a sweep runs every job and compares them --------------------------------------------------------------


def test_a_failing_job_does_not_abort_the_sweep(cli):
    result = cli("train", "-m", "model=lenet,linear", "dataset=diabetes", CPU, "trainer.epochs=1")
    line = error_line(result, 1, "1 of 2 jobs failed (job 0)")
    assert "job 0 failed: model lenet needs image input" in result.stderr, result.stderr
    (sweep,) = (cli.cwd / "outputs" / "train" / "multirun").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["1"]  # the refused job left no directory
    test = json.loads((sweep / "1" / "summary.json").read_text())["metrics"]["test"]
    table = result.stdout[result.stdout.index("sweep: 1 of 2 jobs ok") :]
    assert "failed: model lenet needs image" in table and "model=linear" in table and f"{test['r2']:.4f}" in table
    assert "trainer.epochs=1" not in table  # the overrides every job shares are not repeated per row
    assert f"wrote {sweep.relative_to(cli.cwd)}" in result.stdout and "see the table above" in line
