"""Process start-up and shutdown costs that grow with torch's import graph (issue 13).

Importing torch, torch._dynamo (which torch.optim imports on the first optimizer step) and their kin creates
millions of objects that live until the process ends. Python's cyclic garbage collector scans them again and again
while they are created, and interpreter teardown frees them one by one after the work is done. Measured on the
CI machine (2 cores): collection during those imports costs 0.3-0.6 s, and teardown 0.5-1 s.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import threading
from types import ModuleType
from typing import NoReturn


def import_without_collection(name: str) -> ModuleType:
    """Import module `name` (with all it imports) without collecting garbage in between, then move every object
    alive (mostly the imported modules' own) out of the collector's sight (`gc.freeze`): later collections, such
    as those of a training loop, no longer scan them. Imports create almost no cyclic garbage. Done once per
    module: a later call returns the module already imported and freezes nothing."""
    if name in sys.modules:
        return sys.modules[name]
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def exit_process(code: int | str | None) -> NoReturn:
    """End the process with `code` (as `sys.exit` takes it) once the command is done: run what was registered to
    run at exit (logging's flush and close, multiprocessing's and trackers' clean-up), wait for non-daemon
    threads, flush stdout/stderr, then `os._exit` without tearing down the interpreter.

    Only after torch was imported: without it, the teardown is fast and `sys.exit` is kept. Every file dlrun
    writes is closed (and replaced atomically) before this point, so skipping the teardown loses nothing."""
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (dlrun ... | head): nothing more can reach it
            pass
    os._exit(status)
