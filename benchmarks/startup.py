"""Start-up time of config-only commands, and proof that they never import torch.

    python -m benchmarks.startup [--quick]
Goal: `dlrun --help` and `dlrun ls` <= 0.35 s, torch not imported.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks._common import median, parser

COMMANDS = {"dlrun --help": ["--help"], "dlrun ls": ["ls"], "dlrun train --cfg job": ["train", "--cfg", "job"]}


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlrun", *args], capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in out.stderr.splitlines())


def main() -> None:
    args = parser(__doc__).parse_args()
    repeats = 2 if args.quick else 10
    print(f"startup  (median of {repeats} runs, {sys.executable} -m dlrun ...)")
    for label, argv in COMMANDS.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dlrun", *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        goal = "  (goal <= 0.35 s)" if argv[0] in ("--help", "ls") else ""
        print(f"  {label:24s} {median(times):6.3f} s   imports torch: {imports_torch(argv)}{goal}")


if __name__ == "__main__":
    main()
