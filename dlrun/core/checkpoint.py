"""Checkpoint files: one dict of tensors and plain values, written atomically, read with weights_only=True.
What each key holds is documented with the rest of the run contract, in dlrun.core.contract.

weights_only=True means a checkpoint can hold tensors, numbers, strings, lists and dicts but never
Python objects, so loading a file from a stranger cannot execute code.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from dlrun.core.errors import DlrunError, UsageError
from dlrun.core.files import atomic_write_bytes

# Keys of the checkpoint dict (later commands read them; keep them stable; documented in dlrun.core.contract).
MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
EPOCH = "epoch"  # last completed epoch, 1-based
RNG = "rng"  # torch CPU (and CUDA) generator states at the end of EPOCH
TRAINER_STATE = "trainer_state"  # best metric, best epoch, epochs without improvement
CONFIG = "config"  # the resolved run config: eval/quantize/export rebuild the model from it
VERSIONS = "versions"
GIT_COMMIT = "git_commit"
STRUCTURE = "structure"  # prune runs: the pruned layer widths, which CONFIG alone would build wider
EMA = "ema"  # trainer.ema runs' last.pt: the average's state_dict (weights, buffers, update count)
ADAPTER = "adapter"  # adapter=lora runs' last.pt: the PEFT model's state_dict (MODEL holds the merged weights)
REQUIRED = (MODEL, CONFIG)


def save(path: Path, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        atomic_write_bytes(Path(path), buffer.getvalue())
    except OSError as exc:
        raise DlrunError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous file is intact"
        ) from None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and sanity-check a dlrun checkpoint; every failure is one line naming the file (exit code 2)."""
    checkpoint = load_file(path, map_location)
    if not is_dlrun(checkpoint):
        raise UsageError(f"{path} is not a dlrun checkpoint (expected a dict with keys {', '.join(REQUIRED)})")
    return checkpoint


def is_dlrun(saved) -> bool:
    return isinstance(saved, dict) and all(key in saved for key in REQUIRED)


def load_file(path: Path, map_location: str | torch.device = "cpu"):
    """torch.load(weights_only=True) of any torch file (a dlrun checkpoint or a user's own weights), mapped onto
    `map_location` (weights saved from CUDA tensors load on a CPU-only machine); every failure is one line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # "Unsupported global: GLOBAL builtins.open" or "unsupported GLOBAL posix.system whose module posix is blocked"
        unsafe = re.search(r"unsupported (?:global:? )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
        if unsafe and _pickles_a_module(path):
            raise UsageError(
                f"refusing to load {path}: it is a whole pickled model (torch.save(model)), which would run Python "
                f"code ({unsafe.group(1)}) when unpickled; dlrun loads weights only (weights_only=True): in your own "
                "environment, where that code is trusted, save its state_dict with torch.save(model.state_dict(), "
                '"weights.pth") and pass that file'
            ) from None
        if unsafe:
            raise UsageError(
                f"refusing to load {path}: it would run Python code ({unsafe.group(1)}) when unpickled; "
                "dlrun loads checkpoints with weights_only=True"
            ) from None
        raise UsageError(f"{path} is not a torch checkpoint file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).split(". ")[0].strip() or (
            "the file is empty" if path.stat().st_size == 0 else type(exc).__name__
        )
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt): {reason}") from None
    except Exception:  # a file that is no pickle at all (text...) trips the unpickler with KeyError, IndexError...
        raise UsageError(f"{path} is not a torch checkpoint file") from None


def _pickles_a_module(path: Path) -> bool:
    """Whether the pickle inside a torch file holds an nn.Module (its `_parameters` and `_modules` attributes):
    read as bytes, never unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            data = archive.read(pickled[0]) if pickled else b""
    except (zipfile.BadZipFile, OSError):
        data = path.read_bytes()  # the legacy (non-zip) format: the pickle comes first
    return b"_parameters" in data and b"_modules" in data


# Where a user's own checkpoint dict keeps the weights (tutorials' conventions), and the prefixes that wrappers
# add to every key: DataParallel/DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`).
WEIGHT_KEYS = (MODEL, "state_dict", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def state_dict_of(saved, where: str) -> dict:
    """The model weights in a loaded file: a plain state_dict, or one under model / state_dict / model_state_dict,
    with the `module.` / `_orig_mod.` prefix of a wrapped model stripped (when every key has it)."""

    def is_weights(node) -> bool:
        return isinstance(node, dict) and bool(node) and all(isinstance(v, torch.Tensor) for v in node.values())

    weights = saved if is_weights(saved) else next((saved[k] for k in WEIGHT_KEYS if is_weights(_get(saved, k))), None)
    if weights is None:
        raise UsageError(
            f"{where} holds no model weights (expected a state_dict, or a dict with one under {', '.join(WEIGHT_KEYS)})"
        )
    weights = {str(k): v for k, v in weights.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in weights):
                weights = {key.removeprefix(prefix): v for key, v in weights.items()}
                stripped = True
    return weights


def _get(saved, key: str):
    return saved.get(key) if isinstance(saved, dict) else None


def load_weights(model: torch.nn.Module, state_dict: dict, where: str, config: str = "its own model config") -> None:
    """model.load_state_dict, refusing weights that do not fit with one line that lists what differs (the first
    few missing and unexpected keys and shape mismatches) instead of torch's multi-line message."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    shapes = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state_dict and hasattr(state_dict[key], "shape") and state_dict[key].shape != own[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches, file vs model", shapes),
        )
        if items
    ]
    if problems:
        raise UsageError(f"{where} does not fit {config} ({type(model).__name__}): {'; '.join(problems)}")
    model.load_state_dict(state_dict)
