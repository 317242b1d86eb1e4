"""Validating overrides against conf/ before Hydra runs, so a typo or a wrong type costs the user one clear line
("unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?") instead of a Hydra stack trace."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable

from dlrun.config.compose import compose, groups, one_line
from dlrun.core.errors import UsageError


def validate(command: str, overrides: list[str]):
    """Check overrides against conf/: group options, key names, value types and ranges.

    Returns the composed config (first value of any sweep). Raises UsageError with one line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UsageError(f"invalid override: {one_line(exc)}") from None

    options = groups()
    selections, settings = [], []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        first = _values(override)[0] if _values(override) else None
        line = override.input_line if first is None else f"{override.get_key_element()}={first}"
        if key in options:
            if not override.is_delete():
                for value in _values(override):
                    _check_option(key, value, options[key])
            selections.append(line)
        else:
            settings.append((override, line))

    defaults = compose(command, selections)
    leaves = _leaves(defaults)
    for override, _ in settings:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete():
            continue  # `+key=`, `++key=`, `~key`: the user knowingly adds or removes
        if key not in leaves and not any(path.startswith(key + ".") for path in leaves):
            raise UsageError(_unknown_key(key, leaves))
        for value in _values(override):
            _check_type(key, value, leaves.get(key))

    cfg = compose(command, selections + [line for _, line in settings])
    check_values(cfg)
    _check_resolves(cfg)
    return cfg


def check_no_sweep(overrides: list[str]) -> None:
    """A comma list or range() runs one job per value, which only --multirun does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            raise UsageError(
                f"{override.input_line} is a sweep: add --multirun (-m) to run one job per value, "
                f"or quote a literal value: {override.get_key_element()}='...'"
            )


def check_complete(cfg) -> None:
    """Every mandatory value (`???` in conf/, e.g. dataset.root of image_folder) must be set to run."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"{missing[0]} is required: add {missing[0]}=... to the command line")


def _check_resolves(cfg) -> None:
    """Interpolations like name=${oops} fail here as one line, not later as a traceback."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        raise UsageError(f"cannot resolve the config: {one_line(exc)}") from None


def _values(override) -> list[str]:
    """String values of an override (several for a sweep; none for an interval sweep or a delete)."""
    if override.is_delete() and override.value() is None:
        return []
    if override.is_sweep_override():
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # interval sweeps (optuna) have no finite list of values
            return []
    return [override.get_value_element_as_str()]


def _check_option(group: str, option: str, available: list[str]) -> None:
    if option not in available and option != "null":
        raise UsageError(unknown_choice(group, option, available))


def unknown_choice(what: str, value: str, available: list[str]) -> str:
    near = difflib.get_close_matches(value, available, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"unknown {what} '{value}'; {hint}available: {', '.join(available)}"


def _unknown_key(key: str, leaves: dict[str, Any]) -> str:
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'? " if near else ""
    parent = key.rpartition(".")[0]
    siblings = sorted(p.rpartition(".")[2] for p in leaves if p.rpartition(".")[0] == parent)
    where = f"keys under '{parent}'" if parent else "top-level keys"
    listing = f"{where}: {', '.join(siblings)}" if siblings else f"'{parent}' is not a config section"
    return f"unknown key '{key}'; {hint}{listing} (use +{key}=... to add a new key)"


def _check_type(key: str, text: str, default: Any) -> None:
    """The new value must have the default's type (an int is fine where a float is expected)."""
    if default is None or text == "null":
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_override(f"k={text}").value()
    expected = type(default)
    ok = (
        isinstance(value, str) and expected is str
        or expected is bool and isinstance(value, bool)
        or expected is int and isinstance(value, int) and not isinstance(value, bool)
        or expected is float and isinstance(value, (int, float)) and not isinstance(value, bool)
        or expected in (list, tuple) and isinstance(value, list)
        or expected is dict and isinstance(value, dict)
        or expected is str and isinstance(value, (int, float, bool))  # a name like 123 is still a name
    )
    if not ok:
        raise UsageError(f"{key} must be {_type_name(expected)}, got '{text}'")


def _type_name(expected: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list like [1,2]", dict: "a mapping like {a:1}"}.get(expected, expected.__name__)


def _leaves(cfg) -> dict[str, Any]:
    """Dotted path -> default value for every leaf of a composed config (interpolations left unresolved)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out: dict[str, Any] = {}

    def walk(node, prefix):
        for key in node.keys():
            path = f"{prefix}{key}"
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                out[path] = {}
                walk(child, path + ".")
            elif isinstance(child, ListConfig):
                out[path] = []
            elif OmegaConf.is_interpolation(node, key) or child._is_missing():
                out[path] = None
            else:
                out[path] = child._value()

    walk(cfg, "")
    return out


# Value rules checked on every composed config: path -> (predicate, what it must be).
Rule = tuple[Callable[[Any], bool], str]
RULES: dict[str, Rule] = {
    "trainer.epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.eval_batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.device": (lambda v: _is_device(v), "one of auto, cpu, cuda, cuda:N"),
    "trainer.precision": (lambda v: v in ("fp32", "bf16"), "one of fp32, bf16"),
    "trainer.nan_policy": (lambda v: v in ("stop", "skip_batch"), "one of stop, skip_batch"),
    "trainer.grad_clip": (lambda v: v is None or v > 0, "null or a number > 0"),
    "trainer.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "trainer.patience": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "optimizer.lr": (lambda v: 0 < v < math.inf, "a number > 0 and finite"),
    "dataset.val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dataset.test_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "device": (lambda v: _is_device(v), "one of auto, cpu, cuda, cuda:N"),
    "batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
}


def _is_device(value: Any) -> bool:
    return value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value)) is not None


_ABSENT = object()


def check_values(cfg) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for path, (predicate, must_be) in RULES.items():
        try:
            value = OmegaConf.select(cfg, path, throw_on_missing=False)
        except OmegaConfBaseException as exc:
            raise UsageError(f"{path}: {one_line(exc)}") from None
        if value is None and OmegaConf.select(cfg, path, default=_ABSENT) is _ABSENT:
            continue  # this command's config has no such key
        try:
            ok = predicate(value)
        except TypeError:
            ok = False
        if not ok:
            raise UsageError(f"{path} must be {must_be}, got {value!r}")


