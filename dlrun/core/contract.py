"""The run contract: what a run directory hands to the next command, typed and checked on read.

summary.json, the machine-readable result of every run, is one flat JSON object:

    command        "train" | "eval" | "quantize" | "export" | "bench" | "distill" | "prune"
    <record>       the command's own keys, flat at top level (see the *Record classes below):
                   train     checkpoint, best_epoch, epochs_run
                   eval      kind, evaluated, weights_bytes, file_bytes
                   quantize  mode, backend, dtype, program, size_bytes, max_drop, val_drop, float_layers,
                             sensitivity [{layer, params, sqnr_db, only_quantized, only_float}]
                   export    format, backend, source_kind, artifact, size_bytes, max_batch, dynamic_batch,
                             verification {passed, samples, max_abs_diff, relative_diff, top1_agreement,
                             accuracy, batch_sizes, reason}
                   bench     rows, threads
                   distill   train's + teacher, temperature, alpha, baseline_checkpoint (metrics.teacher, .baseline)
                   prune     checkpoint, method, importance, scope, ratio, flops_ratio, steps, finetune_epochs,
                             ignored (metrics.unpruned: the source's test metrics; before, after, comparison)
    metrics        {split: {metric: value}}, e.g. metrics.test.accuracy with metrics.test.samples beside it
    <extra>        free-form measurements (params, flops, latency_ms, comparison, delegation...)
    source_run     lineage of derived runs (absent for train, the root of every lineage): the run the model
    train_run      was read from, the train run at the root, and that run's resolved config, from which
    source_config  later commands rebuild dataset and model (checked by config.trust before use)
    wall_s, versions, git_commit, config    timing, provenance and this run's resolved config

Paths in summaries are relative to the directory the command ran in (rundir.relative). read_summary
checks the keys later commands rely on and names the file and the key when one is missing or of the
wrong type, so a hand-edited or foreign summary.json is one line, never a KeyError.

A checkpoint (checkpoints/last.pt, best.pt; dlrun.core.checkpoint) is a dict of tensors and plain values,
loaded with weights_only=True, keyed by the constants in dlrun.core.checkpoint:

    MODEL          the model's state_dict                      (required)
    CONFIG         the train run's resolved config: later commands rebuild the model from it (required)
    OPTIMIZER      optimizer state_dict (Adam's moments make the file ~3x the weights)
    SCHEDULER      LR scheduler state_dict
    EPOCH          last completed epoch, 1-based (0: saved before the first epoch)
    RNG            torch CPU (and CUDA) generator states at the end of EPOCH
    TRAINER_STATE  best metric, best epoch, epochs without improvement
    VERSIONS, GIT_COMMIT   provenance, as in summary.json
    STRUCTURE      prune runs only: {module name: {out_channels: 12, in_features: 48, groups: 12, ...}}, the width
                   attributes (plain ints) of every layer. CONFIG builds the unpruned architecture; load_model
                   narrows it to STRUCTURE and to MODEL's tensor shapes (compression.pruning.resize), then loads
                   MODEL: a pruned model reloads with weights_only=True and no pickled code
    EMA            last.pt of trainer.ema runs: the moving average's state_dict, restored exactly on resume
                   (best.pt's MODEL holds the averaged weights, last.pt's the live ones)
    ADAPTER        last.pt of adapter=lora runs: the PEFT model's state_dict, for a resume (MODEL holds the
                   adapters merged into plain weights, in best.pt and last.pt alike)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlrun.core import provenance, rundir
from dlrun.core.errors import UsageError
from dlrun.core.files import write_json


@dataclass(frozen=True)
class Lineage:
    """Where a derived run's model came from; `bench` follows train_run to find every variant of a model."""

    source_run: str | None = None  # the run whose checkpoint, program or artifact this run read
    train_run: str | None = None  # the train run at the root of the lineage
    source_config: dict | None = None  # that train run's resolved config (dataset, model...)


@dataclass(frozen=True)
class Verification:
    """An exported artifact run in its own runtime vs the eager source model on the same test samples."""

    passed: bool
    samples: int
    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max |reference output|
    top1_agreement: float | None = None  # classification only
    accuracy: float | None = None  # of the artifact, over `samples`
    batch_sizes: list[int] = field(default_factory=list)
    reason: str = ""  # why it failed; empty when it passed


@dataclass(frozen=True)
class TrainRecord:
    checkpoint: str  # checkpoints/best.pt: best on the validation metric
    best_epoch: int
    epochs_run: int


@dataclass(frozen=True)
class DistillRecord(TrainRecord):
    """The student's train record and how it was taught; the lineage's source_run is the teacher's run."""

    teacher: str  # the teacher's checkpoint
    temperature: float
    alpha: float
    baseline_checkpoint: str | None  # the same student trained without the teacher (baseline=true), else None


@dataclass(frozen=True)
class EvalRecord:
    kind: str  # what was evaluated: checkpoint | quantized | artifact (sources.Source.kind)
    evaluated: str  # its path
    # Sizes that compare like with like: a checkpoint file also holds the optimizer's state, a program its graph.
    weights_bytes: int | None  # bytes of the model's tensors (None: a runtime artifact, opaque to PyTorch)
    file_bytes: int  # the evaluated file on disk


@dataclass(frozen=True)
class QuantizeRecord:
    mode: str  # ptq | dynamic | qat | weight_only
    backend: str
    dtype: str | None  # weight-only dtype; None for the PT2E modes (int8)
    program: str  # model.pt2, loadable with program.load_program
    size_bytes: int  # of the program file
    # Accuracy-aware quantization (max_drop= / report=sensitivity; compression.sensitivity). Quality lost is in
    # accuracy points (classification) or percent of the fp32 MSE (regression), on the val split.
    max_drop: float | None = None  # the budget; None when none was set
    val_drop: float | None = None  # quality the saved program loses on val (None: not measured)
    float_layers: list[str] = field(default_factory=list)  # layers kept float to meet max_drop
    # one row per layer: {layer, params, sqnr_db, only_quantized, only_float} (only_*: quality lost)
    sensitivity: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ExportRecord:
    format: str  # pte | pt2 | onnx
    backend: str
    source_kind: str  # fp32 or a quantized kind (capabilities.SOURCE_KINDS)
    artifact: str
    size_bytes: int  # of the artifact file
    max_batch: int
    dynamic_batch: bool
    verification: Verification

    @property
    def largest_batch(self) -> int:
        """The largest batch the artifact accepts."""
        return self.max_batch if self.dynamic_batch else 1


@dataclass(frozen=True)
class PruneRecord:
    checkpoint: str  # checkpoints/best.pt: the pruned model after its last round of fine-tuning
    method: str  # structured | unstructured
    importance: str  # magnitude | taylor | bn_scale (unstructured: magnitude)
    scope: str  # global | uniform (unstructured: global)
    ratio: float | None  # channels (structured) or weights (unstructured) removed; None when flops_ratio set it
    flops_ratio: float | None  # the FLOPs fraction targeted instead of ratio
    steps: int  # rounds of prune -> fine-tune -> evaluate (metrics.csv: one row per round, round 0 = the source)
    finetune_epochs: int  # per round
    ignored: list[str]  # modules never pruned (the output layer among them)


@dataclass(frozen=True)
class BenchRecord:
    rows: list[dict]  # one per variant, as in bench.json
    threads: int


@dataclass(frozen=True)
class ProfileRecord:
    profiled: str  # the .pte
    batch: int
    iterations: int  # measured runs (after warm-up)
    threads: int  # the runtime's threadpool size
    operators: list[dict]  # one per operator, slowest first (dlrun.deploy.profile.OperatorRow)


Record = (
    TrainRecord | EvalRecord | QuantizeRecord | ExportRecord | BenchRecord | DistillRecord | PruneRecord | ProfileRecord
)
_COMMON_KEYS = ("command", "metrics", "wall_s", "versions", "git_commit", "config")  # in every summary
RECORDS: dict[str, type] = {
    "train": TrainRecord,
    "eval": EvalRecord,
    "quantize": QuantizeRecord,
    "export": ExportRecord,
    "bench": BenchRecord,
    "distill": DistillRecord,
    "prune": PruneRecord,
    "profile": ProfileRecord,
}


@dataclass
class Summary:
    command: str
    config: dict  # this run's resolved config
    wall_s: float
    record: Record
    metrics: dict = field(default_factory=dict)
    lineage: Lineage | None = None  # None for train runs, the roots of lineages
    extra: dict = field(default_factory=dict)  # free-form: params, flops, latency_ms, comparison...
    versions: dict = field(default_factory=provenance.versions)
    git_commit: str | None = field(default_factory=provenance.git_commit)

    def to_json(self) -> dict:
        """The flat summary.json object (record, extra and lineage keys at top level, as readers expect)."""
        record = dataclasses.asdict(self.record)
        lineage = dataclasses.asdict(self.lineage) if self.lineage else {}
        clash = set(self.extra) & {*_COMMON_KEYS, *record, *lineage}
        if clash:  # a programming error: an extra key would silently replace a typed one
            raise ValueError(f"summary extra fields {sorted(clash)} clash with typed fields")
        return {
            "command": self.command,
            **record,
            "metrics": self.metrics,
            **self.extra,
            **lineage,
            "wall_s": self.wall_s,
            "versions": self.versions,
            "git_commit": self.git_commit,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Summary:
        """Check and type a summary.json object; UsageError naming `where` and the key when it does not hold."""
        if not isinstance(data, dict):
            raise UsageError(f"{where}: a summary must be a JSON object, got {_type_name(data)}")
        command = _typed(data, "command", str, where)
        if command not in RECORDS:
            raise UsageError(f"{where}: key 'command' is '{command}', expected one of {', '.join(RECORDS)}")
        record_cls = RECORDS[command]
        record = _build(record_cls, _with_export_batch(data) if record_cls is ExportRecord else data, where)
        lineage_keys = [f.name for f in dataclasses.fields(Lineage)]
        lineage = _build(Lineage, data, where) if any(k in data for k in lineage_keys) else None
        typed = {*_COMMON_KEYS, *(f.name for f in dataclasses.fields(record_cls)), *lineage_keys}
        return cls(
            command=command,
            config=_typed(data, "config", dict, where),
            wall_s=_typed(data, "wall_s", float, where),
            record=record,
            metrics=_typed(data, "metrics", dict, where, default={}),
            lineage=lineage,
            extra={k: v for k, v in data.items() if k not in typed},
            versions=_typed(data, "versions", dict, where),
            git_commit=_typed(data, "git_commit", str | None, where),
        )


def write_summary(run_dir: Path, summary: Summary) -> Summary:
    """Write run_dir/summary.json atomically."""
    write_json(Path(run_dir) / rundir.SUMMARY, summary.to_json())
    return summary


def read_summary(path: Path | str, command: str | None = None) -> Summary:
    """Read and check a summary.json (or the one in a run directory), of `command` when given.

    Every problem is a UsageError of one line naming the file and, for a bad key, the key."""
    path = Path(path)
    if path.is_dir():
        path = path / rundir.SUMMARY
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise UsageError(f"{path} is not readable JSON: {str(exc).splitlines()[0]}") from None
    summary = Summary.from_json(data, str(path))
    if command and summary.command != command:
        raise UsageError(f"{path}: key 'command' is '{summary.command}', expected '{command}'")
    return summary


_REQUIRED = object()
_NAMES = {
    type(None): "null",
    bool: "true/false",
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
}


def _with_export_batch(data: dict) -> dict:
    """Export summaries written before max_batch and dynamic_batch were top-level keys kept them in config.export."""
    config = data.get("config")
    export = config.get("export") if isinstance(config, dict) else None
    if not isinstance(export, dict):
        return data
    return {**{k: export[k] for k in ("max_batch", "dynamic_batch") if k in export}, **data}


def _build(cls: type, data: dict, where: str, prefix: str = ""):
    """An instance of dataclass `cls` from the JSON object `data`, every field checked against its annotation."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in data and has_default:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested = _typed(data, f.name, dict, where, prefix=prefix)
            values[f.name] = _build(hints[f.name], nested, where, prefix=f"{prefix}{f.name}.")
        else:
            values[f.name] = _typed(data, f.name, hints[f.name], where, prefix=prefix)
    return cls(**values)


def _typed(data: dict, key: str, expected, where: str, *, default: Any = _REQUIRED, prefix: str = ""):
    """data[key], checked against the annotation `expected` (str, int | None, list[int], dict...)."""
    if key not in data:
        if default is not _REQUIRED:
            return default
        raise UsageError(f"{where}: missing key '{prefix}{key}'")
    value = data[key]
    if not _matches(value, expected):
        expected_name, got = _annotation_name(expected), _type_name(value)
        raise UsageError(f"{where}: key '{prefix}{key}' should be {expected_name}, got {got}")
    return value


def _matches(value: Any, expected) -> bool:
    if typing.get_origin(expected) is types.UnionType:
        return any(_matches(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    expected = typing.get_origin(expected) or expected  # list[int] -> list: items are not checked
    if isinstance(value, bool):  # JSON true/false are bools, never numbers
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _annotation_name(expected) -> str:
    if typing.get_origin(expected) is types.UnionType:
        return " or ".join(_annotation_name(option) for option in typing.get_args(expected))
    expected = typing.get_origin(expected) or expected
    return _NAMES.get(expected, getattr(expected, "__name__", str(expected)))


def _type_name(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)
