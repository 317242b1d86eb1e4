"""dlrun.core.process: the end of a command skips interpreter teardown but keeps what users rely on (exit codes,
atexit handlers such as logging's flush, threads still writing), and imports without garbage collection restore
the collector."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from dlrun.core import process

# Run in a child: exit_process ends the process. A non-daemon thread still writing and an atexit handler must both
# finish before the process goes; output printed just before must reach the pipe; the interpreter's teardown, which
# would finalize `kept` and print "teardown", is skipped.
EXIT_SCRIPT = """
import ast, atexit, sys, threading, time
import torch  # exit_process skips the teardown only once torch is imported
from dlrun.core import process

class Finalized:
    def __del__(self):
        print("teardown")

kept = Finalized()

def write_late():
    time.sleep(0.3)
    open(sys.argv[2], "w").write("thread done")

threading.Thread(target=write_late).start()
atexit.register(lambda: print("atexit ran", flush=False))
print("work done", flush=False)
process.exit_process(ast.literal_eval(sys.argv[1]))
"""


@pytest.mark.parametrize(("code", "status"), [("None", 0), ("3", 3), ("'no such run'", 1)])
def test_exit_process_keeps_exit_code_output_threads_and_atexit(tmp_path, code, status):
    marker = tmp_path / "thread.txt"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_SCRIPT), code, str(marker)], capture_output=True, text=True
    )
    assert result.returncode == status, result.stderr
    assert result.stdout.splitlines() == ["work done", "atexit ran"]
    assert marker.read_text() == "thread done"
    if status == 1:
        assert result.stderr.strip() == "no such run"


def test_import_without_collection_restores_the_collector_and_imports_once():
    frozen = gc.get_freeze_count()
    module = process.import_without_collection("dlrun.core.process")  # already imported: nothing frozen
    assert module is process and gc.get_freeze_count() == frozen and gc.isenabled()
    sys.modules.pop("colorsys", None)
    module = process.import_without_collection("colorsys")
    assert module.__name__ == "colorsys" and gc.isenabled()
    assert gc.get_freeze_count() > frozen  # the new module's objects
    gc.disable()
    try:  # a caller's disabled collector stays disabled
        sys.modules.pop("colorsys", None)
        process.import_without_collection("colorsys")
        assert not gc.isenabled()
    finally:
        gc.enable()
