"""Start-up time of config-only commands (and proof that they never import torch), and the whole-process overhead
of the default `dlrun train` (process seconds minus the training seconds its summary.json reports) and of
`dlrun eval` of that run. Commands are interleaved: each repeat runs every command once.

    python -m benchmarks.startup [--quick]
Goals: `dlrun --help` <= 0.25 s, `dlrun ls` <= 0.35 s, torch not imported by either;
`dlrun train` process <= its training time + 2.5 s; `dlrun eval` <= 3 s. Each goal line says met / NOT met.

Measured causes of the train overhead (issue 13): the optimizer's first add_param_group imports torch._dynamo
(torch wraps it in torch._disable_dynamo, which imports dynamo on first call: ~1.5-1.8 s here), and the two
report plots (matplotlib import ~0.4-0.8 s, then ~0.45 s per figure drawn).
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


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlrun", *args], capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in out.stderr.splitlines())


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlrun", *argv], check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__).parse_args()
    repeats = 1 if args.quick else 5
    train_argv = ["train", "trainer.epochs=1"] if args.quick else ["train"]
    times: dict[str, list[float]] = {label: [] for label in (*CONFIG_ONLY, "train", "eval")}
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
    spent = median(times["eval"])
    print(
        f"  {'dlrun eval run=<that run>':30s} {spent:6.3f} s   (goal <= {EVAL_GOAL} s: {verdict(spent <= EVAL_GOAL)})"
    )


if __name__ == "__main__":
    main()
