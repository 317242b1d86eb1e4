"""Validating overrides against conf/ before Hydra runs, so a typo or a wrong type costs the user one clear line
("unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?") instead of a Hydra stack trace."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Any

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
        raise UsageError(f"invalid override: {one_line(exc)}{_quoting_hint(overrides)}") from None

    options = groups()
    selections, settings = [], []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra/launcher" and not override.is_delete():
            for value in _values(override):
                _check_option("hydra/launcher", value, launchers())
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        first = _values(override)[0] if _values(override) else None
        several = isinstance(override.value(), list) and not override.is_sweep_override()  # logger=[csv,mlflow]
        line = override.input_line if first is None or several else f"{override.get_key_element()}={first}"
        if key in options:
            if not override.is_delete():
                for value in _values(override):
                    _check_option(key, value, options[key])
            selections.append(line)
        else:
            settings.append((override, line))

    # The config as the selections make it, before any deletion: what `~key` would take away.
    defaults = compose(command, [line for line in selections if not line.startswith("~")])
    leaves = _leaves(defaults)
    sections = _constructor_sections(leaves)
    for line in selections:
        group = line.lstrip("~").partition("=")[0]
        if line.startswith("~") and defaults.get(group) is not None:
            raise UsageError(
                f"cannot delete '{group}': dlrun {command} needs a {group}; "
                f"choose one with {group}=<option> ({', '.join(options[group])})"
            )
    for override, _ in settings:
        key = override.key_or_group
        known = key in leaves or any(path.startswith(key + ".") for path in leaves)
        if override.is_delete():
            _check_delete(command, key, known, leaves, sections)
            continue
        if override.is_add() and known:
            raise UsageError(f"'{key}' already exists: set it with {key}=... (+ adds a key the config lacks)")
        if (override.is_add() or override.is_force_add()) and not known:
            # Only a constructor takes keys its config does not list (`+optimizer.betas=[0.9,0.99]`); anywhere
            # else an added key is read by nobody, so `+trainer.epoch=3` would be silently ignored.
            if key.rpartition(".")[0] not in sections:
                raise UsageError(_unknown_key(key, leaves, sections))
            continue
        if not known:
            raise UsageError(_unknown_key(key, leaves, sections))
        for value in _values(override):
            _check_type(key, value, leaves.get(key))

    cfg = compose(command, selections + [line for _, line in settings])
    check_values(cfg)
    _check_resolves(cfg)
    return cfg


def launchers() -> list[str]:
    """The hydra/launcher options: Hydra's basic, installed plugins' (submitit_local, submitit_slurm), conf/'s."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlrun.config.compose import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options("hydra/launcher"))


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
    if isinstance(override.value(), list) and override.key_or_group in groups():  # logger=[csv,tensorboard]
        return [str(option) for option in override.value()]
    return [override.get_value_element_as_str()]


def _check_option(group: str, option: str, available: list[str]) -> None:
    if option not in available and option != "null":
        raise UsageError(unknown_choice(group, option, available))


def unknown_choice(what: str, value: str, available: list[str]) -> str:
    near = difflib.get_close_matches(value, available, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"unknown {what} '{value}'; {hint}available: {', '.join(available)}"


def _unknown_key(key: str, leaves: dict[str, Any], sections: list[str]) -> str:
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'? " if near else ""
    parent = key.rpartition(".")[0]
    siblings = sorted(p.rpartition(".")[2] for p in leaves if p.rpartition(".")[0] == parent)
    where = f"keys under '{parent}'" if parent else "top-level keys"
    listing = f"{where}: {', '.join(siblings)}" if siblings else f"'{parent}' is not a config section"
    if parent in sections:
        advice = f"use +{key}=... to pass a new argument to the {parent} constructor"
    elif sections:
        advice = f"+key=... adds keys only under {', '.join(sections)}, whose values go to a constructor"
    else:
        advice = "this command takes no added keys"
    return f"unknown key '{key}'; {hint}{listing} ({advice})"


def _constructor_sections(leaves: dict[str, Any]) -> list[str]:
    """Sections whose values are a constructor's arguments (they have a `_target_`): dataset, model, ..."""
    return [path.removesuffix("._target_") for path in leaves if path.endswith("._target_")]


def _check_delete(command: str, key: str, known: bool, leaves: dict[str, Any], sections: list[str]) -> None:
    """`~key` may drop a constructor's argument (the constructor's default applies); every other key is read by
    dlrun itself, and deleting it would crash the command long after validation."""
    if not known:
        raise UsageError(_unknown_key(key, leaves, sections))
    parent, _, name = key.rpartition(".")
    if parent not in sections or name.startswith("_") and name.endswith("_"):  # _target_, _partial_: Hydra's own
        raise UsageError(f"cannot delete '{key}': dlrun {command} needs it; set it instead ({key}=...)")


def _quoting_hint(overrides: list[str]) -> str:
    """Hydra's lexer takes only ASCII in an unquoted value: say how to quote the first value that is not."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not value.isascii():
            return f"; quote a value with non-ASCII characters, e.g. \"{key}='{value}'\" in the shell"
    return ""


def _check_type(key: str, text: str, default: Any) -> None:
    """The new value must have the default's type (an int is fine where a float is expected)."""
    if default is None or text == "null":
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_override(f"k={text}").value()
    expected = type(default)
    ok = (
        isinstance(value, str)
        and expected is str
        or expected is bool
        and isinstance(value, bool)
        or expected is int
        and isinstance(value, int)
        and not isinstance(value, bool)
        or expected is float
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        or expected in (list, tuple)
        and isinstance(value, list)
        or expected is dict
        and isinstance(value, dict)
        or expected is str
        and isinstance(value, (int, float, bool))  # a name like 123 is still a name
    )
    if not ok:
        raise UsageError(f"{key} must be {_type_name(expected)}, got '{text}'")


def _type_name(expected: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list like [1,2]",
        dict: "a mapping like {a:1}",
    }.get(expected, expected.__name__)


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
    "trainer.devices": (lambda v: _is_count(v), "an integer >= 1"),
    "trainer.dist_timeout_s": (lambda v: 0 < v < math.inf, "a number > 0"),
    "trainer.patience": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "optimizer.lr": (lambda v: 0 < v < math.inf, "a number > 0 and finite"),
    "dataset.input_shape": (
        lambda v: v is None or (len(v) >= 1 and all(isinstance(d, int) and d >= 1 for d in v)),
        "null (read from the data) or a non-empty list of integers >= 1",
    ),
    "dataset.max_len": (lambda v: _is_count(v), "an integer >= 1"),
    "dataset.vocab_size": (lambda v: v is None or (_is_count(v) and v >= 2), "null or an integer >= 2"),
    "dataset.level": (lambda v: v in ("char", "word"), "one of char, word"),
    "dataset.header": (lambda v: v in ("auto", True, False), "one of auto, true, false"),
    "model.layers": (lambda v: _is_count(v), "an integer >= 1"),
    "model.embedding_dim": (lambda v: _is_count(v), "an integer >= 1"),
    "dataset.val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dataset.test_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dataset.num_outputs": (lambda v: v is None or _is_count(v), "null or an integer >= 1"),
    "model.channels": (lambda v: _are_counts(v) and len(v) == 2, "a list of two integers >= 1, like [32,64]"),
    "model.hidden": (lambda v: _is_count(v) or _are_counts(v), "an integer >= 1 or a list of them"),
    "model.widths": (lambda v: _are_counts(v) and len(v) >= 1, "a non-empty list of integers >= 1"),
    "model.blocks_per_stage": (lambda v: _is_count(v), "an integer >= 1"),
    "model.width": (lambda v: _is_count(v) and v >= 4, "an integer >= 4"),  # GoogLeNet's smallest branch is width//4
    "model.width_mult": (lambda v: 0 < v < math.inf, "a number > 0"),
    "model.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    # Fine-tuning (dlrun.training.transfer, .ema, .adapters); module names are checked against the built model.
    "trainer.freeze": (lambda v: _are_names(v), "a list of module names, like [features]"),
    "trainer.head": (lambda v: _are_names(v), "a list of module names, like [head]"),
    "trainer.backbone_lr_ratio": (lambda v: 0 < v < math.inf, "a number > 0 (the backbone's lr / optimizer.lr)"),
    "trainer.ema": (lambda v: v is None or 0 < v < 1, "null or a decay in (0, 1), like 0.999"),
    "model.weights_path": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a file path"),
    "adapter.r": (lambda v: _is_count(v), "an integer >= 1"),
    "adapter.alpha": (lambda v: 0 < v < math.inf, "a number > 0"),
    "adapter.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adapter.target": (lambda v: v is None or (_are_names(v) and len(v) >= 1), "null or a list of layer names"),
    "adapter.train": (lambda v: _are_names(v), "a list of module names, like [head]"),
    "quantizer.epochs": (lambda v: _is_count(v), "an integer >= 1"),
    "distiller.temperature": (lambda v: 0 < v < math.inf, "a number > 0 and finite"),
    "distiller.alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "device": (lambda v: _is_device(v), "one of auto, cpu, cuda, cuda:N"),
    "batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "n_trials": (lambda v: _is_count(v), "an integer >= 1"),
    "sampler.name": (lambda v: v in ("tpe", "random"), "one of tpe, random"),
    "sampler.startup_trials": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "pruner.name": (lambda v: v in ("median", "successive_halving", "none"), "one of median, successive_halving, none"),
    "pruner.startup_trials": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "pruner.warmup_epochs": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "pruner.min_epochs": (lambda v: _is_count(v), "an integer >= 1"),
    "pruner.reduction_factor": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    "max_drop": (lambda v: v is None or 0 <= v < math.inf, "null or a number >= 0 (accuracy points lost on val)"),
    "max_float_layers": (lambda v: v is None or (isinstance(v, int) and v >= 0), "null or an integer >= 0"),
    "report": (lambda v: v in (None, "sensitivity"), "null or sensitivity"),
}


# Rules between keys, checked when the config has all of them: (paths, predicate on their values, the rule).
CROSS_RULES: list[tuple[tuple[str, ...], Callable[..., bool], str]] = [
    (
        ("dataset.val_fraction", "dataset.test_fraction"),
        lambda val, test: val + test < 1,
        "dataset.val_fraction + dataset.test_fraction must be < 1 (the rest is the training split)",
    ),
    (
        ("dataset.task", "dataset.num_outputs"),
        lambda task, n: task != "classification" or n is None or n >= 2,
        "dataset.num_outputs must be >= 2 for classification (one class is always right)",
    ),
]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _are_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v != "" for v in value)


def _are_counts(value: Any) -> bool:
    return isinstance(value, list) and all(_is_count(v) for v in value)


def _is_device(value: Any) -> bool:
    return value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value)) is not None


_ABSENT = object()


def check_values(cfg) -> None:
    for path, (predicate, must_be) in RULES.items():
        value = _select(cfg, path)
        if value is not _ABSENT and not _holds(predicate, value):
            raise UsageError(f"{path} must be {must_be}, got {value!r}")
    for paths, predicate, rule in CROSS_RULES:
        values = [_select(cfg, path) for path in paths]
        if _ABSENT not in values and not _holds(predicate, *values):
            got = ", ".join(f"{path}={value!r}" for path, value in zip(paths, values, strict=True))
            raise UsageError(f"{rule}, got {got}")


def _select(cfg, path: str) -> Any:
    """The value at `path` as plain Python (lists, not ListConfig), or _ABSENT when this command has no such key."""
    from omegaconf import Container, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=False)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
    except OmegaConfBaseException as exc:
        raise UsageError(f"{path}: {one_line(exc)}") from None


def _holds(predicate: Callable[..., bool], *values: Any) -> bool:
    try:
        return bool(predicate(*values))
    except TypeError:  # a value of the wrong type (None, a string...) breaks the rule
        return False
