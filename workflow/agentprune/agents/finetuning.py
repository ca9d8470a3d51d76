"""The fine-tuning agent: a short recovery run of a trial on the calibration split; the LLM picks
the learning rate and the number of steps within bounds."""

from __future__ import annotations

import math
from typing import Any

from agentprune.agents.base import LLMAgent
from agentprune.agents.schemas import FinetuneDecision


class FinetuningAgent(LLMAgent):
    """Chooses and runs the recovery schedule of a trial."""

    name = "finetuning"
    decision = FinetuneDecision
    role = (
        "You are the fine-tuning agent of a pruning system. A model was just pruned; choose a "
        "short recovery schedule on a small calibration set: lr (AdamW learning rate, e.g. "
        "0.0005 to 0.005) and steps (optimizer steps, within max_steps). More steps recover more "
        "accuracy but cost time."
    )

    def heuristic(self, recovery: dict[str, Any]) -> FinetuneDecision:
        """The configured default schedule."""
        return FinetuneDecision(
            lr=float(recovery["lr"]),
            steps=int(recovery["steps"]),
            rationale="configured default recovery schedule",
        )

    def run(
        self, llm, trial: dict[str, Any], recovery: dict[str, Any], seed: int
    ) -> tuple[FinetuneDecision, list[dict[str, Any]]]:
        """The clamped schedule and the clamps applied."""
        payload = {
            "target_macs_fraction_removed": trial["target"],
            "achieved": trial.get("achieved"),
            "max_steps": int(recovery["max_steps"]),
        }
        decision, _ = self.ask(llm, payload, lambda: self.heuristic(recovery), seed)
        clamps = []
        lr = min(float(recovery["lr_max"]), max(float(recovery["lr_min"]), decision.lr))
        steps = min(int(recovery["max_steps"]), max(0, decision.steps))
        for name, requested, applied, low, high in (
            ("lr", decision.lr, lr, recovery["lr_min"], recovery["lr_max"]),
            ("steps", decision.steps, steps, 0, recovery["max_steps"]),
        ):
            if requested != applied:
                clamps.append(
                    {
                        "agent": self.name,
                        "field": name,
                        "requested": requested,
                        "applied": applied,
                        "bound": high if requested > high else low,
                        "reason": f"agents.recovery bounds [{low}, {high}]",
                    }
                )
        return decision.model_copy(update={"lr": lr, "steps": steps}), clamps


def recover(model, batches, lr: float, steps: int, seed: int, weight_decay: float = 0.05) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps cycling over ``batches``."""
    import torch
    from torch.utils.data import TensorDataset

    from agentprune import train

    if steps <= 0 or not batches:
        return {"steps": 0, "seconds": 0.0, "final_loss": float("nan")}
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    batch_size = len(batches[0][0])
    per_epoch = math.ceil(len(xs) / batch_size)
    cfg = train.TrainConfig(
        epochs=steps / per_epoch, lr=lr, weight_decay=weight_decay, batch_size=batch_size
    )
    report = train.train(model, TensorDataset(xs, ys), cfg, seed=seed, progress=False)
    return {k: report[k] for k in ("steps", "seconds", "final_loss")}
