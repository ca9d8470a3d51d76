"""Seconds the between-workflow cache saves: base models and profiles reused by a second study.

Usage:
    python benchmarks/bench_cache.py [--configfile config/smoke.yaml] [--cores 2]

Two empty working directories share one $SNAKEMAKE_OUTPUT_CACHE. Each runs the workflow up to the
profiles of every configured model with `snakemake --cache`: the first trains (or downloads) and
profiles the base models and stores them, the second links them from the cache. Prints both wall
times, the training and profiling seconds the second study skipped, and what it saved. It asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentprune import resolve

ROOT = Path(__file__).resolve().parents[1]


def run(
    workdir: Path, targets: list[str], configfiles: list[str], cores: int, cache: Path
) -> float:
    """Run snakemake --cache for ``targets`` in ``workdir``; return its wall seconds."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", str(cores)]
    cmd += [*targets, "--cache"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    env = {**os.environ, "SNAKEMAKE_OUTPUT_CACHE": str(cache)}
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snakemake failed in {workdir}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="*", default=[], help="extra config files")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    configfiles = [str(Path(c).resolve()) for c in args.configfile]
    # The config the workflow sees: the files merged as Snakemake merges them, checked, defaults in.
    config = resolve.load_config(ROOT / "config" / "config.yaml", *configfiles)
    results, dataset = config["results"], config["dataset"]["name"]
    models = [m["name"] for m in config["models"]]
    targets = [f"{results}/{dataset}/{m}/profile.json" for m in models]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        cold = run(Path(tmp) / "first", targets, configfiles, args.cores, cache)
        warm = run(Path(tmp) / "second", targets, configfiles, args.cores, cache)
        trained = {
            m: json.loads(
                (Path(tmp) / "first" / f"{results}/{dataset}/{m}/base/metrics.json").read_text()
            ).get("seconds", float("nan"))
            for m in models
        }
    print(f"models: {', '.join(models)} ({dataset}), --cores {args.cores}")
    for model, seconds in trained.items():
        print(f"  base model {model}: trained in {seconds:.1f} s (in process)")
    print(f"first study  (train + profile, store in cache): {cold:.1f} s wall")
    print(f"second study (link from cache):                 {warm:.1f} s wall")
    print(f"saved by the cache: {cold - warm:.1f} s ({(cold - warm) / cold:.0%})")


if __name__ == "__main__":
    main()
