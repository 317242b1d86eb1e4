"""What the user reads: where a command wrote, tables that fit the terminal without splitting numbers, the global
options Typer provides (--version, shell completion, --verbose), and run names in any script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dlrun.core import rundir, ui
from helpers import MICRO_TRAIN, PYTHON, TIMESTAMP, copy_train_run, error_line, ok, run_dirs, subprocess_env

NUMBER = re.compile(r"-?\d[\d,]*\.\d+|-?\d[\d,]*")


# ---- `wrote <run dir>` -------------------------------------------------------------------------------------


def table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line[:1] in "┏┃┡│└"]


def test_train_ends_with_where_it_wrote_and_its_table_fits_80_columns(cli):
    result = ok(cli("train", *MICRO_TRAIN, env={**subprocess_env(), "COLUMNS": "80"}))
    (run,) = run_dirs(cli.cwd)
    assert result.stdout.splitlines()[-1] == f"wrote outputs/train/{run.name} (confusion_matrix.png, curves.png)"
    lines = table_lines(result.stdout)
    assert lines and all(len(line) <= 80 for line in lines), lines
    test = json.loads((run / "summary.json").read_text())["metrics"]["test"]
    shown = {number for line in lines for number in NUMBER.findall(line)}
    assert {f"{test['loss']:.4f}", f"{test['accuracy']:.4f}", str(test["samples"])} <= shown, lines


def test_eval_and_bench_say_where_they_wrote(trained_run, cli):
    train_run = copy_train_run(trained_run, cli.cwd)
    result = ok(cli("eval", f"run={train_run}", "device=cpu", "latency_repeats=2"))
    (evaluated,) = run_dirs(cli.cwd, "eval")
    assert result.stdout.splitlines()[-1] == f"wrote outputs/eval/{evaluated.name}"
    result = ok(cli("bench", "formats=[eager]", "warmup=1", "latency_repeats=2", "throughput_repeats=1"))
    (bench,) = run_dirs(cli.cwd, "bench")
    assert result.stdout.splitlines()[-1] == f"wrote outputs/bench/{bench.name} (bench.png)"
    assert (bench / "bench.png").is_file()


# ---- tables ------------------------------------------------------------------------------------------------

BENCH_ROWS = [
    {
        "variant": "ptq xnnpack program (eager reference)",
        "status": "ok",
        "metric": 0.9583,
        "samples": 360,
        "top1_agreement": 0.9944,
        "weights_mb": 0.0123,
        "file_mb": 0.1234,
        "latency_ms_p50": 8.758,
        "latency_ms_p90": 9.1234,
        "throughput_sps": 123456.0,
        "speedup": 1.2345,
    },
    {
        "variant": "fp32 .pte xnnpack",
        "status": "failed: RuntimeError: cannot load /a/long/path/outputs/model.pte",
        "metric": None,
        "samples": None,
        "top1_agreement": None,
        "weights_mb": None,
        "file_mb": 0.2,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "throughput_sps": None,
        "speedup": None,
    },
]


def test_tables_respect_columns_and_default_to_120_off_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert ui.console_width() == 80
    monkeypatch.delenv("COLUMNS")
    assert ui.console_width() == 120  # pytest captures stdout: not a terminal


@pytest.mark.parametrize("columns", [80, 100, 250])
def test_narrow_tables_never_split_a_number(monkeypatch, capsys, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    ui.rows_table("bench: 1,234 params", BENCH_ROWS, log=False)
    ui.metrics_table("best epoch 3", {"val": {"loss": 8.758123, "accuracy": 0.98}, "test": {"mse": 12345.6}})
    lines = table_lines(capsys.readouterr().out)
    assert all(len(line) <= columns for line in lines), lines
    shown = {number for line in lines for number in NUMBER.findall(line)}
    for number in ("0.9583", "360", "8.7580", "9.1234", "123,456", "1.2345", "0.2000", "8.7581", "12,346"):
        assert number in shown, (number, lines)


# ---- Typer's global options --------------------------------------------------------------------------------


def dlrun_script() -> str:
    """The `dlrun` console script beside the interpreter: completion is generated for the program's name."""
    script = shutil.which("dlrun", path=str(Path(PYTHON).parent))
    assert script, f"no dlrun script beside {PYTHON}: install the package (make setup)"
    return script


def test_version(cli):
    from dlrun import __version__

    assert ok(cli("--version")).stdout.strip() == f"dlrun {__version__}"


def test_shell_completion_is_shown_installed_and_completes_commands(tmp_path):
    script = dlrun_script()
    env = subprocess_env(HOME=str(tmp_path), SHELL="/bin/bash")
    # Typer detects the shell from the parent process: run from bash (not exec-ed by it), as a terminal does;
    # CI runs the tests under make, whose shell is sh.
    shown = subprocess.run(
        ["bash", "-c", f"'{script}' --show-completion; exit $?"], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "_DLRUN_COMPLETE=complete_bash" in shown.stdout, shown.stderr
    installed = subprocess.run(
        ["bash", "-c", f"'{script}' --install-completion; exit $?"], env=env, capture_output=True, text=True, timeout=60
    )
    assert installed.returncode == 0, installed.stderr
    assert "_DLRUN_COMPLETE" in "".join(p.read_text() for p in (tmp_path / ".bash_completions").glob("*"))
    assert ".bash_completions" in (tmp_path / ".bashrc").read_text()
    completing = subprocess_env(_DLRUN_COMPLETE="complete_bash", COMP_WORDS="dlrun tr", COMP_CWORD="1")
    completed = subprocess.run([script], env=completing, capture_output=True, text=True, timeout=60)
    assert completed.stdout.split() == ["train"], completed


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_verbose_shows_the_traceback_of_a_usage_error(cli, where):
    args = ["--verbose", "train", "trainer.epochs=0"]
    if where == "after the command":
        args = ["train", "trainer.epochs=0", "--verbose"]
    result = cli(*args)
    assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: trainer.epochs must be an integer >= 1, got 0"
    ]
    assert "Traceback" not in cli("train", "trainer.epochs=0").stderr


def test_verbose_shows_the_traceback_of_an_error_inside_the_recipe(cli):
    result = cli("--verbose", "train", "model=lenet", "dataset=diabetes", "trainer.device=cpu")
    assert result.returncode == 2 and "Traceback" in result.stderr and "image_shape" in result.stderr, result.stderr


# ---- run names in any script -------------------------------------------------------------------------------


def test_a_non_ascii_value_hydra_cannot_read_gets_a_hint_to_quote_it(cli):
    error_line(cli("train", "name=café,thé"), 2, "invalid override", "quote", "\"name='café,thé'\"")
    assert not (cli.cwd / "outputs").exists()


@pytest.mark.parametrize(
    ("typed", "suffix"), [("name=café", "_café"), ("name='café au lait/名前'", "_café-au-lait-名前")]
)
def test_unicode_names_name_the_run_directory(cli, typed, suffix):
    """A plain non-ASCII value needs no quotes (dlrun quotes it for Hydra), so a run directory named by dlrun can be
    passed back as run=/resume= as printed; with spaces or slashes it is quoted as any Hydra value."""
    ok(cli("train", *MICRO_TRAIN, typed))
    (run,) = run_dirs(cli.cwd)
    assert re.fullmatch(TIMESTAMP + suffix, run.name), run.name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("café", "café"),
        ("名前/テスト", "名前-テスト"),
        ("Ωmega run", "Ωmega-run"),
        ("../../etc", "etc"),
        (".hidden", "hidden"),
        ("a\\b", "a-b"),
        ("a\u200bb", "a-b"),
        ("cafe\u0301", "café"),
        ("../..", ""),
    ],
)
def test_run_names_keep_letters_of_any_script_in_one_safe_component(name, expected):
    assert rundir.sanitize_name(name) == expected


def test_long_run_names_fit_a_file_name():
    assert len(rundir.sanitize_name("é" * 300).encode()) <= rundir.NAME_BYTES
    assert len(rundir.sanitize_name("x" * 300)) == rundir.NAME_CHARS
