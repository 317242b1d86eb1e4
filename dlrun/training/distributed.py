"""Data-parallel training over N processes with torch.distributed and DistributedDataParallel, in one run directory.

    dlrun train trainer.devices=2                  # dlrun starts the processes (torch's elastic launcher)
    torchrun --nproc_per_node=2 -m dlrun train     # or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR/PORT

With trainer.devices=N the dlrun process reserves the run directory, then launches N workers that all run it;
under an outside launcher (torchrun, srun) rank 0 reserves it and broadcasts its path. Each rank trains its own
shard of the epoch's seeded permutation (trainer.batch_size is per rank); DDP all-reduces the gradients;
validation and test metrics are summed over the ranks' shards, so every rank sees the full-split numbers and takes
the same decisions (best epoch, early stopping). Only rank 0 writes the run's files; rank k > 0 logs to rank<k>.log.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dlrun.core.errors import FAILURE, USAGE, DlrunError, UsageError

INTERRUPTED = 130


def world_size() -> int:
    """Processes in this job: from the launcher's environment (WORLD_SIZE), 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_worker() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes the run's files (always, outside a distributed job)."""
    return rank() == 0


# --- the dlrun process that starts the workers (trainer.devices=N) ---------------------------------------------


def check_devices(devices: int, device: str) -> None:
    """More processes than the machine has devices for is one line, before anything starts."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        available, what = torch.cuda.device_count(), "CUDA GPUs (one per process)"
    else:
        available, what = os.cpu_count() or 1, "CPU cores"
    if devices > available:
        raise UsageError(f"trainer.devices={devices} but this machine has {available} {what}")


def launch(command: str, args: list[str], devices: int, run_dir: Path) -> int:
    """Run `dlrun <args>` (the command and its overrides) in `devices` worker processes and wait; returns the
    exit code for this process.

    A worker's own errors are printed by that worker (rank 0 on the terminal, others in rank<k>.log); a worker that
    dies (killed, out of memory) stops the others, and this process says which one in one line.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the agent's chatter ("Received 2 death signal", ...)
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Every worker would use all cores otherwise and the processes would fight over them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=devices,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port on this machine, as torchrun --standalone
        max_restarts=0,  # a failed run is resumed by the user (resume=), not restarted from scratch behind them
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "dlrun", *args)
    except ChildFailedError as failed:
        return _failure_code(failed, command, run_dir)
    except SignalException:  # Ctrl-C: the workers got it too and said how to resume
        return INTERRUPTED
    return 0


def _failure_code(failed, command: str, run_dir: Path) -> int:
    codes = {global_rank: failure.exitcode for global_rank, failure in failed.failures.items()}
    if codes.get(0) in (USAGE, FAILURE, INTERRUPTED):  # rank 0 printed its one line already
        return codes[0]
    import signal

    from dlrun.core.rundir import relative

    first, failure = failed.get_first_failure()  # the others were stopped because of it
    code = failure.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    log = "" if first == 0 else f" (its log: {relative(run_dir)}/rank{first}.log)"
    print(
        f"error: rank {first} {how}{log}; the other ranks were stopped. checkpoints/last.pt holds the last "
        f"completed epoch: resume with dlrun {command} resume={relative(run_dir)}",
        file=sys.stderr,
    )
    return FAILURE


# --- inside a worker ---------------------------------------------------------------------------------------------


def join(timeout_s: float, use_cuda: bool) -> None:
    """Join the job's process group (gloo on CPU, nccl on CUDA); an unreachable MASTER_ADDR fails in one line."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError) as exc:  # DistStoreError is a RuntimeError
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"rank {rank()} could not join the process group at {where} within {timeout_s:g}s "
            f"(trainer.dist_timeout_s): {reason}"
        ) from None


def shared_run_dir(reserve: Callable[[], Path]) -> Path:
    """Under an outside launcher: rank 0 reserves the run directory and every rank gets its path."""
    import torch.distributed as dist

    path = [str(reserve()) if is_main() else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def worker_overrides(run_dir: Path) -> list[str]:
    """Hydra overrides for rank k > 0: no .hydra/ snapshot (rank 0 writes it), its log in rank<k>.log only."""
    if is_main():
        return []
    from dlrun.config.compose import quote

    return [
        "hydra.output_subdir=null",
        f"hydra.job_logging.handlers.file.filename={quote(str(run_dir / f'rank{rank()}.log'))}",
        "hydra.job_logging.loggers.dlrun.handlers=[file]",
    ]


def send_output_to_log(run_dir: Path) -> None:
    """Rank k > 0 writes nothing on the terminal (its errors and tracebacks too): all of it goes to rank<k>.log."""
    if is_main():
        return
    log = os.open(run_dir / f"rank{rank()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def device_for(device):
    """The device of this rank: its own GPU (LOCAL_RANK) on CUDA."""
    import torch

    if device.type == "cuda" and is_worker():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(network, device):
    """The network DDP trains (gradients all-reduced), sharing the model's weights."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- sharded splits and reduced metrics --------------------------------------------------------------------------


@dataclass
class Shard:
    """This rank's part of a split. Training (shuffled): a slice of the epoch's seeded permutation, padded so that
    every rank runs the same number of steps (DDP's all-reduce needs it). Evaluation: each sample on exactly one
    rank, the metrics summed over ranks by `evaluate`."""

    split: object
    rank: int
    world: int

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.world)

    def batches(self, batch_size: int, *, shuffle_seed=None, augment=None) -> Iterator:
        return self.split.batches(batch_size, shuffle_seed=shuffle_seed, augment=augment, shard=(self.rank, self.world))


def sharded(data):
    """`data` with each split replaced by this rank's Shard (unchanged outside a distributed job)."""
    import dataclasses

    if not is_worker():
        return data
    r, w = rank(), world_size()
    return dataclasses.replace(
        data, train=Shard(data.train, r, w), val=Shard(data.val, r, w), test=Shard(data.test, r, w)
    )


def all_reduce_totals(totals: dict, maxima: tuple[str, ...] = ()) -> dict:
    """Sum (or max, for `maxima`) each float/int total over the ranks; every rank gets the same result."""
    import torch
    import torch.distributed as dist

    keys = sorted(totals)
    summed = torch.tensor([float(totals[k]) if k not in maxima else 0.0 for k in keys], dtype=torch.float64)
    largest = torch.tensor([float(totals[k]) if k in maxima else -math.inf for k in keys], dtype=torch.float64)
    dist.all_reduce(summed)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return {k: (largest[i].item() if k in maxima else summed[i].item()) for i, k in enumerate(keys)}


def all_reduce_tensor(tensor):
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor


def all_gather_cat(tensor):
    """The ranks' tensors concatenated in rank order (their first dimensions may differ)."""
    import torch
    import torch.distributed as dist

    parts: list = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def require_one_process(what: str) -> None:
    if is_worker():
        raise DlrunError(f"{what} runs in one process; drop trainer.devices / the distributed launcher")


def for_this_rank(*callbacks) -> list:
    """The callbacks of this rank: rank k > 0 of a DDP job drops those that write the run's files or the terminal
    (`rank_zero_only`), keeping those that decide (early stopping) so that every rank stops together."""
    return [c for c in callbacks if is_main() or not getattr(c, "rank_zero_only", False)]
