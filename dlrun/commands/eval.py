"""`dlrun eval`: test metrics, size, FLOPs and batch-1 latency of a checkpoint, quantized program or artifact.

    dlrun eval                       # the latest train run's best checkpoint
    dlrun eval run=outputs/quantize/2026-11-22_10-00-00
    dlrun eval artifact=outputs/export/2026-11-22_10-05-00/model.pte

Two sizes, because a file size alone misleads: `weights_bytes` (the model's tensors: fp32 and int8
compare like with like) and `file_bytes` (the evaluated file, which for a checkpoint also holds the
optimizer's state and for a program its graph). A runtime artifact has only its file size.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.core import contract, profiling, rundir, sources, ui
from dlrun.training import env, evaluate

log = logging.getLogger("dlrun")


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    source = sources.resolve(
        run=cfg.run, ckpt=cfg.ckpt, artifact=cfg.artifact, default=("train",), trusted=cfg.trust_targets
    )
    # Quantized programs and runtime artifacts run on the CPU they were made for.
    device = env.resolve_device(cfg.device) if source.kind == "checkpoint" else env.resolve_device("cpu")
    data = sources.load_data(source, device)
    predict = sources.load_predictor(source, device)
    log.info(f"eval {source.kind} {source.label} on {len(data.test)} test samples ({device})")

    batch_size = min(cfg.batch_size, source.max_batch or cfg.batch_size)
    test = evaluate.evaluate(predict, data.test, data, batch_size=batch_size, confusion=True)
    example = data.example()
    record = contract.EvalRecord(
        kind=source.kind,
        evaluated=source.label,
        file_bytes=source.path.stat().st_size,
        weights_bytes=profiling.tensor_bytes(predict) if isinstance(predict, nn.Module) else None,
    )
    extra = {"latency_ms": profiling.latency_ms(predict, example, repeats=cfg.latency_repeats)}
    if source.kind == "checkpoint":
        extra["params"] = profiling.count_params(predict)
        extra["flops"] = profiling.count_flops(predict, example)
    contract.write_summary(
        rundir.current(),
        contract.Summary(
            "eval",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=record,
            metrics={"test": test},
            lineage=source.lineage,
            extra=extra,
        ),
    )
    shown = {
        "weights_bytes": record.weights_bytes,
        "file_bytes": record.file_bytes,
        "latency_ms_p50": extra["latency_ms"]["p50"],
        "params": extra.get("params"),
        "flops": extra.get("flops"),
    }
    ui.metrics_table(
        f"eval of the {source.kind} (test split)",
        {"test": {**test, **{k: v for k, v in shown.items() if v is not None}}},
    )
