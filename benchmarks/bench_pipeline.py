"""Time a cold run of the workflow and a no-op rerun, and print the figures.

Usage:
    python benchmarks/bench_pipeline.py [--configfile config/smoke.yaml] [--cores 2] [--keep DIR]

The cold run starts from an empty working directory, so it includes training the base models. It is
a benchmark that prints numbers, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, cores: int, configfiles: list[str]) -> float:
    """Run snakemake in ``workdir``; return its wall seconds."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", str(cores)]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="*", default=[], help="extra config files")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this directory instead of a temp one")
    args = parser.parse_args()
    configfiles = [str(Path(c).resolve()) for c in args.configfile]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cold = snakemake(workdir, args.cores, configfiles)
        noop = snakemake(workdir, args.cores, configfiles)
        runs = list((workdir / "results").glob("*/*/*/r*/s*/metrics.json"))
        figures = {
            "config": configfiles or ["config/config.yaml"],
            "cores": args.cores,
            "runs": len(runs),
            "cold_seconds": round(cold, 1),
            "noop_seconds": round(noop, 1),
        }
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
