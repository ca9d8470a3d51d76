"""Planning overhead of multi_agent against a single isomorphic prune, and the per-seed accuracy
of the two, on a finished run of the workflow.

Usage:
    python benchmarks/bench_planning.py [--results results] [--replan]

Reads Snakemake's ``benchmark:`` files (wall seconds per job) and each run's ``metrics.json``:

* overhead = multi_agent's plan job / isomorphic's prune job, per model, ratio and seed (the plan
  job of a fixed recipe takes a fraction of a second, so isomorphic's planning is left out);
* top-1 of multi_agent and isomorphic per seed, and their mean difference at equal MACs.

``--replan`` also re-times every multi_agent plan in this process with the response cache off
(so each LLM call is real), against an in-process isomorphic prune: this leaves out the ~5 s
interpreter and import start-up that every Snakemake job pays.

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path


def job_seconds(tsv: Path) -> float:
    """Wall seconds of one job from its Snakemake benchmark file."""
    with tsv.open() as fh:
        return float(next(csv.DictReader(fh, delimiter="\t"))["s"])


def runs(results: Path, method: str) -> dict[tuple[str, str, str, str], Path]:
    """(dataset, model, ratio, seed) -> run directory of ``method``."""
    out = {}
    for metrics in results.glob(f"*/*/{method}/r*/s*/metrics.json"):
        run = metrics.parent
        dataset, model = run.parts[-5], run.parts[-4]
        out[(dataset, model, run.parts[-2][1:], run.parts[-1][1:])] = run
    return out


def replan(results: Path, key: tuple[str, str, str, str], config: dict) -> tuple[float, float]:
    """In-process seconds of a fresh multi_agent plan (cache off) and an isomorphic plan+prune."""
    from agentprune import steps

    dataset, model, ratio, seed = key
    base = results / dataset / model / "base" / "model"
    profile = results / dataset / model / "profile.json"
    cfg = {**config, "agents": {**config["agents"], "cache": "off"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        steps.plan(cfg, "multi_agent", model, float(ratio), int(seed), profile, tmp / "ma.json",
                   base, threads=1)  # fmt: skip
        planning = time.perf_counter() - start
        start = time.perf_counter()
        steps.plan(cfg, "isomorphic", model, float(ratio), int(seed), profile, tmp / "iso.json")
        steps.prune(cfg, tmp / "iso.json", base, tmp / "iso", tmp / "iso_report.json")
        pruning = time.perf_counter() - start
    return planning, pruning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--replan", action="store_true", help="re-time plans in process")
    parser.add_argument("--config", nargs="*", default=["config/config.yaml"])
    args = parser.parse_args()
    agent, iso = runs(args.results, "multi_agent"), runs(args.results, "isomorphic")
    keys = sorted(set(agent) & set(iso))
    if not keys:
        raise SystemExit(f"no run has both multi_agent and isomorphic under {args.results}")
    bench = args.results / "benchmarks"
    config = None
    if args.replan:
        import torch
        from agentprune.config import load_config

        torch.set_num_threads(1)
        config = load_config(*args.config, overrides={"results": str(args.results)})
    print(
        "dataset model ratio seed | plan_job_s prune_job_s overhead | calls trials backend "
        "| top1_multi_agent top1_isomorphic" + (" | replan_s prune_s overhead" if config else "")
    )
    overheads, deltas = [], {}
    for key in keys:
        dataset, model, ratio, seed = key
        tail = Path(dataset, model)
        plan_s = job_seconds(bench / tail / "multi_agent" / f"r{ratio}" / f"s{seed}" / "plan.tsv")
        prune_s = job_seconds(bench / tail / "isomorphic" / f"r{ratio}" / f"s{seed}" / "prune.tsv")
        ma = json.loads((agent[key] / "metrics.json").read_text())
        ref = json.loads((iso[key] / "metrics.json").read_text())
        overheads.append(plan_s / prune_s)
        deltas.setdefault((dataset, model, ratio), []).append(ma["top1"] - ref["top1"])
        cost = ma["planning"]
        line = (
            f"{dataset} {model} {ratio} {seed} | {plan_s:.1f} {prune_s:.1f} {plan_s / prune_s:.2f}x"
            f" | {cost['llm_calls']} {cost.get('trials', '')} {cost['backend']}"
            f" | {ma['top1']:.2f} {ref['top1']:.2f}"
        )
        if config:
            planning, pruning = replan(args.results, key, config)
            line += f" | {planning:.1f} {pruning:.1f} {planning / pruning:.2f}x"
        print(line, flush=True)
    print(
        f"overhead (plan job / isomorphic prune job): median {statistics.median(overheads):.2f}x,"
        f" max {max(overheads):.2f}x over {len(overheads)} runs"
    )
    for (dataset, model, ratio), values in sorted(deltas.items()):
        print(
            f"top-1 multi_agent - isomorphic, {dataset}/{model} r{ratio}: "
            f"mean {statistics.mean(values):+.2f} over {len(values)} seeds "
            f"({', '.join(f'{v:+.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
