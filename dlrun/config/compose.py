"""Composing the Hydra configs in conf/ without importing torch: where conf/ is, its groups and options, and
Hydra's compose and instantiate with their errors turned into one line."""

from __future__ import annotations

import re
from pathlib import Path

from dlrun.core.errors import UsageError


def conf_dir() -> Path:
    """conf/ of a source checkout, else the copy packaged inside the installed wheel (dlrun/conf)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package.parent / "conf", package / "conf")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise UsageError(f"dlrun's config folder is missing (looked in {' and '.join(map(str, candidates))})")


def groups() -> dict[str, list[str]]:
    """Config group -> sorted option names (one YAML file per option)."""
    root = conf_dir()
    return {
        d.name: sorted(f.stem for f in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def describe(group: str, option: str) -> str:
    """The one-line description an option's YAML file opens with."""
    for line in (conf_dir() / group / f"{option}.yaml").read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def expand_aliases(overrides: list[str], aliases: dict[str, str]) -> list[str]:
    """`mode=qat` -> `quantizer=qat` for a command whose registry entry maps mode to the quantizer group."""
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        expanded.append(f"{aliases[key]}={value}" if sep and key in aliases else item)
    return expanded


# Hydra's lexer takes only ASCII in an unquoted value, so `name=café` or `run=outputs/train/..._café` (run names keep
# letters of any script) would be syntax errors. Such a value is quoted for the user when it holds none of the
# characters that are override syntax, so quoting cannot change what it means.
_OVERRIDE_SYNTAX = re.compile(r"[\s,\[\]{}()'\"$\\=]")


def quote_non_ascii(overrides: list[str]) -> list[str]:
    """`name=café` -> `name='café'`: a plain value with non-ASCII characters, quoted as Hydra needs it."""
    quoted = []
    for item in overrides:
        key, sep, value = item.partition("=")
        plain = sep and value and not value.isascii() and not _OVERRIDE_SYNTAX.search(value)
        quoted.append(f"{key}={quote(value)}" if plain else item)
    return quoted


def quote(value: str) -> str:
    """Quote a value (e.g. a path) for a Hydra override."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(command: str, overrides: list[str]):
    """Compose the job config for `command` with Hydra's compose API (no run directory, no logging)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=command):
            return hydra_compose(config_name=command, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UsageError(one_line(exc)) from None


def instantiate(node, what: str):
    """hydra.utils.instantiate, with the builder's own one-line DlrunError unwrapped from Hydra's wrapper.

    The target is imported first (`import_target`), so a user's own module in the current directory is found."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from dlrun.core.errors import DlrunError

    if isinstance(node.get("_target_"), str):
        import_target(node["_target_"], what)
    try:
        return hydra_instantiate(node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DlrunError):
            raise cause from None
        message = f"cannot build {what} {node.get('_target_')}: {cause or exc}"
        if isinstance(cause, (TypeError, ValueError)):  # the builder refused the config's arguments (+model.foo=1)
            raise UsageError(message) from None
        raise DlrunError(message) from None


def import_target(target: str, what: str):
    """The object a `_target_` names (`my_module.MyNet`), imported from the installed packages or, without
    installing anything, from the current directory. A failure is one UsageError line naming the module and why."""
    import importlib
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # appended: a file in the current directory never shadows an installed package
    module_name, _, name = target.rpartition(".")
    if not module_name:
        raise UsageError(f"{what}._target_={target} must be module.Name (e.g. my_module.MyNet)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself, not one it imports
            raise UsageError(
                f"cannot import {what} {target}: no module {module_name!r} in the current directory ({cwd}) "
                "or the installed packages"
            ) from None
        raise UsageError(f"cannot import {what} {target}: module {module_name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's module can raise anything while it is imported
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        reason = one_line(exc) if str(exc) else type(exc).__name__
        raise UsageError(
            f"cannot import {what} {target}: module {module_name} failed{where}: {type(exc).__name__}: {reason}"
        ) from None
    if not hasattr(module, name):
        raise UsageError(f"cannot import {what} {target}: module {module_name} has no {name!r}")
    return getattr(module, name)


def one_line(exc: BaseException) -> str:
    """The first meaningful line of a Hydra/OmegaConf error, without its 'full_key:' trailer."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(lines[:2]) if lines else type(exc).__name__
