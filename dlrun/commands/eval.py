"""`dlrun eval`: test metrics, size, FLOPs and batch-1 latency of a checkpoint, quantized program or artifact.

    dlrun eval                       # the latest train run's best checkpoint
    dlrun eval run=outputs/quantize/2026-11-22_10-00-00
    dlrun eval artifact=outputs/export/2026-11-22_10-05-00/model.pte
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig, OmegaConf

from dlrun.core import contract, profiling, rundir, sources, ui
from dlrun.training import env, evaluate

log = logging.getLogger("dlrun")


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    source = sources.resolve(run=cfg.run, ckpt=cfg.ckpt, artifact=cfg.artifact, default=("train",),
                             trusted=cfg.trust_targets)
    # Quantized programs and runtime artifacts run on the CPU they were made for.
    device = env.resolve_device(cfg.device) if source.kind == "checkpoint" else env.resolve_device("cpu")
    data = sources.load_data(source, device)
    predict = sources.load_predictor(source, device)
    log.info(f"eval {source.kind} {source.label} on {len(data.test)} test samples ({device})")

    batch_size = min(cfg.batch_size, source.max_batch or cfg.batch_size)
    test = evaluate.evaluate(predict, data.test, data, batch_size=batch_size, confusion=True)
    example = data.example()
    fields = {
        "size_bytes": source.path.stat().st_size,
        "latency_ms": profiling.latency_ms(predict, example, repeats=cfg.latency_repeats),
    }
    if source.kind == "checkpoint":
        fields["params"] = profiling.count_params(predict)
        fields["flops"] = profiling.count_flops(predict, example)
    run_dir = rundir.current()
    contract.write_summary(
        run_dir, "eval", OmegaConf.to_container(cfg, resolve=True),
        metrics={"test": test}, kind=source.kind, evaluated=source.label,
        source_run=rundir.relative(source.run_dir) if source.run_dir else None,
        train_run=rundir.relative(source.train_run) if source.train_run else None,
        source_config=source.config, wall_s=time.perf_counter() - started, **fields,
    )
    extra = {"size_bytes": fields["size_bytes"], "latency_ms_p50": fields["latency_ms"]["p50"],
             **{k: fields[k] for k in ("params", "flops") if k in fields}}
    ui.metrics_table(f"eval {source.label}", {"test": {**test, **extra}})
