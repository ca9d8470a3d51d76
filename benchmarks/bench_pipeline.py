"""Time a cold run of the workflow and a no-op rerun, and print the figures of record.

Usage:
    python benchmarks/bench_pipeline.py [--configfile config/smoke.yaml] [--cores 2] [--keep DIR]
    python benchmarks/bench_pipeline.py --analyze DIR    # only the figures of a finished run
    python benchmarks/bench_pipeline.py --touched        # only the no-op, on a touched study

``--touched`` times the no-op rerun without the cold run: every output of the DAG is created
empty and marked up to date with ``snakemake --touch``, which records the same metadata
(params, code, inputs) that a finished job leaves, so the rerun checks what it checks after a
real run. On the smoke grid the two agreed: 1.34 user seconds touched, 1.32-1.47 after a real run.

The cold run starts from an empty working directory, so it includes training the base models.
Besides the cold and no-op wall seconds it prints:

* CPU seconds per step (mean and total over the jobs), from the runs' ``benchmark:`` files, which
  Snakemake measures around the whole job (interpreter start and imports included);
* the start-up seconds a job pays before its step does any work: a fresh interpreter importing
  what each step's script imports (``worker: off``), and a client handing its script to the
  warm worker (``worker: auto``, ``worker_handoff``), medians of 3, measured here and now;
* the number of significant paired comparisons (Holm, ``results/stats/comparisons.csv``) per
  model and family, after fine-tuning (``top1``) and before it (``top1_pruned``).

It is a benchmark that prints numbers, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from agentprune import benchmarks, resolve

ROOT = Path(__file__).resolve().parents[1]

# What each per-run job imports before its step does any work (scripts/<step>.py and the
# libraries steps.py loads for that step).
STEP_IMPORTS = {
    "plan (recipe)": "from agentprune import steps; from agentprune.pruning import catalog",
    "plan (trials)": "import torch, timm; from agentprune import steps; "
    "from agentprune.pruning import catalog; import agentprune.agents.method",
    "prune": "import torch, timm, torch_pruning; from agentprune import steps, models; "
    "from agentprune.pruning import catalog",
    "finetune": "import torch, timm; from agentprune import steps, train, data, models",
    "evaluate": "import torch, timm; from agentprune import steps, evaluate, data, models",
    "run_card": "from agentprune import run_card, steps",
}


def snakemake(workdir: Path, cores: int, configfiles: list[str]) -> float:
    """Run snakemake in ``workdir``; return its wall seconds."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", str(cores)]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def snakemake_lines(workdir: Path, configfiles: list[str], *args: str) -> list[str]:
    """The stdout lines of a snakemake command that runs no job."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *args]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    proc = subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    return proc.stdout.splitlines()


def touch_study(workdir: Path, configfiles: list[str]) -> int:
    """Create every output of the DAG in ``workdir`` empty and mark it up to date (``--touch``);
    return the number of outputs."""
    rows = snakemake_lines(workdir, configfiles, "--summary")[1:]  # after the header
    outputs = [workdir / row.split("\t")[0] for row in rows]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    snakemake_lines(workdir, configfiles, "--touch", "--cores", "1")
    return len(outputs)


def touched_noop(configfiles: list[str], cores: int, repeats: int = 5) -> dict[str, object]:
    """No-op rerun seconds (each run and the median) on a touched copy of the study's DAG."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        outputs = touch_study(workdir, configfiles)
        runs = [snakemake(workdir, cores, configfiles) for _ in range(repeats)]
    return {
        "outputs": outputs,
        "noop_seconds": [round(t, 2) for t in runs],
        "noop_median_seconds": round(statistics.median(runs), 2),
    }


def handoff_seconds(repeats: int = 3) -> dict[str, float]:
    """What a job pays under ``worker: auto`` before its step runs: a fresh client interpreter
    handing an empty script to the warm worker (median of ``repeats``, after one call that may
    start the worker, whose seconds are reported too)."""
    client = (
        "import sys; from agentprune import worker; "
        "sys.exit(worker.run_in_worker(sys.argv[1], argv=[sys.argv[1]]))"
    )
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.py"
        empty.write_text("")
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", client, str(empty)], check=True)
            times.append(time.perf_counter() - start)
    return {
        "first_call_seconds": round(times[0], 2),
        "handoff_seconds": round(statistics.median(times[1:]), 2),
    }


def startup_seconds(statement: str, repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter that runs ``statement`` and exits."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_cpu(results: Path) -> dict[str, dict[str, float]]:
    """Per step: jobs, runs, mean CPU and wall seconds per job, CPU per run and the total, from
    the benchmark files (a ``batch_seeds`` job serves several runs) plus, for a job the warm
    worker ran, its child's CPU seconds from the job's log."""
    files = sorted((results / "benchmarks").glob("*/*/*/r*/s*/*.tsv"))
    if not files:
        return {}
    # A job the warm worker ran has its child's CPU seconds in its log (same path under logs/).
    logs = [
        results / "logs" / f.relative_to(results / "benchmarks").with_suffix(".log") for f in files
    ]
    frame = benchmarks.collect(files, logs)
    out = {}
    for step, group in frame.groupby("step", sort=False):
        runs = int(group["runs"].sum())
        out[str(step)] = {
            "jobs": len(group),
            "runs": runs,
            "cpu_s_mean": round(float(group["cpu_seconds"].mean()), 2),
            "cpu_s_per_run": round(float(group["cpu_seconds"].sum()) / runs, 2),
            "cpu_s_total": round(float(group["cpu_seconds"].sum()), 1),
            "wall_s_mean": round(float(group["seconds"].mean()), 2),
        }
    return out


def significant(results: Path) -> dict[str, dict[str, str]]:
    """Per model and family: significant/all comparisons after and before fine-tuning."""
    path = results / "stats" / "comparisons.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    out: dict[str, dict[str, str]] = {}
    for (model, family), group in table.groupby(["model", "family"]):
        cells = {}
        for metric, label in (("top1", "finetuned"), ("top1_pruned", "one_shot")):
            rows = group[group["metric"] == metric]
            cells[label] = f"{int(rows['significant'].sum())}/{len(rows)}"
        out[f"{model}/{family}"] = cells
    return out


def figures(workdir: Path, results: str) -> dict[str, object]:
    """Everything but the wall times, read from a finished run in ``workdir``."""
    root = workdir / results
    return {
        "runs": len(list(root.glob("*/*/*/r*/s*/metrics.json"))),
        "cpu_seconds_per_step": step_cpu(root),
        "startup_seconds_per_job": {
            step: round(startup_seconds(imports), 2) for step, imports in STEP_IMPORTS.items()
        },
        "worker_handoff": handoff_seconds(),
        "significant_comparisons": significant(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="*", default=[], help="extra config files")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this directory instead of a temp one")
    parser.add_argument("--analyze", type=Path, help="only print the figures of a finished run")
    parser.add_argument("--touched", action="store_true", help="only time the no-op rerun")
    args = parser.parse_args()
    configfiles = [str(Path(c).resolve()) for c in args.configfile]
    # The config the workflow will see (checked before the cold run, which trains models): where
    # its results go.
    results = resolve.load_config(ROOT / "config" / "config.yaml", *configfiles)["results"]
    if args.touched:
        print(json.dumps(touched_noop(configfiles, args.cores), indent=1))
        return
    if args.analyze:
        print(json.dumps(figures(args.analyze, results), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cold = snakemake(workdir, args.cores, configfiles)
        noop = snakemake(workdir, args.cores, configfiles)
        out = {
            "config": configfiles or ["config/config.yaml"],
            "cores": args.cores,
            "cold_seconds": round(cold, 1),
            "noop_seconds": round(noop, 1),
        }
        out.update(figures(workdir, results))
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
