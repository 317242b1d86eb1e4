"""Start-up time of config-only commands (and proof that they never import torch), and the whole-process overhead
of the default `dlrun train` (process seconds minus the training seconds its summary.json reports) and of
`dlrun eval` of that run. Commands are interleaved: each repeat runs every command once.

    python -m benchmarks.startup [--quick]
Goals: `dlrun --help` <= 0.25 s, `dlrun ls` <= 0.35 s, torch not imported by either;
`dlrun train` process <= its training time + 2.5 s; `dlrun eval` <= 3 s. Each goal line says met / NOT met.

The train line also times a process that only imports torch and torch._dynamo, in the same repeats: the floor
every torch.optim training pays (torch.optim imports dynamo on each step), so that what is dlrun's own reads the
same on a fast or a slow machine. The rest is Hydra (import and composition, ~0.5 s), the two report plots and
matplotlib (~0.4 s), Python and Typer (~0.2 s), and per-epoch validation and checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import median, parser

CONFIG_ONLY = {"dlrun --help": ["--help"], "dlrun ls": ["ls"], "dlrun train --cfg job": ["train", "--cfg", "job"]}
GOALS = {"dlrun --help": 0.25, "dlrun ls": 0.35}
TRAIN_OVERHEAD_GOAL = 2.5
EVAL_GOAL = 3.0
TORCH_FLOOR = "import os, torch, torch._dynamo; os._exit(0)"  # exits as dlrun does: no interpreter teardown


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlrun", *args], capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in out.stderr.splitlines())


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def timed(argv: list[str], cwd: Path) -> float:
    """Seconds of one `python -m dlrun <argv>` process (or `python <argv>` when argv starts with "-c")."""
    start = time.perf_counter()
    command = argv if argv[0] == "-c" else ["-m", "dlrun", *argv]
    subprocess.run([sys.executable, *command], check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__).parse_args()
    repeats = 1 if args.quick else 5
    train_argv = ["train", "trainer.epochs=1"] if args.quick else ["train"]
    times: dict[str, list[float]] = {label: [] for label in (*CONFIG_ONLY, "train", "eval", "torch floor")}
    training: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dlrun-startup-") as tmp:
        cwd = Path(tmp)
        for _ in range(repeats):
            for label, argv in CONFIG_ONLY.items():
                times[label].append(timed(argv, cwd))
            before = set(cwd.glob("outputs/train/*/summary.json"))
            times["train"].append(timed(train_argv, cwd))
            (summary,) = set(cwd.glob("outputs/train/*/summary.json")) - before
            training.append(json.loads(summary.read_text())["train_seconds"])
            times["eval"].append(timed(["eval", f"run={summary.parent}"], cwd))
            times["torch floor"].append(timed(["-c", TORCH_FLOOR], cwd))

    print(f"startup  (median of {repeats} interleaved runs, {sys.executable} -m dlrun ...)")
    for label, argv in CONFIG_ONLY.items():
        spent = median(times[label])
        goal = f"  (goal <= {GOALS[label]:.2f} s: {verdict(spent <= GOALS[label])})" if label in GOALS else ""
        print(f"  {label:30s} {spent:6.3f} s   imports torch: {imports_torch(argv)}{goal}")
    process, trained = median(times["train"]), median(training)
    overhead, label = process - trained, "dlrun " + " ".join(train_argv)
    print(
        f"  {label:30s} {process:6.3f} s   training {trained:.3f} s, overhead {overhead:.3f} s"
        f"  (goal: overhead <= {TRAIN_OVERHEAD_GOAL} s: {verdict(overhead <= TRAIN_OVERHEAD_GOAL)})"
    )
    floor = median(times["torch floor"])
    print(
        f"  {'python -c ' + repr(TORCH_FLOOR)}\n  {'':30s} {floor:6.3f} s   "
        f"train overhead beyond it (dlrun's own): {overhead - floor:.3f} s"
    )
    spent = median(times["eval"])
    print(
        f"  {'dlrun eval run=<that run>':30s} {spent:6.3f} s   (goal <= {EVAL_GOAL} s: {verdict(spent <= EVAL_GOAL)})"
    )


if __name__ == "__main__":
    main()
