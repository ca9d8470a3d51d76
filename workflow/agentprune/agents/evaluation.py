"""The evaluation agent: measures a trial's proxy accuracy on the validation split (never the test
split) and asks the LLM to assess it."""

from __future__ import annotations

from typing import Any

from agentprune.agents.base import LLMAgent
from agentprune.agents.schemas import EvaluationDecision


def measure(model, val_set, batch_size: int) -> dict[str, float]:
    """Proxy top-1 (percent) and loss on the validation split."""
    from agentprune import evaluate

    result = evaluate.accuracy(model, val_set, batch_size)
    return {"val_top1": result["top1"], "val_loss": result["loss"]}


class EvaluationAgent(LLMAgent):
    """Assesses measured trials; the assessment joins the history the master reads."""

    name = "evaluation"
    decision = EvaluationDecision
    role = (
        "You are the evaluation agent of a pruning system. Given a trial's strategy, its "
        "validation accuracy (val_top1, percent) and loss after a short recovery, and the best "
        "trial so far, say whether it is acceptable and assess it in one or two sentences."
    )

    def heuristic(self, trial: dict[str, Any], best: float | None) -> EvaluationDecision:
        """Acceptable when it matches or beats the best trial so far."""
        ok = best is None or trial["val_top1"] >= best
        text = f"val top-1 {trial['val_top1']:.2f}% vs best {best if best is not None else 'none'}"
        return EvaluationDecision(acceptable=ok, assessment=text)

    def run(self, llm, trial: dict[str, Any], best: float | None, seed: int) -> EvaluationDecision:
        """The assessment of ``trial`` (which holds ``val_top1`` and ``val_loss``)."""
        payload = {
            "strategy": trial["strategy"],
            "achieved": trial.get("achieved"),
            "val_top1": trial["val_top1"],
            "val_loss": trial["val_loss"],
            "best_val_top1_so_far": best,
        }
        decision, _ = self.ask(llm, payload, lambda: self.heuristic(trial, best), seed)
        return decision
