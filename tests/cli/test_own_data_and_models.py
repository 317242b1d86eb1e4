"""Your own data and model through the CLI: dataset=csv and dataset=text_csv rebuilt from the stored config by
eval, your own nn.Module from the current directory through train -> quantize -> export .pte (trusted by name
afterwards), and model=gru on digits (what it exports to, what it refuses, and its accuracy)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from helpers import CHEAP_QUANTIZE, ONE_THREAD_ENV, error_line, ok, run_dirs, subprocess_env

FAST = ("trainer.device=cpu", "trainer.epochs=1")

MY_MODULE = textwrap.dedent("""
    import math
    from torch import nn


    class MyNet(nn.Module):
        def __init__(self, input_shape, num_outputs, width=16):
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_outputs)
            )

        def forward(self, x):
            return self.body(x)
""")


def _latest(cwd, command: str):
    return run_dirs(cwd, command)[-1]


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _train_own_model(cli, env) -> object:
    (cli.cwd / "my_module.py").write_text(MY_MODULE)
    ok(cli("train", "model._target_=my_module.MyNet", "+model.width=8", *FAST, env=env))
    train_run = _latest(cli.cwd, "train")
    assert _summary(train_run)["config"]["model"]["_target_"] == "my_module.MyNet"
    return train_run


TRUST = "trust_targets=[my_module.MyNet]"


def test_own_model_class_is_rebuilt_from_a_run_only_when_trusted_by_name(cli):
    env = subprocess_env(**ONE_THREAD_ENV)
    train_run = _train_own_model(cli, env)
    # A stored config naming a class outside dlrun is refused until the user vouches for it, by name.
    refused = cli("quantize", f"run={train_run}", *CHEAP_QUANTIZE, env=env)
    error_line(refused, 2, "'my_module.MyNet' is not one of dlrun's builders", TRUST)
    assert not any((d / "model.pt2").exists() for d in run_dirs(cli.cwd, "quantize"))
    ok(cli("eval", f"run={train_run}", TRUST, "device=cpu", "latency_repeats=1", env=env))
    assert math.isfinite(_summary(_latest(cli.cwd, "eval"))["metrics"]["test"]["accuracy"])


@pytest.mark.slow
def test_own_model_class_train_quantize_export_pte(cli):
    env = subprocess_env(**ONE_THREAD_ENV)
    train_run = _train_own_model(cli, env)
    ok(cli("quantize", f"run={train_run}", "mode=ptq", TRUST, *CHEAP_QUANTIZE, env=env))
    quantized = _latest(cli.cwd, "quantize")
    assert (quantized / "model.pt2").is_file()
    ok(cli("export", f"run={quantized}", "format=pte", TRUST, env=env))
    exported = _latest(cli.cwd, "export")
    assert (exported / "model.pte").stat().st_size > 0
    summary = _summary(exported)
    assert summary["verification"]["passed"] and math.isfinite(summary["metrics"]["test"]["accuracy"])


def test_own_model_that_does_not_import_or_take_a_key_is_one_line(cli):
    (cli.cwd / "broken.py").write_text("import not_installed_anywhere_xyz\n")
    error_line(cli("train", "model._target_=broken.Net", *FAST), 2, "cannot import model broken.Net", "not_installed")
    error_line(cli("train", "model._target_=nowhere_xyz.Net", *FAST), 2, "no module 'nowhere_xyz'")
    (cli.cwd / "my_module.py").write_text(MY_MODULE)
    typo = cli("train", "model._target_=my_module.MyNet", "+model.widht=8", *FAST)
    error_line(typo, 2, "my_module.MyNet takes no argument 'widht' (it takes input_shape, num_outputs, width)")


def test_csv_run_is_evaluated_from_its_stored_config(cli):
    rows = [f"{i % 9},{(i * 7) % 5 - 2},{'b' if (i % 9) > 4 else 'a'}" for i in range(120)]
    (cli.cwd / "table.csv").write_text("x1,x2,kind\n" + "\n".join(rows) + "\n")
    ok(cli("train", "dataset=csv", "dataset.path=table.csv", "dataset.target=kind", "model=mlp", *FAST))
    train_run = _latest(cli.cwd, "train")
    stored = _summary(train_run)["config"]
    # the sizes read from the file are in the stored config, so the model is rebuilt without the file's help
    assert stored["dataset"]["input_shape"] == [2] and stored["model"]["input_shape"] == [2]
    assert stored["dataset"]["num_outputs"] == 2 and stored["model"]["num_outputs"] == 2
    ok(cli("eval", f"run={train_run}", "device=cpu", "latency_repeats=1"))
    test = _summary(_latest(cli.cwd, "eval"))["metrics"]["test"]
    assert test["samples"] == 18 and math.isfinite(test["accuracy"])

    (cli.cwd / "bad.csv").write_text("x1,x2,kind\n1,2,a\n3,,b\n")
    error_line(cli("train", "dataset=csv", "dataset.path=bad.csv", "model=mlp", *FAST), 2, "line 3, column 'x2'")


def test_text_csv_gru_trains_evaluates_and_refuses_export(cli):
    names = {"en": ["smith", "brown", "taylor", "wilson"], "jp": ["sato", "suzuki", "tanaka", "yamada"]}
    rows = [f"{n},{lang}" for _ in range(8) for lang, ns in names.items() for n in ns]
    (cli.cwd / "names.csv").write_text("name,language\n" + "\n".join(rows) + "\n")
    text = ("dataset=text_csv", "dataset.path=names.csv", "dataset.text=name", "dataset.label=language")
    ok(cli("train", *text, "model=gru", "model.hidden=16", "model.layers=1", *FAST))
    train_run = _latest(cli.cwd, "train")
    stored = _summary(train_run)["config"]
    assert stored["model"]["vocab_size"] == stored["dataset"]["vocab_size"] > 2
    ok(cli("eval", f"run={train_run}", "device=cpu", "latency_repeats=1"))
    assert math.isfinite(_summary(_latest(cli.cwd, "eval"))["metrics"]["test"]["accuracy"])
    error_line(cli("export", f"run={train_run}", "format=pt2"), 2, "on tokens", "packed variable-length sequences")


@pytest.mark.slow
def test_gru_on_digits_reaches_97_percent_and_exports_where_the_stack_can(cli):
    env = subprocess_env(**ONE_THREAD_ENV)
    ok(cli("train", "model=gru", "trainer.device=cpu", env=env))  # the default 15 epochs
    train_run = _latest(cli.cwd, "train")
    assert _summary(train_run)["metrics"]["test"]["accuracy"] >= 0.97
    for fmt in ("pt2", "onnx"):
        ok(cli("export", f"run={train_run}", f"format={fmt}", env=env))
        assert _summary(_latest(cli.cwd, "export"))["verification"]["passed"]
    ok(cli("export", f"run={train_run}", "format=pte", "export.dynamic_batch=false", env=env))
    assert (_latest(cli.cwd, "export") / "model.pte").is_file()
    error_line(cli("export", f"run={train_run}", "format=pte", env=env), 2, "export.dynamic_batch=false works")
    error_line(cli("quantize", f"run={train_run}", "mode=dynamic", env=env), 2, "use backend=x86_inductor")
    ok(cli("quantize", f"run={train_run}", "mode=dynamic", "backend=x86_inductor", *CHEAP_QUANTIZE, env=env))
    comparison = _summary(_latest(cli.cwd, "quantize"))["comparison"]
    assert comparison["accuracy_drop"] < 0.02
