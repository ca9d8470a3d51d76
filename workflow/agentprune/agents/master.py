"""The master agent: chooses the next trial (pruning strategy and recovery schedule) from the
target, the profile, the profiling agent's risks, the safety bounds and the measured history of
trials, or decides to stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentprune.agents.base import Answer, LLMAgent, compact
from agentprune.agents.llm import Avoid
from agentprune.agents.schemas import Allocation, MasterDecision, Recovery, Strategy


def isomorphic_strategy(has_heads: bool, calibration_batches: int) -> Strategy:
    """The Isomorphic-Pruning recipe as a strategy: the default policy's first trial, so that
    the no-LLM loop's best trial is never worse on the proxy than the strongest fixed
    baseline."""
    return Strategy(
        importance="taylor",
        grouping="isomorphic",
        heads=1.0 if has_heads else 0.0,
        allocation=None,
        round_to=1,
        calibration_batches=calibration_batches,
    )


Effective = Callable[[MasterDecision], dict[str, Any]]
"""A decision's trial as it would run: the pruner settings and the recovery after every clamp.
Two decisions with the same effective trial give the same result (trials are deterministic)."""


class MasterAgent(LLMAgent):
    """Plans trials; the LLM picks the strategy, the recovery schedule and whether to go on."""

    name = "master"
    decision = MasterDecision
    role = (
        "You are the master agent of a pruning system that removes the target fraction of a "
        "model's MACs. Each trial prunes with your strategy, fine-tunes briefly with your "
        "recovery and measures val_top1 (%). Bounds cap every kind's pruning ratio. Propose an "
        "untried trial likely to beat the best one in the history, or stop."
    )

    def heuristic(self, state: dict[str, Any], effective: Effective) -> MasterDecision:
        """A fixed sequence: the isomorphic recipe, then a protective global allocation, then
        the recipe with half the head ratio and twice the calibration; the first one not tried
        yet, with the configured recovery; stop when all were tried."""
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
        recovery = Recovery(
            lr=float(state["recovery"]["lr"]), steps=int(state["recovery"]["steps"])
        )
        tried = [t["effective"] for t in state["history"]]
        for strategy in candidates:
            decision = MasterDecision(action="continue", strategy=strategy, recovery=recovery)
            if effective(decision) not in tried:
                return decision
        return MasterDecision(action="stop", strategy=candidates[-1], recovery=recovery)

    def context(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the LLM sees that stays fixed over a plan: target, profile, risks and the base
        model's accuracy."""
        profile = state["profile"]
        return {
            "target": state["target"],
            "heads_per_layer": profile.get("attention_heads") or [],
            "macs_share": profile.get("macs_share", {}),
            "loss_increase_by_kind_and_ratio": profile["loss_increase"],
            "risks": state["risks"],
            "protect": state["protect"],
            "base_val_top1": state["base_val_top1"],
        }

    def turns(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """What changes from call to call, as a conversation that only grows: the first turn
        gives the bounds and the trial budget, then one turn per trial run with what it
        measured, the bounds when they were relaxed after it, and the trials left.

        Call ``k + 1``'s turns are call ``k``'s plus one, so the backend evaluates each trial's
        turn once per plan instead of the whole history at every call.
        """
        history = state["history"]
        budget = state["trials_left"] + len(history)
        bounds_at = [t["bounds"] for t in history] + [state["bounds"]]
        turns = [{"bounds": bounds_at[0], "trials_left": budget}]
        for k, trial in enumerate(history, start=1):
            turn = _history_entry(trial)
            if bounds_at[k] != trial["bounds"]:
                turn["bounds_relaxed_to"] = bounds_at[k]
            turn["trials_left"] = budget - k
            turns.append(turn)
        return turns

    @staticmethod
    def limits(state: dict[str, Any]) -> dict[str, Any]:
        """The run's limits quoted in the reply's field descriptions."""
        recovery = state["recovery"]
        return {
            "lr_min": recovery["lr_min"],
            "lr_max": recovery["lr_max"],
            "max_steps": recovery["max_steps"],
            "max_calibration_batches": state["max_calibration_batches"],
        }

    def run(
        self, llm, state: dict[str, Any], effective: Effective, seed: int, anchored: bool
    ) -> Answer:
        """The next decision. A backend that can steer its decoding returns the model's most
        likely trial not run yet (:class:`Avoid`); a trial that was already run (same effective
        settings) is then re-asked once with that feedback, and a second repeat is answered by
        the default policy (reason ``repeat``)."""
        payload = self.turns(state)

        def default() -> MasterDecision:
            return self.heuristic(state, effective)

        tried = [t["effective"] for t in state["history"]]
        avoid = None
        if tried:
            avoid = Avoid(tried, lambda decision: self._repeats(decision, state, effective))
        limits, context = self.limits(state), self.context(state)
        answer = self.ask(
            llm, payload, default, seed, anchored, limits=limits, context=context, avoid=avoid
        )
        if not answer.from_llm or not self._repeats(answer.decision, state, effective):
            return answer
        feedback = [
            {"role": "assistant", "content": compact(answer.decision.model_dump())},
            {
                "role": "user",
                "content": "That strategy and recovery were already tried (see history): trials "
                "are deterministic, so it would give the same result. Reply with a different "
                "trial, or with action stop.",
            },
        ]
        again = self.ask(llm, payload, default, seed, anchored, feedback, limits, context)
        if again.from_llm and self._repeats(again.decision, state, effective):
            return Answer(again.default, again.default, "default", "repeat")
        return again

    @staticmethod
    def _repeats(decision: MasterDecision, state: dict[str, Any], effective: Effective) -> bool:
        """Whether ``decision`` asks for a trial already run (a stop repeats nothing)."""
        if decision.action == "stop" and state["history"]:
            return False
        return effective(decision) in [t["effective"] for t in state["history"]]


def _history_entry(trial: dict[str, Any]) -> dict[str, Any]:
    """One trial as the master sees it: what was run, what it measured and the evaluation
    agent's assessment (the loss and parameter count add nothing the accuracy and the achieved
    MACs fraction do not say, and cost prompt tokens)."""
    entry = {
        "trial": trial["trial"],
        "strategy": trial["strategy"],
        "recovery": trial["recovery_requested"],
    }
    if "val_top1" in trial:
        entry.update(
            achieved=trial["achieved"], val_top1=trial["val_top1"], **trial.get("assessment", {})
        )
    else:
        # The pruner's advice after ";" is for the user, not for the search.
        entry["error"] = trial.get("error", "failed").split(";")[0]
    return entry
