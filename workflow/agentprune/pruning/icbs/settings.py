"""iCBS settings, free of torch imports so that planning stays cheap."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

INITS = ("magnitude", "wanda", "gradient")
SELECTIONS = ("random", "magnitude", "gradient", "wanda")
SCHEDULES = ("layers", "rounds")


@dataclass
class ICBSConfig:
    """iCBS settings (the ``icbs`` config section; ``plan.json``'s ``pruner``). Every field is
    required: the schema holds the defaults.

    Attributes:
        block_size: weights re-decided together per block update (the QUBO size).
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
        steps: steps of the largest layer; a layer of n weights gets steps * log(n) / log(n_max)
            (0: no search, the initial mask). A step is one forward/backward pass on
            ``batches_per_step`` calibration batches followed by ``blocks_per_step`` block
            updates.
        batches_per_step: calibration batches joined into each step's pass (the samples of its
            gradient and Fisher), cycling through the ``calibration_batches``.
        blocks_per_step: block updates per step, all from the step's pass (the later ones see
            the earlier ones' changes through the Fisher model of the loss).
        schedule: ``layers`` (layer after layer, a pass per step of each layer) or ``rounds``
            (round r is one pass shared by every layer's step r; far fewer passes).
        restarts: annealing restarts per block.
        beta_initial, beta_final, beta_factor, sweeps: the annealing schedule.
        calibration_batches: calibration batches, cycled through by the steps.
        include, exclude: module-name globs of the prunable layers.
    """

    block_size: int
    pruned_per_block: int | None
    init: str
    init_per_row: bool
    density: str
    selection: str
    hessian: str
    grad_multiplier: float
    ridge: float
    tabu_frac: float
    fix_frac_prune: float
    fix_frac_keep: float
    steps: int
    blocks_per_step: int
    batches_per_step: int
    schedule: str
    restarts: int
    beta_initial: float
    beta_final: float
    beta_factor: float
    sweeps: int
    calibration_batches: int
    include: list[str]
    exclude: list[str]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ICBSConfig:
        """Build from a plan's ``pruner``, with one-line errors for unknown keys and values."""
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"icbs settings have unknown keys: {sorted(unknown)}")
        missing = set(cls.__dataclass_fields__) - set(raw)
        if missing:
            raise ValueError(f"icbs settings lack keys: {sorted(missing)}")
        cfg = cls(**raw)
        for key, allowed in (
            ("init", INITS),
            ("selection", SELECTIONS),
            ("hessian", ("fisher", "exact")),
            ("density", ("uniform", "global")),
            ("schedule", SCHEDULES),
        ):
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"icbs.{key}={getattr(cfg, key)!r} is not one of {allowed}")
        for key in ("blocks_per_step", "batches_per_step"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"icbs.{key} must be an integer >= 1, got {value!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)
