"""The child process that runs an exported artifact for `runtime.isolated_runner`.

    python -m dlrun.deploy.verify_child PATH

A runtime's native code shares its process's heap: an out-of-bounds write in a kernel kills that process,
at once (SIGSEGV) or later (SIGABRT from a corrupted heap). Run here, it takes down this child only; the
parent sees the pipe close and reports the signal and the batch.

The frames it exchanges with the parent are dlrun.deploy.child_protocol's.
"""

from __future__ import annotations

import os
import sys

from dlrun.deploy.child_protocol import ERROR, OUTPUT, READY, error_payload, receive, send


def main(path: str) -> int:
    # The protocol owns the real stdout: whatever a library or native code prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
