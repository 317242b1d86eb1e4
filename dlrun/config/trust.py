"""Configs read back from files never run code.

A checkpoint or summary.json holds the config its model was built from, and eval/quantize/export/bench
rebuild the model from it with Hydra's instantiate, which imports and calls whatever `_target_` names.
A file from elsewhere is untrusted input, so its targets must be dlrun's own builders (an allowlist, not
Hydra's blocklist) or ones the user vouches for with trust_targets=[...] / on the command line.
"""

from __future__ import annotations

import functools
import re

from dlrun.config.compose import conf_dir
from dlrun.core.errors import UsageError

# --- configs read back from files ---------------------------------------------------------------------
# A checkpoint or summary.json holds the config its model was built from, and eval/quantize/export/bench
# rebuild the model from it with Hydra's instantiate, which imports and calls whatever `_target_` names.
# A file from elsewhere is untrusted input, so its targets must be dlrun's own builders (an allowlist, not
# Hydra's blocklist) or ones the user vouches for with trust_targets=[...] / on the command line.
_SPECIAL_KEYS = ("_target_", "_partial_")  # the only Hydra keys dlrun's configs use
_BUILT_SECTIONS = ("dataset", "model", "optimizer", "scheduler")  # the nodes dlrun instantiates


@functools.cache
def builtin_targets() -> frozenset[str]:
    """Every `_target_` named in dlrun's own conf/: the builders a stored config may call."""
    found = set()
    for path in conf_dir().rglob("*.yaml"):
        found.update(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), flags=re.MULTILINE))
    return frozenset(found)


def targets_in_overrides(overrides: list[str]) -> list[str]:
    """The `_target_` values the user typed (`model._target_=my_pkg.Net`): trusted because the user chose them."""
    return [
        o.partition("=")[2].strip("'\"") for o in overrides if o.partition("=")[0].lstrip("+~").endswith("._target_")
    ]


def check_targets(config: dict, where: str, trusted=(), *, stored: bool = True) -> None:
    """Refuse a config unless every Hydra key in it is `_target_`/`_partial_` at the root of a built section
    and every `_target_` is one of dlrun's builders or in `trusted`. Raises UsageError naming the key.

    `stored=True` (a config read from a file) also refuses interpolations: dlrun saves configs resolved,
    so `${...}` there can only have been written in by hand.
    """
    allowed = builtin_targets() | {str(t) for t in trusted}

    def refuse(path: str, why: str, target: str = "module.Name"):
        raise UsageError(
            f"refusing the config in {where}: {path} {why}; dlrun rebuilds models only from its own builders "
            f"(a target you trust: add trust_targets=[{target}])"
        )

    def walk(node, path: str, depth: int) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
                    if key not in _SPECIAL_KEYS or depth != 1 or path not in _BUILT_SECTIONS:
                        refuse(child, "is a Hydra instantiation key where dlrun uses none")
                    if key == "_target_" and value not in allowed:
                        refuse(child, f"= {value!r} is not one of dlrun's builders", str(value))
                walk(value, child, depth + 1)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]", depth + 1)
        elif stored and isinstance(node, str) and "${" in node:
            refuse(path, "holds an interpolation (stored configs are saved resolved)")

    walk(config, "", 0)


def plain(cfg) -> dict:
    """A composed config as plain containers, interpolations left as written."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)


def check_stored_config(config, where: str, trusted=()) -> dict:
    """The shape and the targets of a config read from a checkpoint or summary.json, before anything is built."""
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("dataset", "model")):
        raise UsageError(f"{where} holds no usable config (expected the mappings 'dataset' and 'model')")
    for section in ("dataset", "model"):
        if not isinstance(config[section].get("_target_"), str):
            raise UsageError(f"{where} holds no usable config ({section}._target_ is missing)")
    check_targets(config, where, trusted)
    return config
