"""Whole-process overhead: the default `dlrun train` imports only what it uses (issue 13). One tiny
`python -X importtime -m dlrun train` is parsed for the modules it imported; the bundled datasets, read from
the files scikit-learn ships without importing it, equal sklearn's own loaders exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlrun.core.errors import DlrunError
from dlrun.data import bundled
from helpers import TINY_MODEL, ok, run_dirs, run_dlrun


def imported(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines: 'import time: self | cumulative | <indent>name'."""
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, set[str]]:
    """(the folder holding one tiny default-dataset train run, the modules that run imported)"""
    cwd = tmp_path_factory.mktemp("startup")
    args = ["train", "trainer.epochs=1", "trainer.device=cpu", "dataset=digits", *TINY_MODEL]
    result = ok(run_dlrun(args, cwd, python_args=("-X", "importtime")))
    modules = imported(result.stderr)
    assert "dlrun.data.bundled" in modules and "torch" in modules  # the parse saw the run's imports
    return cwd, modules


@pytest.fixture
def train_imports(trained) -> set[str]:
    return trained[1]


def test_default_train_does_not_import_sklearn(train_imports):
    assert not {m for m in train_imports if m == "sklearn" or m.startswith("sklearn.")}


def test_torch_optim_steps_import_dynamo():
    """Why dlrun.training.schedulers imports torch._dynamo itself (without garbage collection, where it costs
    less): torch.optim imports it on every step. The day this fails, that import can go."""
    code = (
        "import sys, torch; p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([p], lr=0.1); "
        "p.sum().backward(); opt.step(); print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_eval_of_a_run_imports_neither_sklearn_nor_dynamo(trained):
    """eval counts FLOPs (FlopCounterMode) and reads digits, but compiles nothing and needs no sklearn."""
    cwd, _ = trained
    (run,) = run_dirs(cwd)
    result = ok(run_dlrun(["eval", f"run={run}", "latency_repeats=3"], cwd, python_args=("-X", "importtime")))
    modules = imported(result.stderr)
    assert "torch" in modules and "torch.utils.flop_counter" in modules
    assert "torch._dynamo" not in modules
    assert not {m for m in modules if m == "sklearn" or m.startswith("sklearn.")}


def test_digits_equal_sklearn():
    from sklearn.datasets import load_digits

    data, target = bundled.load_digits_arrays()
    expected = load_digits()
    assert data.dtype == expected.data.dtype and target.dtype == expected.target.dtype
    np.testing.assert_array_equal(data, expected.data)
    np.testing.assert_array_equal(target, expected.target)


def test_diabetes_equal_sklearn():
    from sklearn.datasets import load_diabetes

    data, target = bundled.load_diabetes_arrays()
    expected = load_diabetes()  # scaled=True: centred, / std, / sqrt(n_samples)
    assert data.dtype == expected.data.dtype and target.dtype == expected.target.dtype
    np.testing.assert_array_equal(data, expected.data)
    np.testing.assert_array_equal(target, expected.target)


def test_missing_data_file_is_one_line(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DlrunError, match=r"^bundled dataset file sklearn/datasets/data/digits\.csv\.gz not found"):
        bundled.load_digits_arrays()
