"""The one torch.export path of dlrun: quantization exports with it, `dlrun export` lowers what it returns, and
quantized programs are saved and loaded through it.

Every program keeps the batch dimension dynamic in [1, max_batch] (an example of batch 1 would specialize it),
carries no source locations (they embed this machine's paths), and a failure names the submodule whose
forward could not be exported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dlrun.core.errors import Unsupported
from dlrun.core.files import atomic_write_bytes


def export_program(
    module: nn.Module,
    example: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    max_batch: int = 64,
    strict: bool = False,
    training: bool = False,
) -> torch.export.ExportedProgram:
    """torch.export `module` with dim 0 dynamic in [1, max_batch] (or fixed at the example's batch).

    An eager module is exported in eval mode (or train mode for QAT: `training=True`) and gets its own mode back;
    an exported or PT2E-converted GraphModule has no train/eval switch and is exported as it is.
    Raises ValueError with one line.
    """
    from torch._dynamo.exc import UserError

    # The program keeps its example (torch.export.save writes it), and a view would bring along its whole base
    # tensor, e.g. the test set: hence the clones.
    if not dynamic_batch:
        args, dynamic_shapes = (example.clone(),), None
    else:
        if max_batch < 2:
            raise Unsupported(f"max_batch must be at least 2 for a dynamic batch, got {max_batch}")
        if example.shape[0] < 2:  # export treats sizes 0/1 as static
            example = example[:1].expand(2, *example.shape[1:])
        args, dynamic_shapes = (example[:max_batch].clone(),), ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with _mode(module, training=training):
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)
    except UserError as error:
        if "Constraints violated" not in str(error):
            raise Unsupported(_export_failure(module, error)) from error
        # e.g. a PT2E program saved with a smaller max batch keeps that bound as a guard
        guard = next((line.strip(" -") for line in str(error).splitlines() if "guard" in line), str(error))
        raise Unsupported(f"cannot export with batch in [1, {max_batch}]: {guard}") from error
    except Exception as error:
        raise Unsupported(_export_failure(module, error)) from error
    return strip_source_locations(program)


def strip_source_locations(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop each node's Python stack trace: it embeds this machine's absolute source paths."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    return program


@contextlib.contextmanager
def _mode(module: nn.Module, *, training: bool) -> Iterator[None]:
    """Export sees BatchNorm/Dropout in the requested mode; the caller's module gets its own mode back."""
    if isinstance(module, torch.fx.GraphModule):  # exported graphs refuse .train()/.eval()
        yield
        return
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)


def _export_failure(model: nn.Module, error: Exception) -> str:
    """One line: why export failed and, when it can be found, in which submodule's forward."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "specialized it to be a constant" in text:
        reason = "the model fixes the batch size (e.g. a reshape to a constant batch); it must accept any batch"
    elif type(error).__name__ == "GuardOnDataDependentSymNode":
        reason = "data-dependent control flow (a Python branch, int() or .item() on a tensor value)"
    else:
        reason = lines[0] if lines else type(error).__name__
    where = _failing_module(model, error)
    return f"cannot export {type(model).__name__} with a dynamic batch: {reason}" + (f" ({where})" if where else "")


def _failing_module(model: nn.Module, error: Exception) -> str:
    """Match the innermost user-code location of the error against the submodules' forward methods.

    Non-strict export runs the real Python code, so the traceback has the location; strict export
    (TorchDynamo) only quotes it in the message.
    """
    locations = [(frame.filename, frame.lineno) for frame in traceback.extract_tb(error.__traceback__)]
    locations += [(file, int(line)) for file, line in re.findall(r'File "([^"]+)", line (\d+)', str(error))]
    forwards: dict[tuple[str, int], list[str]] = {}
    for name, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is None:
            continue
        for _, _, line in code.co_lines():
            names = forwards.setdefault((code.co_filename, line), [])
            if name not in names:
                names.append(name)
    for file, line in reversed(locations):
        if (file, line) in forwards:
            names = forwards[(file, line)]
            module = model.get_submodule(names[0])
            shown = ", ".join(repr(n or "<root>") for n in names[:3]) + (", ..." if len(names) > 3 else "")
            return f"in {type(module).__name__}.forward, {os.path.basename(file)}:{line}, module {shown}"
    return ""


# --- programs on disk (what `dlrun quantize` leaves behind: model.pt2) ----------------------------------


def save_program(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, max_batch: int = 1024) -> None:
    """Save a quantized graph (or a weight-only module) as a torch.export program with a dynamic batch, atomically."""
    buffer = io.BytesIO()  # saved to a file, the archive's inner folder would take the temporary file's name
    torch.export.save(export_program(module, example, max_batch=max_batch), buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_program(path: str | os.PathLike) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise Unsupported(f"no saved program at {path}")
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops the program calls

    try:
        with quiet_export_log():
            return torch.export.load(path).module()
    except Exception as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise Unsupported(f"cannot load program {path}: {reason}") from error


@contextlib.contextmanager
def quiet_export_log() -> Iterator[None]:
    """On a corrupt file torch.export.load logs the traceback through its own stderr handler before raising;
    callers turn the error into one line, so the log would only bury it."""
    logger = logging.getLogger("torch.export")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled
