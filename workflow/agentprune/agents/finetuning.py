"""The fine-tuning agent: runs a trial's short recovery on the calibration split, with the
schedule the master chose, clamped to ``agents.recovery``. It makes no LLM call of its own: the
schedule is part of the master's decision (one call per trial instead of two)."""

from __future__ import annotations

import math
from typing import Any

from agentprune.agents.schemas import Recovery


class FinetuningAgent:
    """Clamps and runs the recovery schedule of a trial."""

    name = "finetuning"

    def run(
        self, requested: Recovery, recovery: dict[str, Any]
    ) -> tuple[Recovery, list[dict[str, Any]]]:
        """The clamped schedule and the clamps applied."""
        clamps = []
        lr = min(float(recovery["lr_max"]), max(float(recovery["lr_min"]), requested.lr))
        steps = min(int(recovery["max_steps"]), max(0, requested.steps))
        for name, asked, applied, low, high in (
            ("lr", requested.lr, lr, recovery["lr_min"], recovery["lr_max"]),
            ("steps", requested.steps, steps, 0, recovery["max_steps"]),
        ):
            if asked != applied:
                clamps.append(
                    {
                        "agent": self.name,
                        "field": f"recovery.{name}",
                        "requested": asked,
                        "applied": applied,
                        "bound": high if asked > high else low,
                        "reason": f"agents.recovery bounds [{low}, {high}]",
                    }
                )
        return Recovery(lr=lr, steps=steps), clamps


# The recovery's fixed recipe besides lr, steps and weight decay: plain AdamW with label smoothing
# on the calibration batches, fp32, nothing else (a few dozen steps; not configurable).
RECOVERY_RECIPE = {
    "label_smoothing": 0.1,
    "warmup_fraction": 0.0,
    "distill": {
        "enabled": False,
        "alpha": 0.5,
        "temperature": 2.0,
        "kind": "soft",
        "teacher": None,
    },
    "augment": False,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "randaug": None,
    "random_erase": 0.0,
    "drop_path": 0.0,
    "ema": None,
    "amp": "auto",
    "channels_last": "auto",
    "compile": False,
    "workers": 0,
    "resume": False,
}


def recover(model, batches, lr: float, steps: int, seed: int, weight_decay: float) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps cycling over ``batches``."""
    import torch
    from torch.utils.data import TensorDataset

    from agentprune import train
    from agentprune.settings import TrainConfig

    if steps <= 0 or not batches:
        return {"steps": 0, "seconds": 0.0, "final_loss": float("nan")}
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    batch_size = len(batches[0][0])
    per_epoch = math.ceil(len(xs) / batch_size)
    cfg = TrainConfig(
        epochs=steps / per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        **RECOVERY_RECIPE,
    )
    report = train.train(model, TensorDataset(xs, ys), cfg, seed=seed, progress=False)
    return {k: report[k] for k in ("steps", "seconds", "final_loss")}
