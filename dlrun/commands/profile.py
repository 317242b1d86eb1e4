"""`dlrun profile`: which operators of an ExecuTorch program take the time, and which of them left XNNPACK.

    dlrun profile                                   # the latest export run's .pte
    dlrun profile artifact=outputs/export/2026-11-22_10-05-00/model.pte batch=32
    dlrun profile run=outputs/export/2026-11-22_10-05-00 iterations=200

The program runs `warmup` + `iterations` times on test samples with ETDump enabled, in a child process (a native
crash fails the command, never kills it). ExecuTorch's Inspector reads the dump with the etrecord.bin written by
`dlrun export format=pte`; the table shows the slowest operators (time per run, all calls of that operator
together, p50/p90 in µs, share of a whole run). The run dir keeps events.csv (every runtime event and its
per-run times), operators.csv and etdump.etdp (open it in ExecuTorch's own devtools).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlrun.core import contract, files, rundir, sources, ui
from dlrun.core.errors import DlrunError, UsageError
from dlrun.deploy import profile, runtime

log = logging.getLogger("dlrun")


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    for key, least in (("batch", 1), ("iterations", 1), ("warmup", 0), ("top", 1)):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UsageError(f"{key} must be an integer >= {least}, got {value!r}")
    pte = _program(cfg)
    source = sources.resolve(artifact=str(pte), trusted=cfg.trust_targets)
    if source.max_batch is not None and cfg.batch > source.max_batch:
        raise UsageError(f"batch={cfg.batch} exceeds the {source.max_batch} that {source.label} was exported for")
    etrecord = profile.etrecord_beside(pte)
    if etrecord is None:
        log.warning(f"no etrecord.bin beside {source.label}: delegate calls are not mapped to their graph operators")
    x = sources.load_data(source).example(batch=cfg.batch)
    run_dir = rundir.current()
    log.info(f"profile {source.label}: batch {len(x)}, {cfg.warmup} warm-up + {cfg.iterations} runs with ETDump")

    try:
        operators, events, facts = profile.profile(
            pte, x, run_dir, etrecord=etrecord, warmup=cfg.warmup, iterations=cfg.iterations
        )
    except runtime.ArtifactRunError as exc:
        raise DlrunError(str(exc)) from None
    rows = [dataclasses.asdict(o) for o in operators]
    files.write_csv(run_dir / "events.csv", profile.event_rows(events))
    files.write_csv(run_dir / "operators.csv", rows)
    contract.write_summary(
        run_dir,
        contract.Summary(
            "profile",
            OmegaConf.to_container(cfg, resolve=True),
            wall_s=time.perf_counter() - started,
            record=contract.ProfileRecord(
                profiled=source.label,
                batch=len(x),
                iterations=cfg.iterations,
                threads=facts["threads"],
                operators=rows,
            ),
            metrics={"run_us_p50": facts["run_us_p50"]},
            lineage=source.lineage,
        ),
    )
    shown = [
        {
            "operator": o.operator,
            "runs in": o.delegate,
            "calls": o.calls,
            "p50_us": o.p50_us,
            "p90_us": o.p90_us,
            "share": f"{o.share:.1%}",
        }
        for o in operators[: cfg.top]
    ]
    title = (
        f"{source.label}: slowest operators per run (batch {len(x)}, {cfg.iterations} runs, "
        f"{facts['threads']} threads); all events in {rundir.relative(run_dir / 'events.csv')}"
    )
    ui.rows_table(title, shown)


def _program(cfg: DictConfig) -> Path:
    """The .pte: artifact=, the one in run=, or the one of the latest export run that wrote a .pte."""
    if cfg.artifact and cfg.run:
        raise UsageError("give only one of run=, artifact=")
    if cfg.artifact:
        path = Path(cfg.artifact)
        if path.suffix != ".pte":
            raise UsageError(f"artifact {path} must be an ExecuTorch .pte file")
        return path
    candidates = [rundir.run_dir_arg(cfg.run)] if cfg.run else reversed(rundir.completed_runs("export"))
    for run_dir in candidates:
        ptes = sorted(run_dir.glob("*.pte"))
        if ptes:
            return ptes[0]
    if cfg.run:
        raise UsageError(f"{cfg.run} holds no .pte; profile an export run of format=pte")
    raise UsageError("no completed export run with a .pte; run `dlrun export format=pte` first")
