"""Your own weights: `ckpt=` a plain state_dict (from a tutorial, DataParallel, torch.compile, a CUDA machine) with
`model=`/`dataset=` from the command line, a whole pickled model refused, and `dlrun train init_from=`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TINY_MODEL, error_line, ok, run_dirs

OWN_MODEL = ("model=lenet", *TINY_MODEL)  # the architecture the weights were trained as (the default dataset)
CHEAP_EVAL = ("device=cpu", "latency_repeats=1")


class PickledNet(nn.Module):
    """A whole model saved with torch.save(model): unpickling it would import this class and call __setstate__."""

    marker: Path | None = None

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def __setstate__(self, state):  # the payload: it must never run
        Path(state["marker"]).write_text("ran")
        super().__setstate__(state)


def _weights(trained_run) -> dict:
    return torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]


def _save_as_cuda(obj, path: Path, monkeypatch) -> None:
    """torch.save as on a GPU machine: the storages are tagged cuda:0 (loading them needs map_location on a CPU)."""
    import torch.serialization as serialization

    with monkeypatch.context() as patch:
        patch.setattr(serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


def _eval_accuracy(cli, *args) -> float:
    ok(cli("eval", *args, *CHEAP_EVAL))
    summary = json.loads((run_dirs(cli.cwd, "eval")[-1] / "summary.json").read_text())
    return summary["metrics"]["test"]["accuracy"]


@pytest.mark.parametrize("layout", ["plain", "module", "orig_mod", "state_dict", "model_state_dict", "cuda"])
def test_eval_of_own_weights_matches_the_dlrun_checkpoint(trained_run, cli, layout, monkeypatch):
    weights = _weights(trained_run)
    path = cli.cwd / f"{layout}.pth"
    if layout == "plain":
        torch.save(weights, path)
    elif layout == "module":  # DataParallel / DistributedDataParallel
        torch.save({f"module.{k}": v for k, v in weights.items()}, path)
    elif layout == "orig_mod":  # torch.compile
        torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, path)
    elif layout == "cuda":
        if torch.cuda.is_available():
            torch.save({k: v.cuda() for k, v in weights.items()}, path)
        else:
            _save_as_cuda(weights, path, monkeypatch)
    else:  # a tutorial's training checkpoint: the weights nested beside other entries
        torch.save({layout: weights, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    expected = trained_run.summary["metrics"]["test"]["accuracy"]
    assert _eval_accuracy(cli, f"ckpt={path.name}", *OWN_MODEL) == expected


def test_own_weights_need_model_and_dataset(trained_run, cli):
    torch.save(_weights(trained_run), cli.cwd / "mine.pth")
    error_line(cli("eval", "ckpt=mine.pth", *CHEAP_EVAL), 2, "mine.pth", "model=", "dataset=")


def test_own_weights_that_do_not_fit_are_listed(trained_run, cli):
    torch.save(_weights(trained_run), cli.cwd / "mine.pth")
    line = error_line(cli("eval", "ckpt=mine.pth", "model=lenet", *CHEAP_EVAL), 2, "mine.pth")
    assert "shape mismatches, file vs model (" in line and "features.0.0.weight (8, 1, 3, 3) vs (32, 1, 3, 3)" in line


def test_a_dlrun_checkpoint_refuses_model_overrides(trained_run, cli):
    best = trained_run.run_dir / "checkpoints" / "best.pt"
    error_line(cli("eval", f"ckpt={best}", "model=lenet", *CHEAP_EVAL), 2, "drop model=lenet")


def test_a_whole_pickled_model_is_refused_and_never_runs(cli):
    marker = cli.cwd / "payload-ran"
    model = PickledNet()
    model.marker = str(marker)  # pickled with the model's __dict__, read back by __setstate__
    torch.save(model, cli.cwd / "model.pth")
    line = error_line(cli("eval", "ckpt=model.pth", *OWN_MODEL, *CHEAP_EVAL), 2, "model.pth", "whole pickled model")
    assert 'torch.save(model.state_dict(), "weights.pth")' in line
    assert not marker.exists()


def test_train_init_from_another_class_count_reinitializes_the_head(trained_run, cli):
    args = ("dataset=synthetic", "dataset.input_shape=[1,8,8]", "dataset.num_outputs=3", "dataset.num_samples=128")
    train = ("trainer.device=cpu", "trainer.epochs=1", *TINY_MODEL)
    ok(cli("train", *args, *train, f"init_from={trained_run.run_dir}"))
    log = (run_dirs(cli.cwd)[-1] / "train.log").read_text()
    lines = [line for line in log.splitlines() if "init_from" in line and "re-initialized" in line]
    assert len(lines) == 1, log
    assert "re-initialized 2 whose shapes differ" in lines[0]
    assert "head.4.weight (10, 32)->(3, 32)" in lines[0] and "head.4.bias (10,)->(3,)" in lines[0]


def test_init_weights_keeps_every_fitting_tensor(trained_run, cli):
    """In-process: everything but the new head comes from the run, the head keeps its fresh initialization."""
    from dlrun.models import LeNet
    from dlrun.training import session

    model = LeNet((1, 8, 8), 3, channels=[8, 16], hidden=32)
    head = model.state_dict()["head.4.weight"].clone()
    reinit = session.init_weights(model, str(trained_run.run_dir), "cpu")
    assert reinit == ["head.4.weight", "head.4.bias"]
    state, source = model.state_dict(), _weights(trained_run)
    assert all(torch.equal(state[k], source[k]) for k in state if not k.startswith("head.4."))
    assert torch.equal(state["head.4.weight"], head)
    # a file works as well, here with a DataParallel prefix
    torch.save({f"module.{k}": v for k, v in source.items()}, cli.cwd / "mine.pth")
    assert session.init_weights(LeNet((1, 8, 8), 3, channels=[8, 16], hidden=32), str(cli.cwd / "mine.pth"), "cpu")
