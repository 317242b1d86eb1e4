"""`dlrun prune`: make a trained model smaller in rounds of prune -> fine-tune -> evaluate, and measure the gain.

    dlrun prune ratio=0.5 steps=2 finetune_epochs=2     # structured: global L2 magnitude over channels
    dlrun prune importance=taylor scope=uniform
    dlrun prune flops_ratio=0.6                         # remove 60% of the FLOPs (the channel ratio is searched)
    dlrun prune method=unstructured ratio=0.8           # zeroes weights only: no smaller, no faster
    dlrun prune resume=outputs/prune/<run>              # after Ctrl-C: continue after the last completed round

Each round removes an equal share of the target, then fine-tunes with the source run's optimizer and schedule
(through the training Loop) and keeps the round's best epoch on validation. The run leaves what a train run leaves
(checkpoints/best.pt, last.pt, summary.json with lineage), so eval, quantize, export and bench take it like a train
run; metrics.csv has one row per round, round 0 being the model before pruning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.compression import pruning
from dlrun.core import checkpoint as ckpt
from dlrun.core import contract, files, profiling, provenance, reports, rundir, sources, ui
from dlrun.core.errors import DlrunError, UsageError
from dlrun.training import callbacks, env, evaluate, loop, schedulers, session

log = logging.getLogger("dlrun")
COMPARISON_PLOT = "comparison.png"  # before/after bars: the source vs the pruned model
ROUND = "round.pt"  # checkpoints/: the model after the last completed round, what resume=RUN_DIR continues from
ROUND_KEY, SOURCE = "round", "source"  # in round.pt: that round's number, the source checkpoint's path


def run(cfg: DictConfig) -> None:
    run_dir = rundir.current()
    # Ctrl-C stops with one line saying how to resume (session.guarded); resume=RUN_DIR continues after the last
    # completed round, from checkpoints/round.pt.
    try:
        with session.guarded(run_dir, "prune"):
            _prune(cfg, run_dir)
    except DlrunError as exc:
        if exc.exit_code == session.INTERRUPTED and not (run_dir / "checkpoints" / ROUND).is_file():
            raise DlrunError(
                "interrupted before round 1 finished; nothing to resume (run the command again)", exc.exit_code
            ) from None
        raise


def _prune(cfg: DictConfig, run_dir: Path) -> None:
    started = time.perf_counter()
    _check_settings(cfg)  # before loading anything
    resumed = _last_round(run_dir) if cfg.resume else None
    # A resumed run prunes the model it started from, even if run= was left to "the latest train run".
    origin = dict(ckpt=resumed[SOURCE]) if resumed else dict(run=cfg.run, ckpt=cfg.ckpt)
    source = sources.resolve(**origin, default=("train",), trusted=cfg.trust_targets)
    if source.kind != "checkpoint":
        raise UsageError(f"prune needs a train or prune run or checkpoint, got a {source.kind} ({source.label})")
    device = env.resolve_device(cfg.device)
    train_cfg = OmegaConf.create(source.config)
    env.seed_everything(train_cfg.trainer.seed, False)
    data = sources.load_data(source, device)
    model = sources.load_model(source, device)
    ignore = pruning.ignored_layers(model, list(cfg.ignore))
    example = data.example(batch=2)
    structured = cfg.pruner.method == "structured"
    log.info(
        f"prune {source.label}: {_target(cfg)} in {cfg.steps} rounds, {cfg.finetune_epochs} fine-tuning epochs "
        f"each; never pruned: {', '.join(ignore)}"
    )

    before = _facts(model, example, cfg.latency_repeats)
    model, rounds = _prune_in_rounds(cfg, model, data, example, ignore, source, before["flops"], run_dir, resumed)
    after = _facts(model, example, cfg.latency_repeats)
    val, unpruned = _split(rounds[-1], "val"), _split(rounds[0], "test")
    test = evaluate.evaluate(model.eval(), data.test, data, confusion=True)
    comparison = _comparison(before, after, unpruned, test, data.task)
    _write_summary(cfg, run_dir, started, source, device, before, after, unpruned, val, test, comparison, ignore)
    ui.rows_table(
        "pruning rounds (round 0: before; all columns in metrics.csv)",
        [{k: v for k, v in row.items() if not k.startswith("val_")} for row in rounds],
    )
    ui.metrics_table(
        "prune: before / after",
        {"before": {**before, **_prefixed("test", unpruned)}, "after": {**after, **_prefixed("test", test)}},
    )
    plot = run_dir / COMPARISON_PLOT
    headline = "accuracy" if data.task == "classification" else "r2"
    columns = {"source": {**before, **unpruned}, "pruned": {**after, **test}}
    shown = [headline, "params", "flops", "weights_bytes", "latency_ms_p50"]
    title = f"prune ({_target(cfg)}) vs its source, test split"
    callbacks.guarded(plot, lambda: reports.comparison_plot(plot, columns, shown, title=title))
    if not structured:
        log.info(
            f"unstructured pruning: {after['zeros_fraction']:.1%} of the parameters are now zero, but the dense "
            "model is no smaller or faster (same params, FLOPs, bytes and latency): sparsity only, which needs a "
            "sparse kernel or compression to pay off. Use method=structured to shrink the network."
        )


def _prune_in_rounds(cfg, model, data, example, ignore, source, flops_before: int, run_dir, resumed: dict | None):
    """`steps` rounds of prune -> fine-tune (keeping the round's best epoch) -> measure; (model, one row per round).
    After each round its model is saved (round.pt), from which resume=RUN_DIR continues with the next round."""
    device = next(model.parameters()).device
    train_cfg = OmegaConf.create(source.config)
    batch_size = train_cfg.trainer.batch_size  # fine-tuning and Taylor scores use the source run's batches
    structured = cfg.pruner.method == "structured"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    if resumed:
        model, rounds = _restore_round(resumed, model, run_dir)
        log.info(f"resuming {rundir.relative(run_dir)} after round {resumed[ROUND_KEY]} of {cfg.steps}")
    else:
        rounds = [_round_row(0, model, data, example)]
    for step in range(len(rounds), cfg.steps + 1):
        if structured:
            score = _taylor_score(data, batch_size, cfg.pruner.grad_batches)
            model = _prune_structured(cfg, model, example, ignore, step, flops_before, score)
        else:
            pruning.prune_unstructured(model, cfg.ratio * step / cfg.steps, ignore)
        if cfg.finetune_epochs:
            _finetune(cfg, model, data, train_cfg, batch_size, step, checkpoints, source.config)
        pruning.make_permanent(model)
        if cfg.finetune_epochs:  # the round's best epoch on validation, as train keeps its best
            model.load_state_dict(ckpt.load(checkpoints / callbacks.BEST, device)[ckpt.MODEL])
        rounds.append(_round_row(step, model, data, example))
        files.write_rows(run_dir, "metrics", rounds)
        if not cfg.finetune_epochs:  # no Loop wrote checkpoints: the pruned model is both best and last
            for name in (callbacks.BEST, callbacks.LAST):
                ckpt.save(checkpoints / name, {**_plain_checkpoint(source.config), **_pruned_weights(model)})
        _save_round(checkpoints, step, model, source)
    return model, rounds


def _save_round(checkpoints: Path, step: int, model: nn.Module, source: sources.Source) -> None:
    """round.pt: the model after round `step`, the RNG state and the source checkpoint."""
    saved = {**_plain_checkpoint(source.config), **_pruned_weights(model), ROUND_KEY: step, ckpt.RNG: env.rng_state()}
    ckpt.save(checkpoints / ROUND, {**saved, SOURCE: str(source.path.resolve())})


def _last_round(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / ROUND
    if not path.is_file():
        raise UsageError(f"cannot resume {rundir.relative(run_dir)}: no checkpoints/{ROUND} (is it a prune run?)")
    return ckpt.load(path)


def _restore_round(saved: dict, model: nn.Module, run_dir: Path) -> tuple[nn.Module, list[dict]]:
    """The model and metric rows after the saved round, and the RNG state then: the next round runs as it would
    have without the interruption."""
    pruning.resize(model, saved[ckpt.STRUCTURE], saved[ckpt.MODEL])
    ckpt.load_weights(model, saved[ckpt.MODEL], ROUND)
    env.set_rng_state(saved[ckpt.RNG])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # written before round.pt, so it has the round
    return model, [row for row in map(json.loads, lines) if row["round"] <= saved[ROUND_KEY]]


def _write_summary(cfg, run_dir, started, source, device, before, after, unpruned, val, test, comparison, ignore):
    """summary.json: the train contract (best checkpoint, val/test metrics, lineage) plus before/after facts."""
    structured = cfg.pruner.method == "structured"
    checkpoints = run_dir / "checkpoints"
    p = cfg.pruner
    contract.write_summary(
        run_dir,
        contract.Summary(
            "prune",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            metrics={"val": val, "test": test, "unpruned": unpruned},
            lineage=source.lineage,
            record=contract.PruneRecord(
                checkpoint=rundir.relative(checkpoints / callbacks.BEST),
                method=p.method,
                importance=p.importance if structured else "magnitude",
                scope=p.scope if structured else "global",
                ratio=None if structured and p.flops_ratio is not None else cfg.ratio,
                flops_ratio=p.flops_ratio if structured else None,
                steps=cfg.steps,
                finetune_epochs=cfg.finetune_epochs,
                ignored=ignore,
            ),
            extra={
                "params": after["params"],
                "flops": after["flops"],
                "before": before,
                "after": after,
                "comparison": comparison,
                "device": str(device),
            },
        ),
    )


def _check_settings(cfg: DictConfig) -> None:
    """Ranges Hydra's types cannot express, checked before the source is loaded: one line, exit 2."""
    p = cfg.pruner
    if p.method == "structured":
        if p.importance not in pruning.IMPORTANCES:
            raise UsageError(f"importance must be one of {', '.join(pruning.IMPORTANCES)}, got {p.importance!r}")
        if p.scope not in pruning.SCOPES:
            raise UsageError(f"scope must be one of {', '.join(pruning.SCOPES)}, got {p.scope!r}")
        if p.flops_ratio is not None and not 0 < p.flops_ratio < 1:
            raise UsageError(f"flops_ratio must be in (0, 1) (the fraction of FLOPs removed), got {p.flops_ratio}")
        if not 0 < p.max_layer_ratio < 1:
            raise UsageError(f"pruner.max_layer_ratio must be in (0, 1), got {p.max_layer_ratio}")
        if p.p not in (1, 2):
            raise UsageError(f"pruner.p must be 1 (L1) or 2 (L2), got {p.p}")
        if p.round_to is not None and p.round_to < 1:
            raise UsageError(f"pruner.round_to must be null or an integer >= 1, got {p.round_to}")
        if p.grad_batches < 1:
            raise UsageError(f"pruner.grad_batches must be >= 1, got {p.grad_batches}")
    if not 0 < cfg.ratio < 1:
        what = "channels" if p.method == "structured" else "weights"
        raise UsageError(f"ratio must be in (0, 1) (the fraction of {what} removed), got {cfg.ratio}")
    if cfg.steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {cfg.steps}")
    if cfg.finetune_epochs < 0:
        raise UsageError(f"finetune_epochs must be an integer >= 0, got {cfg.finetune_epochs}")
    if not cfg.lr_scale > 0:
        raise UsageError(f"lr_scale must be > 0, got {cfg.lr_scale}")


def _target(cfg: DictConfig) -> str:
    p = cfg.pruner
    if p.method == "unstructured":
        return f"{cfg.ratio:.0%} of the weights zeroed (unstructured, global L1)"
    criterion = f"{p.importance}{f' L{p.p}' if p.importance == 'magnitude' else ''}, {p.scope}"
    if p.flops_ratio is not None:
        return f"{p.flops_ratio:.0%} of the FLOPs removed ({criterion})"
    return f"{cfg.ratio:.0%} of the channels removed ({criterion})"


def _prune_structured(
    cfg, model: nn.Module, example, ignore: list[str], step: int, source_flops: int, score: pruning.Score
) -> nn.Module:
    """Round `step`: a pruned copy of `model` that has removed step/steps of the target in all."""
    p = cfg.pruner
    options = dict(
        ignore=ignore,
        importance=p.importance,
        p=p.p,
        scope=p.scope,
        max_layer_ratio=p.max_layer_ratio,
        round_to=p.round_to,
        score=score,
    )
    if p.flops_ratio is not None:
        target = int(source_flops * (1 - p.flops_ratio * step / cfg.steps))
        return pruning.prune_to_flops(model, example, target, **options)
    return pruning.prune_structured(model, example, ratio=pruning.step_fraction(cfg.ratio, step, cfg.steps), **options)


def _taylor_score(data, batch_size: int, batches: int) -> pruning.Score:
    """Gradients of the loss on the first `batches` training batches (seeded shuffle, no augmentation)."""
    loss_fn = evaluate.loss_function(data.task)

    def score(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(data.train.batches(batch_size, shuffle_seed=0)):
            if i == batches:
                break
            loss_fn(model(x).float(), y).backward()

    return score


def _finetune(cfg, model: nn.Module, data, train_cfg, batch_size: int, step: int, checkpoints, config: dict) -> None:
    """Fine-tune the just-pruned model with the source run's training settings; best.pt/last.pt hold its result."""
    t = train_cfg.trainer
    optimizer, scheduler = schedulers.build_optimization(
        cfg.optimizer if cfg.get("optimizer") is not None else train_cfg.optimizer,
        cfg.scheduler if cfg.get("scheduler") is not None else train_cfg.scheduler,
        model.parameters(),
        train_size=len(data.train),
        batch_size=batch_size,
        epochs=cfg.finetune_epochs,
        lr_scale=cfg.lr_scale,
    )
    fit_config = dataclasses.replace(
        loop.FitConfig.from_trainer(t),
        epochs=cfg.finetune_epochs,
        batch_size=batch_size,
        nan_advice="Lower lr_scale or prune less per round (more steps)",
    )
    label_smoothing = t.label_smoothing if data.task == "classification" else 0.0
    state = loop.Loop(
        model,
        data,
        optimizer,
        scheduler,
        evaluate.loss_function(data.task, label_smoothing),
        fit_config,
        callbacks=[
            callbacks.Progress(f"fine-tuning round {step}"),
            _PrunedCheckpointer(checkpoints, config),
            callbacks.EpochLog(prefix=f"round {step} "),
        ],
    ).fit()
    if not state.best_epoch:
        raise DlrunError(f"round {step}: no fine-tuning epoch had finite validation metrics. {fit_config.nan_advice}")


class _PrunedCheckpointer(callbacks.Checkpointer):
    """train's checkpoints, holding the model as later commands load it (see _pruned_weights)."""

    def _snapshot(self, fit: loop.Loop) -> dict:
        return {**super()._snapshot(fit), **_pruned_weights(fit.model)}

    def on_epoch_end(self, fit: loop.Loop, result) -> None:
        super().on_epoch_end(fit, result)
        if result.improved:  # Checkpointer writes best.pt's weights from the evaluated module, masks and all
            best = self.folder / callbacks.BEST
            ckpt.save(best, {**ckpt.load(best), **_pruned_weights(fit.evaluated)})


def _pruned_weights(model: nn.Module) -> dict:
    """A pruned model's checkpoint entries: unstructured masks folded into plain weights, and the layer widths
    that rebuild the narrower architecture from the train config (sources.load_model)."""
    return {ckpt.MODEL: pruning.dense_state_dict(model), ckpt.STRUCTURE: pruning.structure(model)}


def _plain_checkpoint(config: dict) -> dict:
    return {ckpt.CONFIG: config, ckpt.VERSIONS: provenance.versions(), ckpt.GIT_COMMIT: provenance.git_commit()}


def _size(model: nn.Module, example) -> dict:
    """What structured pruning shrinks and unstructured pruning does not (it only adds zeros)."""
    model.eval()
    return {
        "params": profiling.count_params(model),
        "flops": profiling.count_flops(model, example),
        "weights_bytes": profiling.tensor_bytes(model),
        "zeros_fraction": pruning.zeros_fraction(model),
    }


def _facts(model: nn.Module, example, latency_repeats: int) -> dict:
    """Size and batch-1 latency, before and after pruning."""
    latency = profiling.latency_ms(model.eval(), example, repeats=latency_repeats)
    return {**_size(model, example), "latency_ms_p50": latency["p50"]}


def _round_row(step: int, model: nn.Module, data, example) -> dict:
    """A metrics.csv row: the model's size after round `step` (0: before pruning) and its val and test metrics."""
    row = {"round": step, **_size(model, example)}
    for split in ("val", "test"):
        row.update(_prefixed(split, evaluate.evaluate(model, getattr(data, split), data)))
    return row


def _split(row: dict, split: str) -> dict:
    """{"accuracy": ...} from a row's {"test_accuracy": ...}."""
    return {k.removeprefix(f"{split}_"): v for k, v in row.items() if k.startswith(f"{split}_")}


def _prefixed(split: str, metrics: dict) -> dict:
    """{"test_accuracy": ...} from {"accuracy": ...}, without the sample count and lists (confusion matrix)."""
    return {f"{split}_{k}": v for k, v in metrics.items() if k != "samples" and not isinstance(v, list)}


def _comparison(before: dict, after: dict, unpruned: dict, test: dict, task: str) -> dict:
    # Signed so that a positive number is quality lost, as in quantize's comparison.
    quality = (
        {"accuracy_drop": unpruned["accuracy"] - test["accuracy"]}
        if task == "classification"
        else {"mse_increase": test["mse"] - unpruned["mse"]}
    )
    return {
        **quality,
        "params_kept": after["params"] / before["params"],
        "flops_kept": after["flops"] / before["flops"],
        "size_ratio": after["weights_bytes"] / before["weights_bytes"],
        "latency_speedup": before["latency_ms_p50"] / after["latency_ms_p50"],
    }
