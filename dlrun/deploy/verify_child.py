"""The child process that runs an exported artifact for `runtime.isolated_runner`.

    python -m dlrun.deploy.verify_child PATH
    python -m dlrun.deploy.verify_child --job NAME JSON_ARGUMENTS   # one of JOBS, answered with one frame

A runtime's native code shares its process's heap: an out-of-bounds write in a kernel kills that process,
at once (SIGSEGV) or later (SIGABRT from a corrupted heap). Run here, it takes down this child only; the
parent sees the pipe close and reports the signal and the batch.

The frames it exchanges with the parent are dlrun.deploy.child_protocol's.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from dlrun.deploy.child_protocol import ERROR, OUTPUT, READY, error_payload, receive, send

# Jobs run by `runtime.run_job`: name -> "module:function", called with the JSON arguments as keywords and
# answered with its JSON-able result in one OUTPUT frame.
JOBS = {
    "bundle": "dlrun.deploy.bundle:verify_in_process",
    "etdump": "dlrun.deploy.profile:record_etdump",
}


def main(path: str) -> int:
    channel = _protocol_channel()
    requests = sys.stdin.buffer

    import io

    import torch

    from dlrun.deploy import runtime

    try:
        run = runtime.load_runner(path)
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types; the parent reports the first line
        send(channel, ERROR, error_payload(exc))
        return 1
    send(channel, READY)
    while (frame := receive(requests)) is not None:
        x = torch.load(io.BytesIO(frame[1]), weights_only=True)
        try:
            y = run(x)
        except Exception as exc:  # noqa: BLE001 - e.g. a batch above the planned maximum: the parent decides
            send(channel, ERROR, error_payload(exc))
            continue
        buffer = io.BytesIO()
        torch.save(y.detach().cpu().contiguous(), buffer)
        send(channel, OUTPUT, buffer.getvalue())
    return 0


def job(name: str, arguments: str) -> int:
    channel = _protocol_channel()
    module, function = JOBS[name].split(":")
    try:
        result = getattr(importlib.import_module(module), function)(**json.loads(arguments))
    except Exception as exc:  # noqa: BLE001 - the parent reports the first line
        send(channel, ERROR, error_payload(exc))
        return 1
    send(channel, OUTPUT, json.dumps(result).encode())
    return 0


def _protocol_channel():
    """The protocol owns the real stdout: whatever a library or native code prints goes to stderr instead."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return channel


if __name__ == "__main__":
    sys.exit(job(sys.argv[2], sys.argv[3]) if sys.argv[1] == "--job" else main(sys.argv[1]))
