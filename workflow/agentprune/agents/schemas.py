"""Pydantic models of every LLM decision.

The JSON schema of each model is sent to the LLM as the structured-output constraint, and every
reply is validated against the model before any agent reads it. A reply of the wrong shape (a
missing key, a negative ratio, an unknown criterion) is a schema violation and is re-asked. Numbers
of the right shape but out of range are not: the analysis and fine-tuning agents clamp them to the
safety bounds and record each clamp, so the LLM's decision still counts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Kind = Literal["heads", "attention", "mlp", "conv", "residual"]
"""Group kinds of ``profile.json``'s sensitivity analysis (``heads``: whole attention heads)."""


class Decision(BaseModel):
    """Base of every decision: unknown keys are a schema violation, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ProfilingDecision(Decision):
    """The profiling agent's reading of ``profile.json``."""

    risks: list[Annotated[str, StringConstraints(max_length=80)]] = Field(
        max_length=3, description="short statements of what could break when pruning this model"
    )
    protect: list[Kind] = Field(
        max_length=5, description="group kinds to prune less than the rest (most sensitive first)"
    )


class Allocation(Decision):
    """Pruning ratio of each group kind as a multiple of the searched global ratio."""

    attention: float = Field(ge=0.0, description="qkv/head-dim channels, typically 0 to 2")
    mlp: float = Field(ge=0.0, description="MLP hidden units, typically 0 to 2")
    residual: float = Field(ge=0.0, description="residual-stream channels, typically 0 to 2")


class Strategy(Decision):
    """The master agent's strategy for one trial."""

    importance: Literal["taylor", "magnitude_l2", "magnitude_l1"] = Field(
        description="channel importance criterion"
    )
    grouping: Literal["isomorphic", "global", "uniform"] = Field(
        description="rank channels within isomorphic groups, globally, or prune every layer alike"
    )
    heads: float = Field(
        ge=0.0, description="head pruning ratio as a multiple of the ratio (0 keeps heads)"
    )
    allocation: Allocation | None = Field(
        description="per-kind ratio multiples; null lets the ranking allocate"
    )
    round_to: Literal[1, 2, 4, 8] = Field(description="keep channel counts multiples of this")
    calibration_batches: int = Field(ge=1, description="batches for Taylor gradients, 1 to 16")


class MasterDecision(Decision):
    """The master agent's choice: the next trial's strategy, or stop."""

    action: Literal["continue", "stop"]
    strategy: Strategy
    rationale: str = Field(max_length=120)


class FinetuneDecision(Decision):
    """The fine-tuning agent's recovery schedule for one trial."""

    lr: float = Field(gt=0.0, description="AdamW learning rate")
    steps: int = Field(ge=0, description="optimizer steps on the calibration split")
    rationale: str = Field(max_length=120)


class EvaluationDecision(Decision):
    """The evaluation agent's assessment of one measured trial."""

    acceptable: bool = Field(description="whether this trial is worth keeping")
    assessment: str = Field(max_length=120)


DECISIONS: dict[str, type[Decision]] = {
    "profiling": ProfilingDecision,
    "master": MasterDecision,
    "finetuning": FinetuneDecision,
    "evaluation": EvaluationDecision,
}
"""Agent name -> the decision it asks the LLM for (analysis and pruning make no LLM call)."""
