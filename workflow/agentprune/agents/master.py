"""The master agent: chooses the next trial's strategy from the target, the profile, the safety
bounds and the history of trials, or decides to stop."""

from __future__ import annotations

from typing import Any

from agentprune.agents.base import LLMAgent
from agentprune.agents.schemas import Allocation, MasterDecision, Strategy


def isomorphic_strategy(has_heads: bool, calibration_batches: int) -> Strategy:
    """The Isomorphic-Pruning recipe as a strategy: the heuristic's first trial, so that the best
    trial is never worse on the proxy than the strongest fixed baseline."""
    return Strategy(
        importance="taylor",
        grouping="isomorphic",
        heads=1.0 if has_heads else 0.0,
        allocation=None,
        round_to=1,
        calibration_batches=calibration_batches,
    )


class MasterAgent(LLMAgent):
    """Plans trials; the LLM picks the strategy and whether to continue."""

    name = "master"
    decision = MasterDecision
    role = (
        "You are the master agent of a structured pruning system that removes a fixed fraction of "
        "a model's MACs (target). Choose the next trial: importance (taylor, magnitude_l2, "
        "magnitude_l1), grouping (isomorphic, global, uniform), heads (head ratio as a multiple "
        "of the channel ratio, 0 keeps heads), allocation (null, or multiples for attention, mlp "
        "and residual; lower protects), round_to (1, 2, 4, 8), calibration_batches (1 to 16). "
        "Learn from the history's validation accuracy; action stop ends the search."
    )

    def heuristic(self, state: dict[str, Any]) -> MasterDecision:
        """A fixed sequence: the isomorphic recipe, then a protective allocation, then more
        calibration; stop as soon as a trial fails to improve on the best."""
        history = state["history"]
        has_heads = bool(state["profile"].get("attention_heads"))
        calib = int(state["calibration_batches"])
        base = isomorphic_strategy(has_heads, calib)
        protect = set(state["protect"])
        candidates = [
            base,
            base.model_copy(
                update={
                    "grouping": "global",
                    "heads": 0.5 if "heads" in protect else base.heads,
                    "allocation": Allocation(
                        attention=0.5 if "attention" in protect else 1.0,
                        mlp=0.5 if "mlp" in protect else 1.0,
                        residual=0.5 if "residual" in protect else 1.0,
                    ),
                }
            ),
            base.model_copy(update={"heads": base.heads / 2, "calibration_batches": 2 * calib}),
        ]
        done = len(history)
        scored = [t["val_top1"] for t in history if t.get("val_top1") is not None]
        stalled = len(scored) >= 2 and scored[-1] < max(scored[:-1]) + float(
            state["min_improvement"]
        )
        if done >= len(candidates) or stalled:
            return MasterDecision(
                action="stop",
                strategy=candidates[min(done, len(candidates)) - 1],
                rationale="the fixed sequence is spent or the last trial did not improve",
            )
        return MasterDecision(
            action="continue",
            strategy=candidates[done],
            rationale=f"heuristic trial {done + 1} of {len(candidates)}",
        )

    def run(self, llm, state: dict[str, Any], seed: int) -> tuple[MasterDecision, bool]:
        """The next decision; ``state`` holds target, profile summary, protect, bounds and
        history."""
        # Kept short on purpose: prompt processing dominates a small local model's latency.
        profile = state["profile"]
        payload = {
            "target": state["target"],
            "heads": bool(profile.get("attention_heads")),
            "loss_at_max_ratio": {k: max(v.values()) for k, v in profile["loss_increase"].items()},
            "protect": state["protect"],
            "bounds": state["bounds"],
            "history": [
                {
                    "strategy": t["strategy"],
                    **({"val_top1": t["val_top1"]} if "val_top1" in t else {"error": True}),
                }
                for t in state["history"]
            ],
            "trials_left": state["trials_left"],
        }
        return self.ask(llm, payload, lambda: self.heuristic(state), seed)
