"""Replay the LLM calls recorded in a finished study's multi_agent plans through the in-process
llama.cpp backend, with and without the evaluated-system-prompt state, and print the seconds per
call and whether the replies match.

    python benchmarks/bench_llm_calls.py results [--limit 4] [--threads 1]

Both variants run in this process on the same calls, alternating call by call, so machine noise
hits them alike. "reset" evaluates every prompt from scratch (the backend before the prefix
state); "prefix" restores the state with the system message evaluated, as the backend does now.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from agentprune.agents import llm as llm_mod
from agentprune.agents import schemas

SCHEMAS = {"profiling": schemas.ProfilingDecision, "master": schemas.MasterDecision}


def recorded_calls(results: Path, limit: int) -> list[tuple[str, list[dict]]]:
    """(agent, messages) of the first ``limit`` multi_agent plans' exchanges."""
    calls = []
    for plan in sorted(results.glob("*/*/multi_agent/r*/s*/plan.json"))[:limit]:
        for exchange in json.loads(plan.read_text())["provenance"]["exchanges"]:
            if exchange["agent"] in SCHEMAS:
                calls.append((exchange["agent"], exchange["messages"]))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--limit", type=int, default=4, help="plans to replay")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    path = str(llm_mod.bundled_gguf())
    llama, _ = llm_mod._load_llama(path, args.threads)
    calls = recorded_calls(args.results, args.limit)
    seconds: dict[str, list[float]] = {"reset": [], "prefix": []}
    replies: dict[str, list[str]] = {"reset": [], "prefix": []}
    for agent, messages in calls:
        schema = SCHEMAS[agent].model_json_schema()
        for variant in ("reset", "prefix"):
            start = time.perf_counter()
            llm_mod.start_call(llama, path, messages, prefix=variant == "prefix")
            out = llama.create_chat_completion(
                messages=messages,
                response_format={"type": "json_object", "schema": schema},
                temperature=0.0,
                seed=0,
                max_tokens=384,
            )
            seconds[variant].append(time.perf_counter() - start)
            replies[variant].append(out["choices"][0]["message"]["content"])
    same = sum(a == b for a, b in zip(replies["reset"], replies["prefix"]))
    print(f"{len(calls)} calls from {args.limit} plans, {args.threads} thread(s)")
    for variant, values in seconds.items():
        print(
            f"{variant:>6}: total {sum(values):.1f} s, median {statistics.median(values):.2f} s"
            f" per call (min {min(values):.2f}, max {max(values):.2f})"
        )
    print(f"ratio prefix/reset: {sum(seconds['prefix']) / sum(seconds['reset']):.2f}")
    print(f"identical replies: {same} of {len(calls)}")


if __name__ == "__main__":
    main()
