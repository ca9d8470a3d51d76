"""Data-parallel training through torchrun: process-group setup, rank helpers and a launcher.

A training job becomes distributed in one of two ways:

- it was started by ``torchrun`` (``python -m torch.distributed.run``), which sets ``WORLD_SIZE``,
  ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL on GPU,
  gloo on CPU), and :func:`agentprune.train.train` wraps the model in DDP;
- a Snakemake job that was given more than one GPU (``resources: gpu: N`` in the profile) calls
  :func:`launch`, which re-runs the same pipeline step under ``torchrun --nproc_per_node N`` through
  this module's ``__main__`` (``python -m agentprune.distributed <step> <kwargs.json>``).

Only rank 0 writes outputs, checkpoints and logs; every rank ends with the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the functions that use it: a job that never trains
    import torch  # (an lm finetune, which only links files) does not pay for it

# Set in the environment of the workers started by launch(): a step must not launch again.
LAUNCHED_ENV = "AGENTPRUNE_TORCHRUN"


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (1 process when unset)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_from_env() -> DistInfo:
    """Join the process group described by torchrun's environment, once per process.

    Returns:
        This process's place; a one-process job initialises nothing.
    """
    import torch
    import torch.distributed as dist

    info = env_info()
    if not info.enabled or not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            # Each rank owns one GPU; NCCL needs the current device set before the first
            # collective.
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return info


def device(info: DistInfo) -> torch.device:
    """The device of this rank: its own GPU, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a one-process job)."""
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: float, info: DistInfo, dev: torch.device) -> float:
    """The mean of ``value`` over all ranks, so that every rank reports the same number."""
    import torch
    import torch.distributed as dist

    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a one-process job)."""
    import torch.distributed as dist

    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def requested_processes(gpus: int | str | None) -> int:
    """How many training processes a job granted ``gpus`` GPUs runs: one per usable GPU, >= 1.

    Snakemake hands resources over as ints (or strings from the command line). The count is capped
    by the GPUs this process can see (``CUDA_VISIBLE_DEVICES``, set by SLURM), so a CPU-only node
    never starts DDP by accident.
    """
    try:
        n = int(gpus or 0)
    except (TypeError, ValueError):
        n = 0
    if n <= 1:
        return 1  # no GPU count to check: a job that never trains need not import torch
    import torch

    return max(1, min(n, torch.cuda.device_count()))


def launch(entry: str, kwargs: dict[str, Any], nproc: int, cpu: bool = False) -> None:
    """Run the function ``entry`` (``module:function``) with ``kwargs`` under torchrun with
    ``nproc`` processes.

    The workers' output is copied line by line to this process's ``sys.stdout`` (the rule's log
    when called inside :func:`agentprune.steps.logged`).

    Args:
        entry: the worker function, e.g. ``agentprune.steps:finetune_worker``.
        kwargs: its JSON-serialisable keyword arguments.
        nproc: processes on this node.
        cpu: force CPU workers (gloo), e.g. for tests on a machine without GPUs.

    Raises:
        RuntimeError: if any worker fails.
    """
    with tempfile.TemporaryDirectory(prefix="agentprune-ddp-") as tmp:
        args = Path(tmp) / "kwargs.json"
        args.write_text(json.dumps(kwargs, default=str))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "agentprune.distributed",
            entry,
            str(args),
        ]
        env = {**os.environ, LAUNCHED_ENV: "1"}
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        # The package may be importable only through sys.path (tests, source checkouts).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        print(f"launching {entry} on {nproc} processes: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
        sys.stdout.flush()
        if proc.wait() != 0:
            raise RuntimeError(f"torchrun {entry} failed with exit status {proc.returncode}")


def _main(argv: list[str]) -> int:
    """Worker entry point of :func:`launch`: ``<module:function> <kwargs.json>``.

    The function is found by name at run time, so this module imports no step (no import cycle
    through the launcher)."""
    import importlib

    import torch.distributed as dist

    entry, args = argv
    module, _, function = entry.partition(":")
    kwargs = json.loads(Path(args).read_text())
    info = init_from_env()
    try:
        getattr(importlib.import_module(module), function)(**kwargs)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
