"""Pydantic models of every LLM decision.

The JSON schema of each model is sent to the LLM as the structured-output constraint, and every
reply is validated against the model before any agent reads it. A reply of the wrong shape (a
missing key, a negative ratio, an unknown criterion) is a schema violation and is re-asked. Numbers
of the right shape but out of range are not: the analysis and fine-tuning agents clamp them to the
safety bounds and record each clamp, so the LLM's decision still counts.

Every field has a short description with its range or enum (numbers the LLM picks from a menu,
see :func:`menu`): the prompt lists them, so the model knows what each value means without being
shown an example answer. ``{name}`` placeholders in a
description are the run's own limits (``agents.recovery``, ``agents.max_calibration_batches``),
filled in by the agent that asks.

Two agents ask the LLM: profiling (once per plan) and master (once per trial). The master's
decision carries the trial's pruning strategy, its recovery schedule (run by the fine-tuning
agent) and, after the first trial, its verdict on the measured history (continue or stop), so
that no call is made whose answer nothing reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MULTIPLES = (0.5, 0.75, 1.0, 1.25, 1.5)
"""The allocation multiples an LLM chooses from (lower protects a kind)."""
HEAD_MULTIPLES = (0.0, 0.5, 1.0, 1.5, 2.0)
"""The head-ratio multiples an LLM chooses from."""
CALIBRATION_BATCHES = (1, 2, 4, 8, 16)
LEARNING_RATES = (0.0001, 0.0003, 0.001, 0.003, 0.01)
RECOVERY_STEPS = (0, 10, 20, 30, 50)


def menu(values: tuple[float, ...]) -> dict:
    """A number field's menu for the LLM: its JSON schema lists ``values`` as an enum (the
    structured-output grammar then only samples one of them, which keeps a small model's numbers
    sane and its replies short), while validation accepts any number in range, so that a default
    policy's configured value, or a server that ignores the schema, still validates (and is
    clamped)."""
    return {"json_schema_extra": {"enum": list(values)}}


Kind = Literal["heads", "attention", "mlp", "conv", "residual"]
"""Group kinds of ``profile.json``'s sensitivity analysis (``heads``: whole attention heads)."""


class Decision(BaseModel):
    """Base of every decision: unknown keys are a schema violation, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    def acting_fields(self) -> dict[str, Any]:
        """The part of the decision that changes what the loop does (free text left out): two
        decisions are the same decision when these are equal."""
        return self.model_dump()


class ProfilingDecision(Decision):
    """The profiling agent's reading of ``profile.json``."""

    risks: list[Annotated[str, StringConstraints(max_length=60)]] = Field(
        max_length=2,
        description="up to 2 short statements of what could break when pruning this model "
        "(the master agent reads them)",
    )
    protect: list[Kind] = Field(
        max_length=5,
        description="kinds to prune less, most sensitive first (their bounds are tightened)",
    )

    def acting_fields(self) -> dict[str, Any]:
        return {"protect": list(self.protect)}


class Allocation(Decision):
    """Pruning ratio of each group kind as a multiple of the searched global ratio."""

    attention: float = Field(ge=0.0, description="qkv channels", **menu(MULTIPLES))
    mlp: float = Field(ge=0.0, description="MLP hidden units", **menu(MULTIPLES))
    residual: float = Field(ge=0.0, description="residual channels", **menu(MULTIPLES))


class Strategy(Decision):
    """The master agent's pruning strategy for one trial."""

    importance: Literal["taylor", "magnitude_l2", "magnitude_l1"] = Field(
        description="taylor uses calibration gradients, magnitudes use weights only"
    )
    grouping: Literal["isomorphic", "global", "uniform"] = Field(
        description="rank within isomorphic groups, globally, or prune each layer alike"
    )
    heads: float = Field(
        ge=0.0,
        description="head ratio as a multiple of the channel ratio (0 keeps every head)",
        **menu(HEAD_MULTIPLES),
    )
    allocation: Allocation | None = Field(
        description="ratio multiples per kind (lower protects), or null"
    )
    round_to: Literal[1, 2, 4, 8] = Field(description="channel counts stay multiples of this")
    calibration_batches: int = Field(
        ge=1,
        description="batches for taylor (at most {max_calibration_batches})",
        **menu(CALIBRATION_BATCHES),
    )


class Recovery(Decision):
    """The short recovery run of one trial (run by the fine-tuning agent, clamped to
    ``agents.recovery``)."""

    lr: float = Field(
        gt=0.0, description="AdamW learning rate ({lr_min} to {lr_max})", **menu(LEARNING_RATES)
    )
    steps: int = Field(
        ge=0, description="optimizer steps (at most {max_steps})", **menu(RECOVERY_STEPS)
    )


class MasterDecision(Decision):
    """The master agent's choice: the next trial (strategy and recovery), or stop."""

    action: Literal["continue", "stop"] = Field(
        description="stop ends the search and keeps the best trial so far"
    )
    strategy: Strategy = Field(description="how the next trial prunes")
    recovery: Recovery = Field(description="the next trial's short fine-tuning")

    def acting_fields(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "strategy": self.strategy.model_dump(),
            "recovery": self.recovery.model_dump(),
        }

    def trial_plan(self) -> dict[str, Any]:
        """What a trial runs (its identity for repeat detection): strategy and recovery."""
        return {"strategy": self.strategy.model_dump(), "recovery": self.recovery.model_dump()}


DECISIONS: dict[str, type[Decision]] = {
    "profiling": ProfilingDecision,
    "master": MasterDecision,
}
"""Agent name -> the decision it asks the LLM for (analysis, pruning, fine-tuning and evaluation
make no LLM call: they clamp, prune, recover and measure what the master decided)."""
