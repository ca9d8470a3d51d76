"""Snakemake ``benchmark:`` files of the per-run jobs, gathered into one table.

Each heavy rule writes
``results/benchmarks/{dataset}/{model}/{method}/r{ratio}/s{seed}/{step}.tsv``: one row with the
job's wall seconds, peak memory (``max_rss``, MB) and CPU seconds, measured by Snakemake around the
whole job (interpreter start, imports and I/O included). That is what a cluster job must be sized
for, so it complements the in-process step times of ``metrics.json``.

A job that ran several seeds one after another (``batch_seeds``) writes its file under
``s{seed}+{seed}+...`` instead: its row has ``seed`` empty and ``runs`` the number of seeds, so a
run's share is ``seconds / runs``.

A job handed to the warm worker (:mod:`agentprune.worker`) ran in a forked child that Snakemake
does not see: its file measured the waiting client. Given the job's log, whose last line then
holds the child's figures, a record adds the child's CPU seconds and takes its peak memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from agentprune import worker

# Per-run steps, in pipeline order.
STEPS = ("plan", "prune", "finetune", "evaluate")
COLUMNS = [
    "dataset",
    "model",
    "method",
    "ratio",
    "seed",
    "runs",
    "step",
    "seconds",
    "max_rss_mb",
    "cpu_seconds",
]


def _ratio(spelling: str) -> float:
    """A ``{ratio}`` wildcard as a number: ``0.5``, or an N:M sparsity ``2of4`` as ``n / m``."""
    n, sep, m = spelling.partition("of")
    return int(n) / int(m) if sep else float(spelling)


def _job_seeds(folder: str) -> list[str]:
    """The seeds a benchmark folder names: ``s3`` -> ``["3"]``, ``s0+1+2`` -> ``["0", "1", "2"]``
    (``[]`` for a name without the ``s``)."""
    return folder[1:].split("+") if folder.startswith("s") else []


def _identity(path: Path) -> dict[str, object]:
    """Parse ``.../{dataset}/{model}/{method}/r{ratio}/s{seed}/{step}.tsv`` (``s{seed}+{seed}...``
    for a job of several seeds)."""
    parts = path.parts[-6:]
    seeds = _job_seeds(parts[4]) if len(parts) == 6 else []
    seeds_ok = bool(seeds) and all(seed.isdigit() for seed in seeds)
    if len(parts) < 6 or not parts[3].startswith("r") or not seeds_ok:
        raise ValueError(
            f"benchmark file {path} is not .../dataset/model/method/r<ratio>/s<seed>/<step>.tsv"
        )
    dataset, model, method, ratio, _, name = parts
    step = Path(name).stem
    if step not in STEPS:
        raise ValueError(f"benchmark file {path}: step {step!r} is not one of {', '.join(STEPS)}")
    return {
        "dataset": dataset,
        "model": model,
        "method": method,
        "ratio": _ratio(ratio[1:]),
        "seed": int(seeds[0]) if len(seeds) == 1 else None,
        "runs": len(seeds),
        "step": step,
    }


def read_benchmark(path: str | Path, log: str | Path | None = None) -> dict[str, object]:
    """One benchmark file as a record of :data:`COLUMNS`.

    Args:
        path: A Snakemake benchmark TSV (columns ``s``, ``max_rss``, ``cpu_time``, ...).
        log: The job's log: where the warm worker ran the job, its child's CPU seconds and peak
            memory are read from it (see the module docstring).

    Raises:
        ValueError: The path does not follow the layout, or the file lacks a column.
    """
    path = Path(path)
    record = _identity(path)
    table = pd.read_csv(path, sep="\t")
    missing = {"s", "max_rss", "cpu_time"} - set(table.columns)
    if table.empty or missing:
        raise ValueError(f"benchmark file {path} lacks {sorted(missing) or 'a data row'}")
    # With --benchmark-repeats a file has several rows; the mean is the job's typical cost.
    values = table[["s", "max_rss", "cpu_time"]].apply(pd.to_numeric, errors="coerce").mean()
    record.update(
        seconds=float(values["s"]),
        max_rss_mb=float(values["max_rss"]),
        cpu_seconds=float(values["cpu_time"]),
    )
    child = worker.logged_usage(log) if log else None
    if child:
        record["cpu_seconds"] += child["user"] + child["system"]
        # Snakemake's max_rss is bytes / 1024**2 (MiB, labelled MB), the unit of the log line.
        record["max_rss_mb"] = max(record["max_rss_mb"], child["rss"])
    return record


def run_seconds(cell: str | Path, seed: int | str, step: str) -> float | None:
    """One run's share of wall seconds in ``step``: its own job's, or the job's that ran it with
    other seeds (``s0+1+2``) divided by their number. None when no benchmark file has it.

    Args:
        cell: ``results/benchmarks/{dataset}/{model}/{method}/r{ratio}``.
        seed: The run's seed.
        step: One of :data:`STEPS`.
    """
    for path in sorted(Path(cell).glob(f"s*/{step}.tsv")):
        if str(seed) in _job_seeds(path.parent.name):
            record = read_benchmark(path)
            return float(record["seconds"]) / int(record["runs"])
    return None


def collect(paths: Iterable[str | Path], logs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """All benchmark files as one frame (columns :data:`COLUMNS`), in pipeline step order.

    Args:
        paths: The benchmark files.
        logs: Each file's job log, in the same order (see :func:`read_benchmark`).
    """
    paths = list(paths)
    logs = list(logs) if logs is not None else [None] * len(paths)
    if len(logs) != len(paths):
        raise ValueError(f"{len(paths)} benchmark files but {len(logs)} job logs")
    records = [read_benchmark(p, log) for p, log in zip(paths, logs, strict=True)]
    frame = pd.DataFrame(records, columns=COLUMNS)
    order = {step: i for i, step in enumerate(STEPS)}
    frame = frame.sort_values(
        ["dataset", "model", "method", "ratio", "seed", "step"],
        key=lambda col: col.map(order) if col.name == "step" else col,
    )
    return frame.reset_index(drop=True)


def write_benchmarks(
    paths: Iterable[str | Path], out_csv: str | Path, logs: Iterable[str | Path] | None = None
) -> Path:
    """Write :func:`collect` of ``paths`` (and their job ``logs``) to ``out_csv``."""
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    collect(paths, logs).to_csv(out, index=False)
    return out
