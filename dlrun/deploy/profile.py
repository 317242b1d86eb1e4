"""Per-operator time of an ExecuTorch program: run it with ETDump enabled (in a child process), read the dump with
ExecuTorch's Inspector and the ETRecord written at export, and sum the events per operator.

    record_etdump(pte, x, etdump, warmup=.., iterations=..)   # child: the runtime's profile of every run
    operators(etdump, etrecord, warmup=..)                    # parent: one row per operator, slowest first

Each event is timed once per run; the first `warmup` runs are dropped. Events inside a delegate (XNNPACK's
"Convolution (NHWC, F32) IGEMM #3") are the delegate's own operators; the `DELEGATE_CALL` around them also holds
the delegate's overhead (its own row), and `Method::execute` is the whole run, the total the shares refer to.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrun.deploy import runtime

TOTAL_EVENT = "Method::execute"
DELEGATE_EVENT = "DELEGATE_CALL"
OPERATOR_EVENT = "OPERATOR_CALL"  # a portable (non-delegated) kernel; its op_types name the operator
_NOT_OPERATORS = {"Method::init", "Program::load_method", TOTAL_EVENT}
BACKENDS = {"XnnpackBackend": "XNNPACK"}


@dataclass
class OperatorRow:
    operator: str
    delegate: str  # XNNPACK, another backend, or "portable" (ExecuTorch's own kernels), "runtime" for overheads
    calls: int  # per run
    p50_us: float  # per run, all calls together
    p90_us: float
    share: float  # of the p50 of a whole run


def record_etdump(pte: str, inputs: str, etdump: str, warmup: int, iterations: int) -> dict:
    """The child's side (dlrun.deploy.verify_child --job etdump): run the program warmup + iterations times on the
    batch saved at `inputs` and write the ETDump. Returns the runs done and the threadpool's size."""
    from executorch.extension.pybindings import portable_lib

    runtime.executorch_runtime()  # starts the threadpool with its start-up noise filtered
    x = torch.load(inputs, weights_only=True)
    program = portable_lib._load_for_executorch(pte, enable_etdump=True, debug_buffer_size=0)
    for _ in range(warmup + iterations):
        program.forward([x])
    program.write_etdump_result_to_file(etdump)
    return {"runs": warmup + iterations, "threads": portable_lib._threadpool_get_thread_count()}


def profile(
    pte: Path, x: torch.Tensor, out_dir: Path, *, etrecord: Path | None, warmup: int, iterations: int
) -> tuple[list[OperatorRow], list[dict], dict]:
    """(operator rows slowest first, every event with its per-run times in µs, facts of the run) of the program."""
    inputs, etdump = out_dir / "input.pt", out_dir / "etdump.etdp"
    torch.save(x.contiguous(), inputs)
    facts = runtime.run_job(
        "etdump",
        {"pte": str(pte), "inputs": str(inputs), "etdump": str(etdump), "warmup": warmup, "iterations": iterations},
    )
    events = read_events(etdump, etrecord, warmup=warmup)
    whole_runs = [e["times_us"] for e in events if e["name"] == TOTAL_EVENT]
    facts["run_us_p50"] = _median(whole_runs[0]) if whole_runs else None
    return operators(events), events, facts


def read_events(etdump: Path, etrecord: Path | None, *, warmup: int) -> list[dict]:
    """The Execute events of the dump as {name, delegate, op_types, times_us (one per measured run)}."""
    from executorch.devtools import Inspector

    with warnings.catch_warnings():  # the Inspector warns about every kwarg and buffer it does not parse
        warnings.simplefilter("ignore")
        inspector = Inspector(etdump_path=str(etdump), etrecord=str(etrecord) if etrecord else None)
    events = []
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None or event.name in ("Method::init", "Program::load_method"):
                continue
            backend = event.delegate_backend_name
            events.append(
                {
                    "name": event.name,
                    "delegated": bool(event.is_delegated_op),
                    "backend": BACKENDS.get(backend, backend) if backend else None,
                    "op_types": list(event.op_types or []),
                    "times_us": [t * 1000.0 for t in event.perf_data.raw[warmup:]],  # Inspector: ms
                }
            )
    return normalise_delegate_units(events)


def normalise_delegate_units(events: list[dict]) -> list[dict]:
    """Put delegate-reported events in the runtime's unit.

    Some ExecuTorch versions scale delegate events differently from the runtime's own (nanoseconds read as
    milliseconds): their sum per run must stay below the DELEGATE_CALLs holding them, so a sum 10^3 or 10^6
    times larger is scaled down by that factor."""
    inside = sum(_median(e["times_us"]) for e in events if e["delegated"])
    around = sum(_median(e["times_us"]) for e in events if e["name"] == DELEGATE_EVENT)
    if not inside or not around:
        return events
    factor = next((f for f in (1.0, 1e-3, 1e-6) if inside * f <= 1.5 * around), 1e-6)
    for event in events:
        if event["delegated"]:
            event["times_us"] = [t * factor for t in event["times_us"]]
    return events


def operators(events: list[dict]) -> list[OperatorRow]:
    """Sum the events per operator and run: XNNPACK operators by kind ("#3" dropped), portable kernels by op,
    each delegate's overhead (DELEGATE_CALL minus the operators inside) and the runtime's (the rest of a run)."""
    runs = min((len(e["times_us"]) for e in events), default=0)
    if runs == 0:
        return []
    per_run: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * runs)
    calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(key: tuple[str, str], times: list[float], sign: float = 1.0, count: int = 1) -> None:
        sums = per_run[key]
        for i in range(runs):
            sums[i] += sign * times[i]
        calls[key] += count

    total = [0.0] * runs
    for event in events:
        times = event["times_us"]
        if event["name"] == TOTAL_EVENT:
            total = times[:runs]
            add(("(runtime overhead)", "runtime"), times, count=0)
        elif event["delegated"]:
            backend = event["backend"] or "delegate"
            add((re.sub(r" #\d+$", "", event["name"]), backend), times)
            add((f"({backend} overhead)", backend), times, sign=-1.0, count=0)
        elif event["name"] == DELEGATE_EVENT:
            backend = event["backend"] or "delegate"
            add((f"({backend} overhead)", backend), times, count=0)
            add(("(runtime overhead)", "runtime"), times, sign=-1.0, count=0)
        elif event["name"] not in _NOT_OPERATORS:
            name = event["op_types"][0] if event["op_types"] else "(unnamed portable op)"
            add((name, "portable"), times)
            add(("(runtime overhead)", "runtime"), times, sign=-1.0, count=0)
    whole = _median(total)
    rows = [
        OperatorRow(
            operator=name,
            delegate=delegate,
            calls=calls[(name, delegate)],
            p50_us=round(max(0.0, _median(sums)), 3),
            p90_us=round(max(0.0, _percentile(sums, 90)), 3),
            share=round(max(0.0, _median(sums)) / whole, 4) if whole > 0 else 0.0,
        )
        for (name, delegate), sums in per_run.items()
    ]
    return sorted(rows, key=lambda r: r.p50_us, reverse=True)


def event_rows(events: list[dict]) -> list[dict]:
    """One CSV row per event: its name, where it ran, the operators it stands for and its per-run times."""
    return [
        {
            "event": e["name"],
            "delegated": e["delegated"],
            "backend": e["backend"] or "",
            "op_types": ";".join(e["op_types"]),
            "runs": len(e["times_us"]),
            "p50_us": round(_median(e["times_us"]), 3),
            "p90_us": round(_percentile(e["times_us"], 90), 3),
            "min_us": round(min(e["times_us"], default=math.nan), 3),
            "times_us": " ".join(f"{t:.3f}" for t in e["times_us"]),
        }
        for e in events
    ]


def _median(values: list[float]) -> float:
    return _percentile(values, 50)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def etrecord_beside(pte: str | os.PathLike) -> Path | None:
    """The ETRecord `dlrun export` writes beside a .pte, if there is one."""
    path = Path(pte).with_name("etrecord.bin")
    return path if path.is_file() else None
