"""The pruner settings of a structured plan (``plan.json``'s ``pruner``), free of torch imports so
that planning and config checks stay cheap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMPORTANCES = ("taylor", "magnitude_l1", "magnitude_l2", "random")

# Group kinds ranked by the sensitivity analysis, identified by the group's root module name.
GROUP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("*attn.qkv",)),
    ("mlp", ("*mlp.fc1",)),
    ("residual", ("patch_embed.proj", "stem.*", "stages.*.downsample.*")),
    ("conv", ("*conv*",)),
)


class PruningError(RuntimeError):
    """A plan cannot be carried out on this model."""


class TargetOutOfReach(PruningError):
    """No pruning ratio allowed by the settings' bounds removes enough MACs."""


@dataclass
class PrunerSettings:
    """The pruner part of ``plan.json`` (see DESIGN.md).

    Attributes:
        importance: one of ``IMPORTANCES``.
        global_pruning: rank all groups together (True) or prune every layer by the same
            ratio (False).
        isomorphic: rank within isomorphic groups only (Isomorphic Pruning, ECCV'24).
        prune_num_heads: remove whole attention heads.
        prune_head_dims: remove channels inside every head.
        head_ratio_scale: head pruning ratio as a multiple of the searched pruning ratio.
        scope_ratios: module-name glob -> multiple of the searched ratio (per-scope ratios).
        scope_max_ratio: module-name glob -> upper bound on the ratio of the layers that
            ``scope_ratios`` pins (per-kind safety bounds).
        round_to: keep channel counts multiples of this (None: free).
        ignored: module-name globs never pruned (the classifier is always ignored).
        topup_scopes: module-name globs pruned by the top-up stage when the global knob cannot land
            within tolerance.
        calibration_batches: batches used for Taylor gradients.
        max_pruning_ratio: upper bound on any layer's pruning ratio (a safety bound).
        max_head_ratio: upper bound on the fraction of attention heads removed.
        coarse_step: step of the upward scan that brackets the target before bisection.
        attention_scale: ``keep`` the trained softmax scale of pruned heads, or ``recompute``
            it from the new head dim.
    """

    importance: str = "magnitude_l2"
    global_pruning: bool = True
    isomorphic: bool = False
    prune_num_heads: bool = False
    prune_head_dims: bool = True
    head_ratio_scale: float = 0.0
    scope_ratios: dict[str, float] = field(default_factory=dict)
    scope_max_ratio: dict[str, float] = field(default_factory=dict)
    round_to: int | None = None
    ignored: list[str] = field(default_factory=list)
    topup_scopes: list[str] = field(default_factory=lambda: ["*mlp.fc1"])
    calibration_batches: int = 4
    max_pruning_ratio: float = 0.9
    max_head_ratio: float = 0.5
    coarse_step: float = 0.1
    attention_scale: str = "keep"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrunerSettings:
        """Build from a plan's ``pruner`` dict, rejecting unknown keys and importances."""
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise PruningError(f"plan.pruner has unknown keys: {sorted(unknown)}")
        settings = cls(**raw)
        if settings.importance not in IMPORTANCES:
            raise PruningError(
                f"plan.pruner.importance={settings.importance!r} is not one of {IMPORTANCES}"
            )
        return settings

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)
