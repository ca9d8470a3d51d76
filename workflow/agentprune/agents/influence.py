"""What the LLM contributed to a plan, counted from its decision records.

Each decision record (see :meth:`agentprune.agents.base.Answer.record`) says whether the LLM
answered and whether its decision differs from what the default policy decides in the same state
(decisions are compared, not their text). The summary here is what ``plan.json`` and
``metrics.json`` carry under ``agents.influence`` / ``planning.influence`` and what the tables and
run cards show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentprune.agents.base import DEFAULT_REASONS
from agentprune.agents.schemas import DECISIONS

FAILURES = ("transport", "invalid")
"""Default-policy reasons that count as a failed LLM decision (for ``max_fallback_share``)."""


def llm_failures(decisions: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(failed, asked): LLM decisions that fell back because the LLM failed, and all decisions
    that were put to an LLM (a plan without an LLM asks none)."""
    asked = [d for d in decisions if d["reason"] != "no_llm"]
    failed = [d for d in asked if d["reason"] in FAILURES]
    return len(failed), len(asked)


def agent_counts(decisions: Sequence[dict[str, Any]], agent: str) -> dict[str, Any]:
    """One agent's decisions: answered by the LLM (``llm``), of which differing from the default
    (``llm_differs``) and equal to it (``llm_equal_default``), and answered by the default policy
    per reason (``default``)."""
    mine = [d for d in decisions if d["agent"] == agent]
    own = sum(d["source"] == "llm" for d in mine)
    equal = sum(d["source"] == "llm_equal_default" for d in mine)
    return {
        "decisions": len(mine),
        "llm": own + equal,
        "llm_differs": own,
        "llm_equal_default": equal,
        "default": {reason: sum(d["reason"] == reason for d in mine) for reason in DEFAULT_REASONS},
    }


def influence(
    decisions: Sequence[dict[str, Any]],
    trials: Sequence[dict[str, Any]],
    best: dict[str, Any],
    prompt: str,
) -> dict[str, Any]:
    """The influence summary of one plan.

    Args:
        decisions: the plan's decision records.
        trials: its trials (``strategy_source`` ``llm`` marks a strategy the LLM originated).
        best: the selected trial.
        prompt: ``unanchored`` or ``anchored``.

    Returns:
        ``prompt``; ``agents`` (per agent: :func:`agent_counts`); totals over agents
        (``decisions``, ``llm``, ``llm_differs``); ``trials``, ``llm_trials`` (trials that ran
        a strategy the LLM originated), ``selected_llm`` (the selected trial is one of them);
        ``failed`` and ``asked`` LLM decisions and ``fallback_share`` (None when no LLM was
        asked).
    """
    agents = {agent: agent_counts(decisions, agent) for agent in DECISIONS}
    failed, asked = llm_failures(decisions)
    return {
        "prompt": prompt,
        "agents": agents,
        "decisions": sum(a["decisions"] for a in agents.values()),
        "llm": sum(a["llm"] for a in agents.values()),
        "llm_differs": sum(a["llm_differs"] for a in agents.values()),
        "trials": len(trials),
        "llm_trials": sum(t.get("strategy_source") == "llm" for t in trials),
        "selected_llm": best.get("strategy_source") == "llm",
        "failed": failed,
        "asked": asked,
        "fallback_share": failed / asked if asked else None,
    }
