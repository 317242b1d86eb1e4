"""Where a command's model comes from: a train checkpoint, a quantized program, or an exported artifact.

`run=`, `ckpt=` and `artifact=` all resolve to a `Source` carrying the training run's own config,
so eval/quantize/export/bench rebuild the same dataset and model without repeating overrides.
Every derived run's summary.json records its lineage (contract.Lineage): `source_run`, `train_run`, `source_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlrun.config.trust import check_stored_config
from dlrun.core import contract, rundir
from dlrun.core.errors import DlrunError, Unsupported, UsageError

QUANTIZED_PROGRAM = "model.pt2"  # what a quantize run leaves behind (torch.export.save)
ARTIFACT_SUFFIXES = (".pte", ".pt2", ".onnx")
# Commands that take a user's own weights file as ckpt= (a state_dict from a tutorial, not a dlrun checkpoint),
# building its model from the command line's model= and dataset= (their conf/*.yaml default model to null).
OWN_WEIGHTS_COMMANDS = ("eval", "quantize", "export")


@dataclass
class Source:
    kind: str  # checkpoint | quantized | artifact
    path: Path  # the checkpoint, program or artifact file
    config: dict  # resolved config of the train run the weights come from
    run_dir: Path | None  # the run that produced `path`
    train_run: Path | None  # the train run at the root of the lineage
    max_batch: int | None = None  # largest batch an exported artifact accepts (None: any)
    own_weights: bool = False  # a user's own weights file (not a dlrun checkpoint): config is the command line's

    @property
    def lineage(self) -> contract.Lineage:
        """What a run derived from this source records about it (summary.json's source_run, train_run...)."""
        return contract.Lineage(
            source_run=rundir.relative(self.run_dir) if self.run_dir else None,
            train_run=rundir.relative(self.train_run) if self.train_run else None,
            source_config=self.config,
        )

    @property
    def label(self) -> str:
        return rundir.relative(self.path)


def resolve(
    *,
    run: str | None = None,
    ckpt: str | None = None,
    artifact: str | None = None,
    default: tuple[str, ...] = ("train",),
    trusted=(),
) -> Source:
    """Resolve the user's run=/ckpt=/artifact= (at most one) or the latest completed run of `default`.

    The stored config is checked (config.check_stored_config) before anything is built from it: only
    dlrun's own builders and the `trusted` targets may be instantiated.
    """
    given = [(k, v) for k, v in (("run", run), ("ckpt", ckpt), ("artifact", artifact)) if v]
    if len(given) > 1:
        raise UsageError(f"give only one of run=, ckpt=, artifact= (got {', '.join(k for k, _ in given)})")
    if ckpt:
        source = _from_checkpoint(Path(ckpt), trusted=trusted)
    elif artifact:
        source = _from_artifact(Path(artifact), trusted)
    else:
        run_dir = rundir.run_dir_arg(run) if run else rundir.latest_run(*default)
        source = from_run_dir(run_dir, trusted)
    typed = _typed_model_overrides() if not source.own_weights else []
    if typed:
        raise UsageError(
            f"{source.label} rebuilds the model and dataset stored with it: drop {typed[0]} "
            "(model= and dataset= are for a ckpt= file of your own weights)"
        )
    return source


def from_run_dir(run_dir: Path, trusted=()) -> Source:
    if (run_dir / "checkpoints" / "best.pt").is_file():
        return _from_checkpoint(run_dir / "checkpoints" / "best.pt", run_dir, trusted)
    summary_path = run_dir / rundir.SUMMARY
    if (run_dir / QUANTIZED_PROGRAM).is_file() and summary_path.is_file():
        lineage = contract.read_summary(summary_path, "quantize").lineage
        return Source(
            "quantized",
            run_dir / QUANTIZED_PROGRAM,
            _source_config(lineage, summary_path, trusted),
            run_dir,
            _train_run(lineage, summary_path),
        )
    artifacts = [p for p in sorted(run_dir.iterdir()) if p.suffix in ARTIFACT_SUFFIXES] if run_dir.is_dir() else []
    if artifacts and summary_path.is_file():
        return _from_artifact(artifacts[0], trusted)
    raise UsageError(
        f"{run_dir} holds no checkpoints/best.pt, {QUANTIZED_PROGRAM} or exported artifact with a summary.json"
    )


def _from_checkpoint(path: Path, run_dir: Path | None = None, trusted=()) -> Source:
    from dlrun.core import checkpoint

    saved = checkpoint.load_file(path)
    if not checkpoint.is_dlrun(saved) and run_dir is None and _command()[0] in OWN_WEIGHTS_COMMANDS:
        return _own_weights(path, saved)
    if not checkpoint.is_dlrun(saved):
        raise UsageError(
            f"{path} is not a dlrun checkpoint (expected a dict with keys {', '.join(checkpoint.REQUIRED)})"
        )
    config = check_stored_config(saved[checkpoint.CONFIG], str(path), trusted)
    run_dir = run_dir or (path.parent.parent if path.parent.name == "checkpoints" else None)
    train_run = run_dir
    summary_path = run_dir / rundir.SUMMARY if run_dir else None
    if checkpoint.STRUCTURE in saved and summary_path and summary_path.is_file():
        # A pruned model's (prune run, or distill into a pruned student) lineage goes on to the train run at its
        # root: bench finds its variants there.
        train_run = _train_run(contract.read_summary(summary_path).lineage, summary_path) or run_dir
    return Source("checkpoint", path, config, run_dir, train_run)


def _own_weights(path: Path, saved) -> Source:
    """ckpt= a user's own weights (`torch.save(model.state_dict(), ...)`): the model is built from this command's
    model= and dataset= (typed by the user, so no stored config is involved), the weights checked now."""
    from omegaconf import OmegaConf

    from dlrun.core import checkpoint

    _, config = _command()
    if config is None or config.get("model") is None or config.get("dataset") is None:
        raise UsageError(
            f"{path} is not a dlrun checkpoint (it stores no model config): to use your own weights, pass the "
            "model and the dataset they were trained for, e.g. model=lenet dataset=digits (and model.* sizes)"
        )
    checkpoint.state_dict_of(saved, str(path))  # refuse a file without weights before anything is built
    resolved = OmegaConf.to_container(OmegaConf.create({k: config[k] for k in ("dataset", "model")}), resolve=True)
    # QAT fine-tunes with the training run's optimizer, scheduler and trainer settings: here, train's defaults.
    return Source("checkpoint", path, {**_train_defaults(), **resolved}, None, None, own_weights=True)


def _train_defaults() -> dict:
    """The optimizer, scheduler and trainer that `dlrun train` composes by default (conf/train.yaml)."""
    from omegaconf import OmegaConf

    from dlrun.config.compose import conf_dir

    chosen = {}
    for entry in OmegaConf.load(conf_dir() / "train.yaml").defaults:
        for group, option in entry.items() if hasattr(entry, "items") else []:
            if group in ("optimizer", "scheduler", "trainer") and option:
                chosen[group] = OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{option}.yaml"))
    return chosen


def _command():
    """This Hydra job's command name and composed config (None, None outside a dlrun command)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None, None
    job = HydraConfig.get()
    saved = Path(job.runtime.output_dir) / str(job.output_subdir) / "config.yaml"
    return job.job.name, (OmegaConf.load(saved) if job.output_subdir and saved.is_file() else None)


def _typed_model_overrides() -> list[str]:
    """In eval/quantize/export: the model=/dataset= overrides typed on the command line (own weights only)."""
    import re

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().job.name not in OWN_WEIGHTS_COMMANDS:
        return []
    return [o for o in HydraConfig.get().overrides.task if re.match(r"[+~]*(model|dataset)([.=]|$)", o)]


def _from_artifact(path: Path, trusted=()) -> Source:
    if path.suffix not in ARTIFACT_SUFFIXES:
        raise UsageError(f"artifact {path} must be one of {', '.join(ARTIFACT_SUFFIXES)}")
    if not path.is_file():
        raise UsageError(f"artifact {path} does not exist")
    summary_path = path.parent / rundir.SUMMARY
    if not summary_path.is_file():
        raise UsageError(
            f"cannot tell which dataset {path} was made for: no {rundir.SUMMARY} beside it "
            "(export it with dlrun export)"
        )
    summary = contract.read_summary(summary_path, "export")
    return Source(
        "artifact",
        path,
        _source_config(summary.lineage, summary_path, trusted),
        path.parent,
        _train_run(summary.lineage, summary_path),
        summary.record.largest_batch,
    )


def _source_config(lineage: contract.Lineage | None, where: Path, trusted=()) -> dict:
    config = lineage.source_config if lineage else None
    if not isinstance(config, dict) or "dataset" not in config or "model" not in config:
        raise UsageError(f"{where} has no source_config (dataset and model of the trained model)")
    return check_stored_config(config, f"{where} (source_config)", trusted)


def _train_run(lineage: contract.Lineage | None, where: Path) -> Path | None:
    """The lineage's train run. Summaries store it relative to the directory the command ran in, which need not
    be today's working directory: then it is found under the folder holding the summary's outputs/."""
    if not (lineage and lineage.train_run):
        return None
    path = Path(lineage.train_run)
    if path.is_absolute() or path.exists():
        return path
    return next((root / path for root in where.resolve().parents if (root / path).is_dir()), path)


def load_model(source: Source, device="cpu"):
    """The fp32 nn.Module of a checkpoint source, in eval mode."""
    from omegaconf import OmegaConf

    from dlrun import models
    from dlrun.core import checkpoint

    if source.kind != "checkpoint":
        raise UsageError(f"{source.label} is a {source.kind}, not a train checkpoint")
    config = OmegaConf.create(source.config)
    model = models.build(config.model)
    if source.own_weights:
        weights = checkpoint.state_dict_of(checkpoint.load_file(source.path, device), source.label)
        checkpoint.load_weights(model, weights, source.label, "the model config of model=... on the command line")
        return model.to(device).eval()
    saved = checkpoint.load(source.path, device)
    try:
        if checkpoint.STRUCTURE in saved:  # a pruned model: narrower than its config builds it
            from dlrun.compression import pruning

            pruning.resize(model, saved[checkpoint.STRUCTURE], saved[checkpoint.MODEL])
    except Unsupported as exc:  # the stored widths belong to another architecture
        raise UsageError(f"{source.label} does not fit its own model config: {exc}") from None
    checkpoint.load_weights(model, saved[checkpoint.MODEL], source.label)
    return model.to(device).eval()


def load_predictor(source: Source, device="cpu"):
    """A callable x -> outputs for any source: eager model, quantized program, or artifact in its runtime."""
    if source.kind == "checkpoint":
        return load_model(source, device)
    try:
        if source.kind == "quantized":
            from dlrun.deploy.program import load_program

            return load_program(source.path)
        from dlrun.deploy.runtime import load_runner

        return load_runner(source.path)
    except ImportError as exc:  # a missing optional runtime: the message says what to pip install
        raise DlrunError(str(exc)) from None
    except DlrunError:  # load_program's and load_runner's own one-line explanations
        raise
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for a truncated or corrupt file
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(f"cannot load {source.label} (truncated or corrupt?): {reason}") from None


def load_data(source: Source, device="cpu"):
    from omegaconf import OmegaConf

    from dlrun import data

    return data.build(OmegaConf.create(source.config).dataset, device)
