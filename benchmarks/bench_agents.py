"""What the LLM contributes to multi_agent, on a finished study, for any backend.

Usage (after `snakemake --cores 2` has written results/):

    python benchmarks/bench_agents.py                                # the study's own plans
    python benchmarks/bench_agents.py --replan                       # re-plan with the config's LLM
    python benchmarks/bench_agents.py --replan --anchor both         # ... unanchored and anchored
    python benchmarks/bench_agents.py --replan --backend openai \\
        --base-url http://llm-node:8000/v1 --model Qwen2.5-72B-Instruct   # a served model

Per multi_agent run of the study (dataset, model, ratio, seed) it prints:

* the planning cost: real LLM calls, prompt and completion tokens, planning seconds, and the
  plan job's wall seconds over the isomorphic prune job's (from Snakemake's ``benchmark:``
  files; the study's own plans only; a ``batch_seeds`` job counts its per-run share);
* the influence figures: per agent the LLM decisions that differ from the default policy's in
  the same state out of all decisions, and the default policy's answers by reason; the trials
  that ran an LLM-originated strategy; whether the selected trial is one of them;
* validation top-1 of the selected trial, and test top-1 after fine-tuning, next to the
  agents_heuristic ablation's and isomorphic's at the same model, ratio and seed.

``--replan`` plans every run again in this process with the response cache off (every LLM call is
real), then prunes, fine-tunes and evaluates the new plan exactly as the workflow's steps do, into
a temporary folder; the study's results are only read. The ablation and isomorphic rows always
come from the study. Totals close the output. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agentprune import benchmarks

AGENTS = ("profiling", "master")


def runs(results: Path, method: str) -> dict[tuple[str, str, str, str], Path]:
    """(dataset, model, ratio, seed) -> run directory of ``method`` (runs with metrics only)."""
    out = {}
    for metrics in results.glob(f"*/*/{method}/r*/s*/metrics.json"):
        run = metrics.parent
        out[(run.parts[-5], run.parts[-4], run.parts[-2][1:], run.parts[-1][1:])] = run
    return out


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def replan(
    config: dict[str, Any], results: Path, key: tuple[str, str, str, str], tmp: Path
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """A fresh plan of one run, carried through prune, finetune and evaluate in ``tmp``.

    Returns:
        The plan, the new run's metrics and the in-process planning seconds.
    """
    from agentprune import resolve, steps

    dataset, model, ratio, seed = key
    base = results / dataset / model / "base" / "model"
    out = tmp / f"{model}_r{ratio}_s{seed}"
    start = time.perf_counter()
    plan = steps.plan(
        resolve.plan_step(config, "multi_agent", model, float(ratio)),
        int(seed),
        results / dataset / model / "profile.json",
        out / "plan.json",
        base_stem=base,
        threads=1,
    )
    seconds = time.perf_counter() - start
    steps.prune(
        resolve.prune_step(config, model),
        out / "plan.json",
        base,
        out / "pruned",
        out / "prune_report.json",
    )
    steps.finetune(
        resolve.finetune_step(config, model),
        out / "plan.json",
        out / "pruned",
        base,
        out / "finetuned",
        out / "ft.json",
    )
    # What the evaluate rule passes: the run's wildcards.
    identity = {
        "dataset": dataset,
        "model": model,
        "method": "multi_agent",
        "ratio": ratio,
        "seed": seed,
    }
    metrics = steps.evaluate(
        resolve.evaluate_step(config, model),
        identity,
        out / "plan.json",
        base.with_name("metrics.json"),
        out / "prune_report.json",
        out / "ft.json",
        out / "pruned",
        out / "finetuned",
        out / "metrics.json",
    )
    return plan, metrics, seconds


def best_val(plan: dict[str, Any]) -> float:
    """Validation top-1 of the plan's selected trial."""
    best = plan["agents"]["best_trial"]
    return next(t["val_top1"] for t in plan["provenance"]["trials"] if t["trial"] == best)


def influence_text(influence: dict[str, Any]) -> str:
    """Per agent own/all and the default's reasons; trials; selection."""
    parts = []
    for agent in AGENTS:
        c = influence["agents"][agent]
        reasons = ",".join(f"{k}{v}" for k, v in c["default"].items() if v)
        parts.append(
            f"{agent} {c['llm_differs']}/{c['decisions']}" + (f" ({reasons})" if reasons else "")
        )
    parts.append(f"LLM trials {influence['llm_trials']}/{influence['trials']}")
    parts.append("selected LLM" if influence["selected_llm"] else "selected default")
    return "; ".join(parts)


def study_config(args: argparse.Namespace, anchored: bool) -> dict[str, Any]:
    """The study's config with the benchmark's backend and prompt, cache off."""
    from agentprune.resolve import load_config

    agents: dict[str, Any] = {"cache": "off", "anchor_default": anchored}
    for key in ("backend", "base_url", "model"):
        if getattr(args, key) is not None:
            agents[key] = getattr(args, key)
    return load_config(*args.configfile, overrides={"results": str(args.results), "agents": agents})


def report(args: argparse.Namespace, prompt: str | None) -> None:
    """Print one pass over the study's multi_agent runs (re-planned with ``prompt`` if set)."""
    agent = runs(args.results, "multi_agent")
    ablation = runs(args.results, "agents_heuristic")
    iso = runs(args.results, "isomorphic")
    keys = sorted(agent)[: args.limit or None]
    if not keys:
        raise SystemExit(f"no multi_agent run under {args.results}")
    config = study_config(args, prompt == "anchored") if prompt else None
    bench = args.results / "benchmarks"
    title = f"re-planned, {prompt} prompt" if prompt else "the study's plans"
    print(f"== multi_agent: {title}")
    print(
        "dataset/model ratio seed | calls tokens(prompt+completion) plan_s job_ratio | influence "
        "| val_top1 | test top1: multi_agent agents_heuristic isomorphic"
    )
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            dataset, model, ratio, seed = key
            if config is not None:
                plan, metrics, seconds = replan(config, args.results, key, Path(tmp))
                ratio_text = "-"
            else:
                plan = read(agent[key] / "plan.json")
                metrics = read(agent[key] / "metrics.json")
                seconds = metrics["planning"]["seconds"]
                tail = Path(dataset, model)
                agent_cell = bench / tail / f"multi_agent/r{ratio}"
                plan_job = benchmarks.run_seconds(agent_cell, seed, "plan")
                # The run's share of the isomorphic prune job (a batch_seeds job ran all seeds).
                iso_cell = bench / tail / f"isomorphic/r{ratio}"
                prune_job = benchmarks.run_seconds(iso_cell, seed, "prune")
                job_ratio = plan_job / prune_job if plan_job and prune_job else None
                ratio_text = f"{job_ratio:.2f}x" if job_ratio else "-"
                if job_ratio:
                    totals.setdefault("job_ratio", []).append(job_ratio)
            cost = metrics["planning"]
            influence = plan["agents"]["influence"]
            others = [
                read(table[key] / "metrics.json")["top1"] if key in table else float("nan")
                for table in (ablation, iso)
            ]
            print(
                f"{dataset}/{model} {ratio} {seed} | {cost['llm_calls']} "
                f"{cost['prompt_tokens']}+{cost['completion_tokens']} {seconds:.1f} {ratio_text} | "
                f"{influence_text(influence)} | {best_val(plan):.2f} | {metrics['top1']:.2f} "
                f"{others[0]:.2f} {others[1]:.2f}",
                flush=True,
            )
            for name, value in (
                ("calls", cost["llm_calls"]),
                ("tokens", cost["prompt_tokens"] + cost["completion_tokens"]),
                ("seconds", seconds),
                ("own", influence["llm_differs"]),
                ("decisions", influence["decisions"]),
                ("llm_trials", influence["llm_trials"]),
                ("trials", influence["trials"]),
                ("selected_llm", float(influence["selected_llm"])),
                ("delta_ablation", metrics["top1"] - others[0]),
                ("delta_isomorphic", metrics["top1"] - others[1]),
            ):
                totals.setdefault(name, []).append(float(value))
    summarize(totals, len(keys))


def summarize(totals: dict[str, list[float]], n: int) -> None:
    """The totals line of one pass."""
    total = {k: sum(v) for k, v in totals.items()}
    mean = {k: statistics.mean(v) for k, v in totals.items() if v}
    print(
        f"total over {n} runs: {total['calls']:.0f} calls, {total['tokens']:.0f} tokens, "
        f"{total['seconds']:.0f} s planning; own decisions {total['own']:.0f}/"
        f"{total['decisions']:.0f}, LLM trials {total['llm_trials']:.0f}/{total['trials']:.0f}, "
        f"selected LLM {total['selected_llm']:.0f}/{n}; test top-1 multi_agent - "
        f"agents_heuristic {mean['delta_ablation']:+.2f}, - isomorphic "
        f"{mean['delta_isomorphic']:+.2f} (means)"
    )
    if "job_ratio" in totals:
        ratios = totals["job_ratio"]
        print(
            f"plan job / isomorphic prune job: median {statistics.median(ratios):.2f}x, max "
            f"{max(ratios):.2f}x over {len(ratios)} runs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--configfile", nargs="*", default=["config/config.yaml"])
    parser.add_argument("--replan", action="store_true", help="plan again with a live LLM")
    parser.add_argument(
        "--anchor", choices=("off", "on", "both"), default="off", help="prompt(s) to re-plan with"
    )
    parser.add_argument("--backend", choices=("llamacpp", "openai"), default=None)
    parser.add_argument("--base-url", dest="base_url", default=None)
    parser.add_argument("--model", default=None, help="served model name, or a GGUF path")
    parser.add_argument("--limit", type=int, default=0, help="first N runs only (0: all)")
    args = parser.parse_args()
    if not args.replan:
        report(args, None)
        return
    import torch

    torch.set_num_threads(1)
    prompts = {"off": ["unanchored"], "on": ["anchored"], "both": ["unanchored", "anchored"]}
    for prompt in prompts[args.anchor]:
        report(args, prompt)


if __name__ == "__main__":
    main()
