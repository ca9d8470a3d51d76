"""iCBS settings, free of torch imports so that planning stays cheap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

INITS = ("magnitude", "wanda", "gradient")
SELECTIONS = ("random", "magnitude", "gradient", "wanda")


@dataclass
class ICBSConfig:
    """iCBS settings (the ``icbs`` config section; ``plan.json``'s ``pruner``).

    Attributes:
        block_size: weights re-decided per step.
        pruned_per_block: of those, how many are currently pruned (None: half the block).
        init: initial scores (``magnitude``, ``wanda`` or ``gradient`` = |w * g|).
        init_per_row: compare initial scores within output rows instead of the layer.
        density: ``uniform`` (every layer at the target) or ``global`` (one threshold on the
            initial scores across layers, then each layer's count is kept).
        selection: block ranking (``random``, ``magnitude``, ``gradient``, ``wanda``).
        hessian: ``fisher`` (empirical, per-sample gradients) or ``exact`` (autograd).
        grad_multiplier: gamma of the first-order term.
        ridge: lambda of the ``||delta||^2`` term.
        tabu_frac: fraction of a layer's weights barred from blocks after being in one.
        fix_frac_prune: fraction of the lowest-scored weights always pruned.
        fix_frac_keep: fraction of the highest-scored weights always kept.
        steps: steps of the largest layer; a layer of n weights gets steps * log(n) / log(n_max).
        restarts: annealing restarts per block.
        beta_initial, beta_final, beta_factor, sweeps: the annealing schedule.
        calibration_batches: batches cycled through, one per step.
        include, exclude: module-name globs of the prunable layers.
    """

    block_size: int = 64
    pruned_per_block: int | None = None
    init: str = "magnitude"
    init_per_row: bool = False
    density: str = "uniform"
    selection: str = "magnitude"
    hessian: str = "fisher"
    grad_multiplier: float = 1.0
    ridge: float = 1e-4
    tabu_frac: float = 0.05
    fix_frac_prune: float = 0.0
    fix_frac_keep: float = 0.0
    steps: int = 16
    restarts: int = 4
    beta_initial: float = 1e-3
    beta_final: float = 100.0
    beta_factor: float = 1.1
    sweeps: int = 1
    calibration_batches: int = 8
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ICBSConfig:
        """Build from a plan's ``pruner``, with one-line errors for unknown keys and values."""
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"icbs settings have unknown keys: {sorted(unknown)}")
        cfg = cls(**raw)
        for key, allowed in (
            ("init", INITS),
            ("selection", SELECTIONS),
            ("hessian", ("fisher", "exact")),
            ("density", ("uniform", "global")),
        ):
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"icbs.{key}={getattr(cfg, key)!r} is not one of {allowed}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)
