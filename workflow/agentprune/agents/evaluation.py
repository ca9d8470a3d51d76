"""The evaluation agent: measures a trial's proxy accuracy on the validation split (never the test
split) and sets it against the base model and the best trial so far. Its assessment joins the
history the master reads before deciding whether to go on; it makes no LLM call of its own (the
master's verdict is the LLM's judgement of the measured history)."""

from __future__ import annotations

from typing import Any


def measure(model, val_set, batch_size: int) -> dict[str, float]:
    """Proxy top-1 (percent) and loss on the validation split."""
    from agentprune import evaluate

    result = evaluate.accuracy(model, val_set, batch_size)
    return {"val_top1": result["top1"], "val_loss": result["loss"]}


class EvaluationAgent:
    """Measures trials and assesses them in numbers."""

    name = "evaluation"

    def assess(self, val_top1: float, base_val_top1: float, best: float | None) -> dict[str, Any]:
        """The drop from the base model and the gain over the best trial so far (points)."""
        return {
            "drop_from_base": round(base_val_top1 - val_top1, 4),
            "gain_over_best": None if best is None else round(val_top1 - best, 4),
        }
