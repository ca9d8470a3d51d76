"""Seconds to put the llamacpp backend in its system-prompt state: evaluated, or loaded from disk.

Usage:
    python benchmarks/bench_prompt_states.py results/digits/vit/multi_agent/r0.75/s0/plan.json
        [--agent master] [--repeats 3] [--threads 1]

Takes the first exchange of ``--agent`` from a multi_agent ``plan.json`` and, alternating in one
process, times ``llm._prefix_state`` on its messages: with the process's states cleared and no
store (what every plan job paid before ``PromptStates``), and with a ``PromptStates`` folder that
already holds the state (what a later plan job of the study pays). It prints each time, the
medians and their ratio. A benchmark that prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from agentprune.agents import llm
from agentprune.agents.llm_settings import bundled_gguf


def timed_prefix(llama, path: str, messages: list[dict], states: llm.PromptStates | None) -> float:
    """Seconds of one ``_prefix_state`` in a process that has no state in memory."""
    llm._PREFIXES.clear()
    start = time.perf_counter()
    llm._prefix_state(llama, path, messages, states)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path, help="a multi_agent run's plan.json")
    parser.add_argument("--agent", default="master")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    exchanges = json.loads(args.plan.read_text())["provenance"]["exchanges"]
    messages = next(e["messages"] for e in exchanges if e.get("agent") == args.agent)
    path = str(bundled_gguf().resolve())
    llama, _ = llm._load_llama(path, args.threads)
    times: dict[str, list[float]] = {"evaluated": [], "loaded": []}
    with tempfile.TemporaryDirectory() as tmp:
        states = llm.PromptStates(tmp)
        timed_prefix(llama, path, messages, states)  # store the state once
        for _ in range(args.repeats):
            times["evaluated"].append(timed_prefix(llama, path, messages, None))
            times["loaded"].append(timed_prefix(llama, path, messages, states))
    tokens = next(iter(llm._PREFIXES))[1]
    print(f"{args.agent} system prompt: {len(tokens)} tokens, {args.threads} thread(s)")
    for name, values in times.items():
        spread = " ".join(f"{v:.2f}" for v in values)
        print(f"{name}: {spread} s (median {statistics.median(values):.2f})")
    ratio = statistics.median(times["loaded"]) / statistics.median(times["evaluated"])
    print(f"loaded / evaluated: {ratio:.3f}")


if __name__ == "__main__":
    main()
