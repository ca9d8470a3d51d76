"""The profiling agent: reads ``profile.json``; the LLM names the risks and the kinds to protect."""

from __future__ import annotations

from typing import Any

from agentprune.agents.base import Answer, LLMAgent, classify
from agentprune.agents.schemas import ProfilingDecision


def summarize(profile: dict[str, Any]) -> dict[str, Any]:
    """The part of a profile an LLM can use: MACs shares, per-kind sensitivity and bounds."""
    total = max(1, int(profile["macs"]))
    kinds = profile.get("sensitivity", {}).get("kinds", {})
    return {
        "macs": int(profile["macs"]),
        "params": int(profile["params"]),
        "macs_share": {k: v / total for k, v in profile.get("breakdown", {}).items() if v},
        "attention_heads": profile.get("num_heads", []),
        "loss_increase": {
            kind: dict(zip(map(str, info["ratios"]), info["loss_increase"]))
            for kind, info in kinds.items()
        },
        "safety_bounds": profile.get("safety_bounds", {}).get("max_ratio", {}),
    }


class ProfilingAgent(LLMAgent):
    """Summarizes the profile for the others; the LLM returns risks and kinds to protect."""

    name = "profiling"
    decision = ProfilingDecision
    role = (
        "You are the profiling agent of a pruning system. From a model's profile (MACs share "
        "per kind, loss increase when pruning one kind by each ratio, safety bounds) name the "
        "risks of pruning it and the kinds to protect, most sensitive first."
    )

    def heuristic(self, summary: dict[str, Any], max_loss_increase: float) -> ProfilingDecision:
        """Protect the kinds whose loss grows by more than half the tolerated increase at the
        largest measured ratio, most sensitive first."""
        worst = {
            kind: max(curve.values()) for kind, curve in summary["loss_increase"].items() if curve
        }
        sensitive = sorted(
            (k for k, v in worst.items() if v > 0.5 * max_loss_increase),
            key=lambda k: (-worst[k], k),
        )
        risks = [f"{k}: loss +{worst[k]:.2f} at the largest ratio measured" for k in sensitive]
        return ProfilingDecision(risks=risks[:3], protect=sensitive[:5])

    def run(
        self, llm, profile: dict[str, Any], max_loss_increase: float, seed: int, anchored: bool
    ) -> tuple[Answer, dict[str, Any]]:
        """The profiling decision (with its source) and the summary the other agents reuse."""
        summary = summarize(profile)
        payload = {k: v for k, v in summary.items() if k not in ("macs", "params")}
        answer = self.ask(
            llm, payload, lambda: self.heuristic(summary, max_loss_increase), seed, anchored
        )
        known = set(summary["loss_increase"])
        # Kinds this model does not have are dropped: protecting them would mean nothing.
        protect = [k for k in dict.fromkeys(answer.decision.protect) if k in known]
        decision = answer.decision.model_copy(update={"protect": protect})
        return classify(
            decision if answer.from_llm else None, answer.default, answer.reason
        ), summary
