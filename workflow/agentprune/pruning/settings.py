"""The pruner settings of a structured plan (``plan.json``'s ``pruner``), free of torch imports so
that planning and config checks stay cheap."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

IMPORTANCES = ("taylor", "magnitude_l1", "magnitude_l2", "random")
ATTENTION_SCALES = ("keep", "recompute")
# How a structured plan meets its target: search the global knob until the MACs land in the window
# (the study default), or prune once at the recipe's own ratios and report what results.
MODES = ("macs_targeted", "as_published")
# Block sequences remove_blocks can shorten: those a timm depth override can rebuild.
BLOCK_PATHS = r"blocks|stages\.-?\d+\.blocks"

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
        head_dim_ratio_scale: head-dim pruning ratio as a multiple of the searched ratio, given to
            all attention ``qkv`` layers together through Torch-Pruning's ``pruning_ratio_dict``
            (one ranking scope over every head dim of the model); None: head dims are ranked with
            the other channels at the searched ratio.
        pruning_ratio: the recipe's own global ratio. ``as_published`` prunes at exactly this
            ratio; ``macs_targeted`` starts its search here. None: no recipe ratio (the search
            scans up from ``coarse_step``).
        remove_blocks: module name of an ``nn.Sequential`` of blocks -> how many of its blocks to
            remove after width pruning, the lowest mean |weight x grad| first (Isomorphic-Pruning's
            ``--remove-layers``; ``blocks`` of a ViT or ``stages.<i>.blocks`` of a ConvNeXt, ``i``
            may count from the end like ``stages[-2]``; needs Taylor gradients).
        scope_ratios: module-name glob -> multiple of the searched ratio (per-scope ratios).
        scope_max_ratio: module-name glob -> upper bound on the ratio of the layers that
            ``scope_ratios`` pins (per-kind safety bounds).
        round_to: keep channel counts multiples of this (None: free).
        ignored: module-name globs never pruned (the classifier is always ignored).
        topup_scopes: module-name globs pruned by the top-up stage when the global knob cannot land
            within tolerance (ranked with this importance, ``global_pruning`` and ``isomorphic``;
            the prune report's ``search.topup`` records a run that needed it).
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
    head_dim_ratio_scale: float | None = None
    pruning_ratio: float | None = None
    remove_blocks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrunerSettings:
        """Build from a plan's ``pruner`` dict, rejecting unknown keys and bad values."""
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise PruningError(f"plan.pruner has unknown keys: {sorted(unknown)}")
        settings = cls(**raw)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise :class:`PruningError` naming the first value a prune cannot use."""
        if self.importance not in IMPORTANCES:
            raise PruningError(
                f"plan.pruner.importance={self.importance!r} is not one of {IMPORTANCES}"
            )
        if self.attention_scale not in ATTENTION_SCALES:
            raise PruningError(
                f"plan.pruner.attention_scale={self.attention_scale!r} is not one of "
                f"{ATTENTION_SCALES}"
            )
        if self.pruning_ratio is not None and not 0.0 < self.pruning_ratio < 1.0:
            raise PruningError(f"plan.pruner.pruning_ratio={self.pruning_ratio} is not in (0, 1)")
        if self.head_dim_ratio_scale is not None and self.head_dim_ratio_scale <= 0:
            # Torch-Pruning 1.6.1 removes heads only inside scopes that prune some dims, so a
            # zero head-dim ratio would silently keep every head as well.
            raise PruningError(
                f"plan.pruner.head_dim_ratio_scale={self.head_dim_ratio_scale} is not > 0 "
                "(use null to rank head dims with the other channels)"
            )
        for path, count in self.remove_blocks.items():
            if not re.fullmatch(BLOCK_PATHS, path):
                raise PruningError(
                    f"plan.pruner.remove_blocks key {path!r} is neither 'blocks' (ViT) nor "
                    "'stages.<i>.blocks' (ConvNeXt)"
                )
            if not isinstance(count, int) or count < 1:
                raise PruningError(
                    f"plan.pruner.remove_blocks[{path!r}]={count!r} is not a positive block count"
                )
        if self.remove_blocks and self.importance != "taylor":
            raise PruningError(
                "plan.pruner.remove_blocks ranks blocks by |weight x grad| and needs importance "
                f"'taylor', not {self.importance!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)
