"""The typed settings of the agent-planned methods (built from the ``agents``, ``prune``,
``profile`` and ``evaluate`` sections by ``MultiAgent.resolve_settings``); free of heavy
imports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentprune.agents.llm_settings import LLMSettings
from agentprune.settings import SearchSettings


@dataclass(frozen=True)
class RecoverySettings:
    """``agents.recovery``: the default recovery of a trial and what the LLM may choose."""

    lr: float
    steps: int
    lr_min: float
    lr_max: float
    max_steps: int
    batches: int
    weight_decay: float


@dataclass(frozen=True)
class AgentsSettings:
    """Everything the multi-agent loop reads.

    Attributes:
        llm: how to reach the LLM; None for the loop without an LLM (``agents_heuristic``).
        anchor_default: show the default policy's decision in the prompts.
        max_fallback_share: the share of failed LLM decisions above which a plan fails.
        allow_fallback: let the default policy answer instead of failing.
        max_iterations: most trials.
        min_improvement: validation top-1 points a trial must add to go on.
        max_ratio: ceiling on every kind's bound.
        protect_factor: multiplier on the bounds of protected kinds.
        max_calibration_batches: most Taylor batches a trial may use.
        bounds: ``agents.bounds`` entries (``match`` glob, ``max_ratio`` per kind).
        recovery: the recovery settings.
        max_loss_increase: ``profile.max_loss_increase`` (what the profiling policy protects).
        calibration_batches: ``prune.calibration_batches`` (the default policy's Taylor batches).
        search: the MACs search of every trial (``prune``), as the prune step will run it.
        eval_batch: ``evaluate.batch_size`` (the proxy evaluation).
        overrides: ``method_settings.<method>``: pruner settings the user fixes for every trial.
    """

    llm: LLMSettings | None
    anchor_default: bool
    max_fallback_share: float
    allow_fallback: bool
    max_iterations: int
    min_improvement: float
    max_ratio: float
    protect_factor: float
    max_calibration_batches: int
    bounds: list[dict[str, Any]]
    recovery: RecoverySettings
    max_loss_increase: float
    calibration_batches: int
    search: SearchSettings
    eval_batch: int
    overrides: dict[str, Any]
