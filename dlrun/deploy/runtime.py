"""Running an artifact in its own runtime: executorch.runtime for .pte, onnxruntime for .onnx, torch.export.load
for .pt2 — in this process (`load_runner`) or, where a native crash must not take dlrun down, in a child
process (`isolated_runner`, used to verify every export)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from dlrun.core.errors import ExportFailed, Unsupported
from dlrun.deploy import child_protocol

log = logging.getLogger("dlrun")
# Printed by ExecuTorch's threadpool start-up on x86; harmless.
RUNTIME_NOISE = ("cpuinfo_utils.cpp",)
ONNX_INSTALL_HINT = "pip install 'dlrun[onnx]'"


def load_runner(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an artifact in its own runtime, chosen by suffix; the runner maps a batch to its outputs."""
    path = Path(path)
    if path.suffix == ".pte":
        return _pte_runner(path)
    if path.suffix == ".onnx":
        return _onnx_runner(path)
    if path.suffix == ".pt2":
        return _pt2_runner(path)
    raise Unsupported(f"cannot run {path.name}: expected a .pte, .pt2 or .onnx file")


class ArtifactRunError(ExportFailed):
    """The runtime could not load the artifact, or crashed or failed on a batch (one line: which, how, where)."""


_RUNTIMES = {".pte": "ExecuTorch", ".onnx": "ONNX Runtime", ".pt2": "PyTorch"}


@contextlib.contextmanager
def isolated_runner(path: str | os.PathLike) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """`load_runner(path)` in a child process (`python -m dlrun.deploy.verify_child`), for as long as the context lasts.

    A runtime's native kernels can write out of bounds (XNNPACK's int8 mean did, see `_xnnpack_configs`) and
    kill their process, at once or at a later free(). In a child, that is an ArtifactRunError naming the
    signal and the batch, and the caller lives on to record the failure. The child keeps its state between
    calls, as a deployed program does: a bug that needs a small batch before a large one still shows.
    A file the runtime cannot load is an ArtifactRunError too; a missing runtime package, an ImportError.
    """
    path = Path(path)
    runtime = _RUNTIMES.get(path.suffix, "artifact's")
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty child can never block on it
        child = subprocess.Popen(
            [sys.executable, "-m", "dlrun.deploy.verify_child", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_child_env(),
        )

        def died(when: str) -> ArtifactRunError:
            code = child.wait()
            stderr.seek(0)
            log.debug(
                f"the {runtime} runtime's child exited with {code}; its stderr:\n"
                + stderr.read().decode(errors="replace")
            )
            return ArtifactRunError(f"the {runtime} runtime {_how_it_ended(code)} {when}")

        def reply(when: str) -> tuple[bytes, bytes]:
            frame = child_protocol.receive(child.stdout)
            if frame is None:
                raise died(when)
            return frame

        def run(x: torch.Tensor) -> torch.Tensor:
            when = f"at batch {len(x)}"
            buffer = io.BytesIO()
            torch.save(x.detach().cpu().contiguous(), buffer)
            with contextlib.suppress(BrokenPipeError):  # the child died: reply() says how
                child_protocol.send(child.stdin, child_protocol.INPUT, buffer.getvalue())
            tag, payload = reply(when)
            if tag == child_protocol.ERROR:
                raise ArtifactRunError(f"the {runtime} runtime failed {when}: {json.loads(payload)['message']}")
            return torch.load(io.BytesIO(payload), weights_only=True)

        try:
            tag, payload = reply(f"while loading {path.name}")
            if tag == child_protocol.ERROR:
                error = json.loads(payload)
                if error["type"] in ("ImportError", "ModuleNotFoundError"):  # says what to pip install
                    raise ImportError(error["message"])
                raise ArtifactRunError(f"the {runtime} runtime cannot load {path.name}: {error['message']}")
            yield run
        finally:
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()  # end of input: the child returns
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.stdout.close()


def run_job(job: str, arguments: dict, *, timeout: float = 600) -> dict:
    """One ExecuTorch job of verify_child's JOBS (e.g. check a bundled program, record an ETDump) in a child
    process, for the same reason as `isolated_runner`: a native crash is an ArtifactRunError naming the signal.
    Returns the job's JSON result; the job's own exception is an ArtifactRunError with its first line."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "dlrun.deploy.verify_child", "--job", job, json.dumps(arguments)],
            capture_output=True,
            env=_child_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ArtifactRunError(f"the ExecuTorch runtime did not finish the {job} job in {timeout:.0f} s") from None
    frame = child_protocol.receive(io.BytesIO(child.stdout))
    if frame is None:
        stderr = child.stderr.decode(errors="replace")
        log.debug(f"the {job} child exited with {child.returncode}; its stderr:\n{stderr}")
        raise ArtifactRunError(f"the ExecuTorch runtime {_how_it_ended(child.returncode)} in the {job} job")
    tag, payload = frame
    if tag == child_protocol.ERROR:
        raise ArtifactRunError(f"the ExecuTorch runtime failed the {job} job: {json.loads(payload)['message']}")
    return json.loads(payload)


def _how_it_ended(code: int) -> str:
    return f"crashed ({signal.Signals(-code).name})" if code < 0 else f"exited with code {code}"


def _child_env() -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parents[2])  # the child must import this very dlrun
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}


def _pte_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    method = executorch_runtime().load_program(path).load_method("forward")
    max_batch = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > max_batch:  # the runtime would only log an error code
            raise Unsupported(f"batch {x.shape[0]} exceeds the {max_batch} that {path.name} was exported for")
        return method.execute([x.contiguous()])[0]

    return run


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    require("onnxruntime", purpose="running .onnx files")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy()})[0])

    return run


def _pt2_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the ops int8 PT2E programs use

    from dlrun.deploy.program import quiet_export_log

    with quiet_export_log():
        module = torch.export.load(path).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


@functools.cache
def executorch_runtime():
    """The ExecuTorch runtime, its threadpool started once with the cpuinfo noise filtered out."""
    import executorch.extension.pybindings.portable_lib as portable_lib
    from executorch.runtime import Runtime

    with filtered_stderr(RUNTIME_NOISE):
        portable_lib._threadpool_get_thread_count()  # starts the threadpool, which prints the noise
    return Runtime.get()


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str]) -> Iterator[None]:
    """Capture fd 2 (native code writes there directly) and pass on the lines that are not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in noise):
                    sys.stderr.write(line)


def require(*modules: str, purpose: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)}: {ONNX_INSTALL_HINT}")
