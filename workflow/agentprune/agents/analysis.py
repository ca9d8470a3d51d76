"""The analysis agent: turns the master's strategy into concrete pruner settings, clamped to the
safety bounds. It makes no LLM call: it is the layer that keeps LLM output inside the bounds."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from agentprune.agents.schemas import Strategy
from agentprune.agents.settings import AgentsSettings
from agentprune.pruning.settings import GROUP_KINDS, PrunerSettings

SCOPES: dict[str, tuple[str, ...]] = {kind: globs for kind, globs in GROUP_KINDS}
"""Kind -> module-name globs of the layers an allocation pins (the profile's group kinds)."""


@dataclass
class Bounds:
    """The safety bounds of one run.

    Attributes:
        max_ratio: group kind -> the largest pruning ratio allowed for that kind.
        protect_factor: multiplier applied to the bounds of the kinds the profiling agent
            protects.
        max_calibration_batches: upper bound on the calibration batches of a trial.
        default_ratio: the bound of kinds neither the profile nor the config names.
    """

    max_ratio: dict[str, float]
    protect_factor: float
    max_calibration_batches: int
    default_ratio: float

    def cap(self, kind: str, protect: list[str]) -> float:
        """The bound of ``kind``, tightened when it is protected."""
        bound = float(self.max_ratio.get(kind, self.default_ratio))
        return bound * self.protect_factor if kind in protect else bound


def run_bounds(
    profile: dict[str, Any], settings: AgentsSettings, dataset: str, model: str, timm: str
) -> Bounds:
    """The bounds of one run: the profile's measured bounds, tightened by every
    ``agents.bounds`` entry whose ``match`` glob matches ``dataset/model`` or the timm name."""
    measured = dict(profile["safety_bounds"]["max_ratio"])
    for entry in settings.bounds:
        pattern = entry["match"]
        if not (fnmatch.fnmatch(f"{dataset}/{model}", pattern) or fnmatch.fnmatch(timm, pattern)):
            continue
        for kind, value in entry["max_ratio"].items():
            measured[kind] = min(float(value), float(measured.get(kind, 1.0)))
    ceiling = settings.max_ratio
    return Bounds(
        max_ratio={k: min(ceiling, v) for k, v in measured.items()},
        protect_factor=settings.protect_factor,
        max_calibration_batches=settings.max_calibration_batches,
        default_ratio=ceiling,
    )


def kind_caps(
    kinds: list[str], protect: list[str], bounds: Bounds, heads_per_layer: list[int] | None
) -> dict[str, float]:
    """The effective bound of every kind of this model (protection applied).

    Torch-Pruning removes ``total - floor(total * (1 - ratio))`` heads, so any positive head
    ratio removes a whole head: the heads bound is rounded down to whole heads of the layer with
    the fewest.
    """
    caps = {kind: bounds.cap(kind, protect) for kind in kinds}
    if "heads" in caps and heads_per_layer:
        fewest = min(heads_per_layer)
        caps["heads"] = int(caps["heads"] * fewest + 1e-9) / fewest
    return caps


class AnalysisAgent:
    """Strategy -> :class:`PrunerSettings`, with every value outside the bounds clamped and
    recorded."""

    name = "analysis"

    def run(
        self,
        strategy: Strategy,
        target: float,
        kinds: list[str],
        protect: list[str],
        bounds: Bounds,
        overrides: dict[str, Any],
        heads_per_layer: list[int] | None = None,
    ) -> tuple[PrunerSettings, list[dict[str, Any]]]:
        """Concrete settings for one trial.

        Args:
            strategy: the master's strategy.
            target: the MACs fraction to remove (anticipated ratio for the clamps).
            kinds: group kinds this model has (the profile's sensitivity kinds).
            protect: kinds the profiling agent protects.
            bounds: the run's safety bounds.
            overrides: ``method_settings.multi_agent`` (the user's word is final).
            heads_per_layer: attention heads of each layer (the profile's ``num_heads``).

        Returns:
            The settings and the clamps applied, each ``{agent, field, requested, applied,
            bound, reason}``.
        """
        clamps: list[dict[str, Any]] = []

        def clamp(name: str, value: float, low: float, high: float, reason: str) -> float:
            applied = min(high, max(low, value))
            if applied != value:
                clamps.append(
                    {
                        "agent": self.name,
                        "field": name,
                        "requested": value,
                        "applied": applied,
                        "bound": high if value > high else low,
                        "reason": reason,
                    }
                )
            return applied

        caps = kind_caps(kinds, protect, bounds, heads_per_layer)
        anticipated = max(target, 1e-6)
        has_heads = "heads" in kinds
        heads = strategy.heads if has_heads else 0.0
        if has_heads and caps["heads"] == 0.0 and heads > 0:
            clamp("strategy.heads", heads, 0.0, 0.0, "the heads bound is below one head")
            heads = 0.0
        if has_heads and heads > 0:
            heads = clamp(
                "strategy.heads",
                heads,
                0.0,
                caps["heads"] / anticipated,
                f"heads bound {caps['heads']:.3f} at target {target}",
            )
        scope_ratios: dict[str, float] = {}
        scope_max: dict[str, float] = {}
        pinned: set[str] = set()
        if strategy.allocation is not None:
            for kind, scale in strategy.allocation.model_dump().items():
                if kind not in kinds:
                    continue
                scale = clamp(
                    f"strategy.allocation.{kind}",
                    scale,
                    0.0,
                    caps[kind] / anticipated,
                    f"{kind} bound {caps[kind]:.3f} at target {target}",
                )
                pinned.add(kind)
                for glob in SCOPES[kind]:
                    scope_ratios[glob] = scale
                    scope_max[glob] = caps[kind]
        ranked = [caps[k] for k in kinds if k not in pinned and k != "heads"]
        max_ratio = min(ranked) if ranked else max(caps.values(), default=bounds.default_ratio)
        calib = int(
            clamp(
                "strategy.calibration_batches",
                strategy.calibration_batches,
                1,
                bounds.max_calibration_batches,
                "agents.max_calibration_batches",
            )
        )
        settings = PrunerSettings.from_dict(
            {
                "importance": strategy.importance,
                "global_pruning": strategy.grouping != "uniform",
                "isomorphic": strategy.grouping == "isomorphic",
                "prune_num_heads": heads > 0,
                "prune_head_dims": True,
                "head_ratio_scale": heads,
                "scope_ratios": scope_ratios,
                "scope_max_ratio": scope_max,
                "round_to": None if strategy.round_to == 1 else int(strategy.round_to),
                "calibration_batches": calib,
                "max_pruning_ratio": max_ratio,
                "max_head_ratio": caps.get("heads", 0.0),
                **overrides,
            }
        )
        return settings, clamps
