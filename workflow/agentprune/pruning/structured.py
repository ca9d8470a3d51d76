"""Structured pruning through Torch-Pruning: plan settings -> pruner, MACs-target search, timm
fix-ups.

The search treats the pruner's global ``pruning_ratio`` as a knob; the head ratio and the head-dim
ratio are fixed multiples of it (``head_ratio_scale``, ``head_dim_ratio_scale``), so one knob
scales a recipe in its own proportions. A scan brackets the target (upward from ``coarse_step``,
or around the recipe's own ``pruning_ratio``) and an interpolation/bisection search narrows the
bracket until the MACs land in the window (:func:`search_ratio`): ``tolerance`` of the base MACs
for a fractional target, ``gmacs_tolerance`` of the target itself for a target given in GMACs.
Importance scores are computed once per run (Taylor gradients on the calibration batches,
magnitudes, or seeded random scores) and cached by group, so every trial ranks channels
identically. When the channel granularity makes the MACs curve jump over the window, a second
"top-up" search prunes a few more channels from the finest-grained layers (MLP hidden units by
default) of the best model below the target, with the method's own importance and ranking; the
report records it (``search.topup``). ``as_published`` mode prunes once at the recipe's ratios
instead and reports where that lands.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentprune.pruning.settings import (
    IMPORTANCES,
    MODES,
    PrunerSettings,
    PruningError,
    TargetOutOfReach,
)

__all__ = ["IMPORTANCES", "PrunerSettings", "PruningError", "prune_to_target"]


def _base_importance(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude_l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "magnitude_l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    return tp.importance.RandomImportance()


class CachedImportance:
    """Wraps a Torch-Pruning importance and memoises its scores by group, keyed by module names.

    Every search trial prunes a fresh copy of the same base model, so the same group (by module
    names and pruning functions) recurs; its scores are computed on the first trial only.
    """

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.seed = seed
        self.inner = _base_importance(name)
        self.cache: dict[tuple, torch.Tensor | None] = {}
        self.names: dict[nn.Module, str] = {}
        self.computed = 0

    def bind(self, model: nn.Module) -> None:
        """Use ``model``'s module names for the cache keys of the next trial."""
        self.names = {m: n for n, m in model.named_modules()}

    def __call__(self, group, **kwargs) -> torch.Tensor | None:
        key = tuple(
            (
                self.names.get(dep.target.module, "?"),
                getattr(dep.handler, "__name__", type(dep.handler).__name__),
                len(idxs),
            )
            for dep, idxs in group
        )
        if key not in self.cache:
            if self.name == "random":
                torch.manual_seed(self.seed + len(self.cache))
            scores = self.inner(group, **kwargs)
            self.cache[key] = None if scores is None else scores.detach().clone()
            self.computed += 1
        cached = self.cache[key]
        return None if cached is None else cached.clone()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that look like timm attention (a ``qkv`` Linear and ``num_heads``)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")
    ]


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s) of a timm model (never pruned: their outputs are the classes)."""
    get = getattr(model, "get_classifier", None)
    heads = get() if callable(get) else None
    heads = list(heads) if isinstance(heads, tuple | list) else [heads]
    return [h for h in heads if isinstance(h, nn.Module) and not isinstance(h, nn.Identity)]


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """Leaf Linear/Conv modules whose names match any glob in ``patterns``."""
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and any(fnmatch.fnmatch(n, p) for p in patterns)
    ]


def compute_gradients(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Accumulate the calibration loss gradient in ``.grad`` (for Taylor importance).

    Returns:
        The mean calibration loss.
    """
    model.zero_grad(set_to_none=True)
    model.eval()
    # The calibration passes are the only heavy compute of a prune (50 batches x 64 images of
    # DeiT-B in the published recipe): run them on the GPU when there is one. The graph surgery
    # that follows stays on the CPU, where the model lives; .to() carries the gradients back.
    home = next(model.parameters()).device
    dev = torch.device("cuda") if torch.cuda.is_available() else home
    model.to(dev)
    total = 0.0
    try:
        for x, y in batches:
            loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
            loss.backward()
            total += float(loss.detach())
    finally:
        model.to(home)
    return total / max(1, len(batches))


def fix_timm_attributes(model: nn.Module, num_heads: dict[nn.Module, int], rescale: bool) -> None:
    """Make timm attention modules agree with their pruned ``qkv``/``proj`` shapes.

    timm's ``Attention.forward`` reshapes with ``num_heads``, ``head_dim`` and ``attn_dim``, so
    these must follow the pruned ``qkv``. ``scale`` keeps its trained value unless ``rescale``.
    """
    for attn in attention_modules(model):
        heads = int(num_heads.get(attn.qkv, attn.num_heads))
        if heads < 1 or attn.qkv.out_features == 0:
            raise PruningError("an attention layer lost all of its heads")
        head_dim = attn.qkv.out_features // (3 * heads)
        if head_dim * heads * 3 != attn.qkv.out_features:
            raise PruningError(
                f"qkv has {attn.qkv.out_features} outputs, not 3 x {heads} heads x {head_dim}"
            )
        attn.num_heads = heads
        attn.head_dim = head_dim
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = heads * head_dim
        if rescale:
            attn.scale = head_dim**-0.5
        # The optional qk norms act per head dim; keep their shapes consistent if present.
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(attn, norm_name, None)
            if isinstance(norm, nn.LayerNorm) and norm.normalized_shape != (head_dim,):
                raise PruningError("head-dim pruning with qk_norm is not supported")


def scaled(ratio: float, scale: float) -> float:
    """``ratio * scale`` rounded to 12 decimals: Torch-Pruning floors channel counts, so a
    published ratio rebuilt from its proportion (0.25 x 1.2) must come back exactly (0.3), not a
    hair below a whole channel."""
    return round(ratio * scale, 12)


def head_dim_ratio_dict(
    model: nn.Module, settings: PrunerSettings, ratio: float
) -> dict[tuple[nn.Module, ...], float]:
    """The ``pruning_ratio_dict`` entry that carries the head-dim ratio (empty when unset).

    Every attention ``qkv`` of the model goes into one tuple key: Torch-Pruning 1.6.1 ranks the
    groups of a tuple key together under one ratio, which is how Isomorphic-Pruning's pruner ranks
    the head dims of all (isomorphic) attention layers together at ``--head-dim-pruning-ratio``.
    """
    attentions = attention_modules(model)
    if settings.head_dim_ratio_scale is None or not attentions:
        return {}
    names = {m: n for n, m in model.named_modules()}
    qkv_names = [names[a.qkv] for a in attentions]
    for pattern in settings.scope_ratios:
        clash = [n for n in qkv_names if fnmatch.fnmatch(n, pattern)]
        if clash:
            raise PruningError(
                f"scope_ratios[{pattern!r}] and head_dim_ratio_scale both set the ratio of "
                f"{clash[0]}; keep one"
            )
    head_dim_ratio = min(settings.max_pruning_ratio, scaled(ratio, settings.head_dim_ratio_scale))
    return {tuple(a.qkv for a in attentions): head_dim_ratio}


def head_pruning_ratio(model: nn.Module, settings: PrunerSettings, ratio: float) -> float:
    """The pruner's ``head_pruning_ratio`` at global ratio ``ratio`` (0 when no head would go).

    Torch-Pruning 1.6.1 removes ``total - int(total * (1 - ratio))`` heads of all layers together
    (so any visible ratio removes at least one) and has no head threshold when that count is
    zero, which a ratio a float hair above 0 gives: such a ratio becomes 0.
    """
    if not settings.prune_num_heads:
        return 0.0
    total = sum(int(a.num_heads) for a in attention_modules(model))
    ratio = min(settings.max_head_ratio, scaled(ratio, settings.head_ratio_scale))
    if total - int(total * (1 - ratio)) <= 0:
        return 0.0
    return ratio


def build_pruner(
    model: nn.Module,
    settings: PrunerSettings,
    ratio: float,
    importance: CachedImportance,
    example_inputs: torch.Tensor,
):
    """A Torch-Pruning ``BasePruner`` for ``model`` at global ratio ``ratio``."""
    import torch_pruning as tp

    ignored = classifier_modules(model) + match_modules(model, settings.ignored)
    num_heads = {a.qkv: int(a.num_heads) for a in attention_modules(model)}
    ratio_dict: dict[Any, float] = head_dim_ratio_dict(model, settings, ratio)
    for pattern, scale in settings.scope_ratios.items():
        cap = min(settings.max_pruning_ratio, float(settings.scope_max_ratio.get(pattern, 1.0)))
        for module in match_modules(model, [pattern]):
            ratio_dict[module] = min(cap, ratio * float(scale))
    heads = head_pruning_ratio(model, settings, ratio)
    importance.bind(model)
    return tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=importance,
        global_pruning=settings.global_pruning,
        isomorphic=settings.isomorphic,
        pruning_ratio=ratio,
        pruning_ratio_dict=ratio_dict or None,
        max_pruning_ratio=settings.max_pruning_ratio,
        ignored_layers=ignored,
        round_to=settings.round_to,
        num_heads=num_heads,
        prune_num_heads=heads > 0 and bool(num_heads),
        prune_head_dims=settings.prune_head_dims,
        head_pruning_ratio=heads,
    )


def prunable_channels(model: nn.Module) -> int:
    """Output channels of all Linear/Conv layers except the classifier."""
    heads = {id(m) for m in classifier_modules(model)}
    return sum(
        m.out_features if isinstance(m, nn.Linear) else m.out_channels
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and id(m) not in heads
    )


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """MACs and params via ``tp.utils.count_ops_and_params``."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that keeps every parameter's ``.grad`` (deepcopy drops them, and
    Taylor importance needs them)."""
    clone = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), clone.parameters(), strict=True):
        if src.grad is not None:
            dst.grad = src.grad.clone()
    return clone


def block_importance(block: nn.Module) -> float:
    """Isomorphic-Pruning's block score: the mean over the block's parameters of mean |w x grad|.

    Raises:
        PruningError: if the block has no gradients (no Taylor calibration ran).
    """
    with torch.no_grad():
        scores = [(p.grad * p).abs().mean() for p in block.parameters() if p.grad is not None]
        if not scores:
            raise PruningError("remove_blocks needs Taylor gradients, and a block has none")
        return float(torch.stack(scores).mean())


def _child(module: nn.Module, part: str) -> nn.Module:
    """``module``'s child ``part``: an index into a Sequential (negative counts from the end, as
    in ``stages[-2]``) or an attribute."""
    if re.fullmatch(r"-?\d+", part) and isinstance(module, nn.Sequential | nn.ModuleList):
        return module[int(part)]
    child = getattr(module, part, None)
    if not isinstance(child, nn.Module):
        raise PruningError(f"remove_blocks: this model has no module {part!r}")
    return child


def remove_blocks(model: nn.Module, counts: dict[str, int]) -> None:
    """Remove ``counts[path]`` blocks from each ``nn.Sequential`` at ``path``, in place: the
    blocks with the lowest :func:`block_importance` go, the others keep their order."""
    for path, count in counts.items():
        *parents, leaf = path.split(".")
        parent = model
        for part in parents:
            parent = _child(parent, part)
        blocks = _child(parent, leaf)
        if not isinstance(blocks, nn.Sequential):
            raise PruningError(f"remove_blocks: {path!r} is not an nn.Sequential in this model")
        if count >= len(blocks):
            raise PruningError(
                f"remove_blocks: {path!r} has {len(blocks)} blocks; cannot remove {count}"
            )
        scores = [block_importance(b) for b in blocks]
        ranked = sorted(range(len(blocks)), key=lambda i: (-scores[i], i))
        kept = sorted(ranked[: len(blocks) - count])
        setattr(parent, leaf, nn.Sequential(*[blocks[i] for i in kept]))


def depth_overrides(model: nn.Module, paths: Sequence[str]) -> dict[str, Any]:
    """The ``timm.create_model`` overrides that rebuild ``model`` after :func:`remove_blocks`
    (``depth`` of a ViT, ``depths`` of a ConvNeXt); saved with the pruned model."""
    overrides: dict[str, Any] = {}
    for path in paths:  # checked against BLOCK_PATHS by PrunerSettings.check
        if path == "blocks":
            overrides["depth"] = len(model.blocks)
        else:
            overrides["depths"] = [len(stage.blocks) for stage in model.stages]
    return overrides


def prune_at(
    base: nn.Module,
    settings: PrunerSettings,
    ratio: float,
    importance: CachedImportance,
    example_inputs: torch.Tensor,
) -> nn.Module:
    """A pruned copy of ``base`` at global ratio ``ratio`` (``base`` is left untouched).

    Widths first (one Torch-Pruning step), then the timm attention attributes, then the
    ``remove_blocks`` removal, as Isomorphic-Pruning's prune.py orders them.
    """
    # The gradients travel with the copy: Taylor importance needs them on the first (uncached)
    # trial, and Torch-Pruning prunes them along with the weights for remove_blocks.
    model = copy_with_grads(base)
    if ratio > 0:
        pruner = build_pruner(model, settings, ratio, importance, example_inputs)
        pruner.step()
        fix_timm_attributes(model, pruner.num_heads, settings.attention_scale == "recompute")
    if settings.remove_blocks:
        remove_blocks(model, settings.remove_blocks)
    return model


Trial = Callable[[float], tuple[nn.Module | None, float]]


@dataclass
class SearchResult:
    """The outcome of :func:`search_ratio`: the closest model, and the closest one below target,
    each with the ratio that produced it."""

    model: nn.Module | None
    reduction: float
    under_model: nn.Module | None
    under_reduction: float
    ratio: float | None = None
    under_ratio: float | None = None

    def error(self, target: float) -> float:
        """|reduction - target| of the closest model."""
        return abs(self.reduction - target) if self.model is not None else float("inf")


def _next_probe(lo: float, hi: float, red_lo: float, red_hi: float, target: float, step: int):
    """The next ratio inside the bracket [lo, hi]: linear interpolation of the MACs curve on even
    steps (kept off the ends), the midpoint on odd ones, so the bracket halves at least every
    second step."""
    width = hi - lo
    if step % 2 == 0 and red_hi > red_lo:
        guess = lo + (target - red_lo) / (red_hi - red_lo) * width
        return min(max(guess, lo + 0.1 * width), hi - 0.1 * width)
    return (lo + hi) / 2


def search_ratio(
    trial: Trial,
    target: float,
    tolerance: float,
    step: float,
    max_ratio: float,
    resolution: float,
    max_steps: int,
    start: float | None = None,
) -> SearchResult:
    """Find the pruning ratio whose MACs reduction is within ``tolerance`` of ``target``.

    Without ``start``, an upward scan in ``step`` from ``step`` brackets the target first, because
    Torch-Pruning skips groups that would exceed ``max_pruning_ratio``: the reduction grows with
    the ratio only up to some ratio, not up to the maximum. With ``start`` (a recipe's own ratio,
    usually close), the first probe is ``start`` and the scan goes from there, up or down in
    ``step``. Interpolation and bisection then narrow the bracket down to ``resolution``.

    Args:
        trial: prunes a copy at a ratio; returns (model, reduction), model None for an invalid trial
            (which counts as overshooting).
        target: MACs fraction to remove.
        tolerance: allowed |reduction - target|.
        step: scan step.
        max_ratio: largest ratio tried.
        resolution: bracket width below which bisection stops.
        max_steps: bisection steps.
        start: first ratio to try (None: scan up from ``step``).
    """
    result = SearchResult(None, 0.0, None, 0.0)

    def probe(ratio: float) -> float:
        model, reduction = trial(ratio)
        if model is not None:
            if abs(reduction - target) < result.error(target):
                result.model, result.reduction, result.ratio = model, reduction, ratio
            if result.under_reduction <= reduction < target:
                result.under_model, result.under_reduction = model, reduction
                result.under_ratio = ratio
        return reduction

    def landed() -> bool:
        return result.error(target) <= tolerance

    lo, red_lo, hi, red_hi = 0.0, 0.0, None, 1.0
    if start is not None and 0.0 < start <= max_ratio:
        reduction = probe(start)
        if landed():
            return result
        if reduction >= target:
            hi, red_hi = start, reduction
            ratio = round(start - step, 10)
            while ratio > 0.0:
                reduction = probe(ratio)
                if landed():
                    return result
                if reduction < target:
                    lo, red_lo = ratio, reduction
                    break
                hi, red_hi, ratio = ratio, reduction, round(ratio - step, 10)
        else:
            lo, red_lo = start, reduction
    if hi is None:
        ratio = round(lo + step, 10)
        while ratio <= max_ratio + 1e-9:
            reduction = probe(ratio)
            if landed():
                return result
            if reduction >= target:
                hi, red_hi = ratio, reduction
                break
            lo, red_lo, ratio = ratio, reduction, round(ratio + step, 10)
    if hi is None:
        return result
    for i in range(max_steps):
        if landed() or hi - lo < resolution:
            break
        mid = _next_probe(lo, hi, red_lo, red_hi, target, i)
        reduction = probe(mid)
        if reduction < target:
            lo, red_lo = mid, reduction
        else:
            hi, red_hi = mid, reduction
    return result


def topup_room(base: nn.Module, model: nn.Module, settings: PrunerSettings) -> float:
    """The largest ratio the top-up may still take from each of its layers in ``model`` so that
    none loses more of its *base* channels than its bound (``scope_max_ratio`` where a glob
    matches, else ``max_pruning_ratio``)."""
    base_widths = {
        n: m.out_features if isinstance(m, nn.Linear) else m.out_channels
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }
    room = settings.max_pruning_ratio
    for name, module in model.named_modules():
        if module not in match_modules(model, settings.topup_scopes) or name not in base_widths:
            continue
        cap = min(
            [settings.max_pruning_ratio]
            + [c for g, c in settings.scope_max_ratio.items() if fnmatch.fnmatch(name, g)]
        )
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        room = min(room, 1 - (1 - cap) * base_widths[name] / width)
    return max(0.0, room)


def topup_ranking(settings: PrunerSettings) -> dict[str, Any]:
    """What the top-up stage ranks with: the method's own importance and ranking, on the
    ``topup_scopes`` layers only (recorded in the report as ``search.topup``)."""
    return {
        "importance": settings.importance,
        "global_pruning": settings.global_pruning,
        "isomorphic": settings.isomorphic,
        "round_to": settings.round_to,
        "scopes": list(settings.topup_scopes),
    }


def _topup_trial(
    model: nn.Module,
    settings: PrunerSettings,
    base_macs: int,
    example_inputs: torch.Tensor,
    seed: int,
    trials: list[dict[str, Any]],
    max_ratio: float,
) -> Trial | None:
    """A trial function that prunes only the ``topup_scopes`` layers of ``model`` a bit further,
    ranked like the global stage (the same importance; Taylor reads the gradients the global
    stage left on ``model``, pruned along with its weights)."""
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    scoped = {names[id(m)] for m in match_modules(model, settings.topup_scopes)}
    if not scoped:
        return None
    other = [
        names[id(m)]
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and names[id(m)] not in scoped
    ]
    importance = CachedImportance(settings.importance, seed)

    def trial(ratio: float) -> tuple[nn.Module | None, float]:
        candidate = copy_with_grads(model)
        modules = dict(candidate.named_modules())
        importance.bind(candidate)
        pruner = tp.pruner.BasePruner(
            candidate,
            example_inputs,
            importance=importance,
            global_pruning=settings.global_pruning,
            isomorphic=settings.isomorphic,
            pruning_ratio=ratio,
            max_pruning_ratio=max_ratio,
            ignored_layers=[modules[n] for n in other],
            round_to=settings.round_to,
        )
        pruner.step()
        reduction = 1 - count_macs(candidate, example_inputs)[0] / base_macs
        trials.append({"stage": "topup", "ratio": ratio, "achieved": reduction})
        return candidate, reduction

    return trial


@dataclass
class Window:
    """Where a prune must land, as fractions of the base MACs removed."""

    target: float
    tolerance: float
    target_macs: int | None = None

    @classmethod
    def of(
        cls,
        target: float,
        tolerance: float,
        base_macs: int,
        target_gmacs: float | None,
        gmacs_tolerance: float,
    ) -> Window:
        """The window of a fractional target (``tolerance`` of the base MACs), or of a GMACs
        target (``gmacs_tolerance`` of the target MACs, whatever ``tolerance`` allows).

        Raises:
            PruningError: if the GMACs target is not below the base model's MACs.
        """
        if target_gmacs is None:
            return cls(target, tolerance)
        target_macs = float(target_gmacs) * 1e9
        if not 0 < target_macs < base_macs:
            raise PruningError(
                f"target {target_gmacs:g} GMACs is not below the base model's "
                f"{base_macs / 1e9:.4f} GMACs"
            )
        return cls(
            1 - target_macs / base_macs, gmacs_tolerance * target_macs / base_macs, int(target_macs)
        )

    def describe(self, base_macs: int) -> str:
        """The window in words, for error messages."""
        if self.target_macs is None:
            return f"{self.target} ± {self.tolerance} of the base MACs"
        return f"{self.target_macs / 1e9:.4g} GMACs ± {self.tolerance * base_macs / 1e9:.4g}"

    def report(self, base_macs: int) -> dict[str, Any]:
        """JSON-able description (``search`` section of the prune report)."""
        half = self.tolerance * base_macs
        centre = (1 - self.target) * base_macs
        return {
            "target_fraction": self.target,
            "tolerance_fraction": self.tolerance,
            "target_macs": self.target_macs,
            "macs_window": [round(centre - half), round(centre + half)],
        }


def prune_to_target(
    base: nn.Module,
    settings: PrunerSettings,
    target: float,
    example_inputs: torch.Tensor,
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    *,
    tolerance: float,
    max_steps: int,
    gmacs_tolerance: float,
    target_gmacs: float | None = None,
    mode: str = "macs_targeted",
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``base`` so that its MACs land in the target window.

    Args:
        base: the unpruned model (not modified).
        settings: the plan's pruner settings.
        target: fraction of base MACs to remove, in [0, 1) (the ``{ratio}`` wildcard).
        example_inputs: a batch-1 input for tracing and MACs counting.
        calibration: batches for Taylor gradients.
        seed: seeds random importance.
        tolerance: allowed |achieved - target| for a fractional target.
        max_steps: bisection steps per stage.
        target_gmacs: the target in GMACs, when it was given so; the window is then
            ``gmacs_tolerance`` of it and ``target``/``tolerance`` are not used for the search.
        gmacs_tolerance: the window around ``target_gmacs``, as a fraction of it.
        mode: ``macs_targeted`` (search the global knob into the window, fail if it cannot) or
            ``as_published`` (prune once at ``settings.pruning_ratio``; report where it lands).

    Returns:
        The pruned model and a report (achieved fraction, MACs, trials, seconds, and ``search``:
        the mode, the window, the ratio used and the top-up stage if one ran).
    """
    if not 0.0 <= target < 1.0:
        raise PruningError(f"target MACs fraction {target} is outside [0, 1)")
    if mode not in MODES:
        raise PruningError(f"search mode {mode!r} is not one of {MODES}")
    if mode == "as_published" and settings.pruning_ratio is None:
        raise PruningError("as_published mode needs the recipe's pruning_ratio")
    start = time.perf_counter()
    base = copy.deepcopy(base).eval()
    base_macs, base_params = count_macs(base, example_inputs)
    window = Window.of(target, tolerance, base_macs, target_gmacs, gmacs_tolerance)
    calib_loss = None
    calib_start = time.perf_counter()
    if settings.importance == "taylor":
        calib_loss = compute_gradients(base, calibration[: settings.calibration_batches])
    calib_seconds = time.perf_counter() - calib_start
    importance = CachedImportance(settings.importance, seed)
    trials: list[dict[str, Any]] = []

    def global_trial(ratio: float) -> tuple[nn.Module | None, float]:
        try:
            model = prune_at(base, settings, ratio, importance, example_inputs)
        except PruningError as err:
            # An over-pruned trial (e.g. a layer left without heads) counts as overshooting.
            trials.append({"stage": "global", "ratio": ratio, "error": str(err)})
            return None, 1.0
        reduction = 1 - count_macs(model, example_inputs)[0] / base_macs
        trials.append({"stage": "global", "ratio": ratio, "achieved": reduction})
        return model, reduction

    search: dict[str, Any] = {"mode": mode, **window.report(base_macs), "topup": None}
    if mode == "as_published":
        model, _ = global_trial(float(settings.pruning_ratio))
        if model is None:
            raise PruningError(f"the published ratios fail on this model: {trials[-1]['error']}")
        search["ratio"] = settings.pruning_ratio
    else:
        model, search["ratio"], search["topup"] = _search(
            base, settings, window, global_trial, trials, base_macs, example_inputs, seed, max_steps
        )
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    macs, params = count_macs(model, example_inputs)
    check_forward_backward(model, example_inputs)
    achieved = 1 - macs / base_macs
    report = {
        "target": target,
        "achieved": achieved,
        "within_tolerance": abs(achieved - window.target) <= window.tolerance,
        "tolerance": window.tolerance,
        "macs_base": base_macs,
        "params_base": base_params,
        "macs": macs,
        "params": params,
        "search": search,
        "trials": trials,
        "importance_evaluations": importance.computed,
        "calibration_loss": calib_loss,
        "calibration_seconds": calib_seconds,
        "seconds": time.perf_counter() - start,
    }
    if settings.remove_blocks:
        report["overrides"] = depth_overrides(model, list(settings.remove_blocks))
    return model, report


def _search(
    base: nn.Module,
    settings: PrunerSettings,
    window: Window,
    global_trial: Trial,
    trials: list[dict[str, Any]],
    base_macs: int,
    example_inputs: torch.Tensor,
    seed: int,
    max_steps: int,
) -> tuple[nn.Module, float | None, dict[str, Any] | None]:
    """The ``macs_targeted`` search: the global knob, then the top-up stage if the knob's
    granularity jumps over the window.

    Returns:
        The model, the global ratio it was pruned at, and the top-up record (None if none ran).
    """
    target, tolerance = window.target, window.tolerance
    if target <= tolerance:
        return copy.deepcopy(base), 0.0, None
    # Below this resolution no channel count changes (half a channel of all prunable ones).
    resolution = 0.5 / max(1, prunable_channels(base))
    found = search_ratio(
        global_trial,
        target,
        tolerance,
        settings.coarse_step,
        settings.max_pruning_ratio,
        resolution,
        max_steps,
        start=settings.pruning_ratio,
    )
    ratio, topup_record = found.ratio, None
    if found.error(target) > tolerance:
        # The channel granularity jumps over the window: top up from the best model below it.
        start_model = found.under_model or base
        room = topup_room(base, start_model, settings)
        trial = _topup_trial(start_model, settings, base_macs, example_inputs, seed, trials, room)
        if trial is not None and room > 0:
            topup = search_ratio(trial, target, tolerance, 0.05, room, 1e-4, max_steps)
            if topup.error(target) < found.error(target):
                ratio = found.under_ratio if found.under_model is not None else 0.0
                topup_record = {**topup_ranking(settings), "ratio": topup.ratio}
                found = topup
    if found.model is None:
        raise PruningError(f"no valid pruning found for {window.describe(base_macs)}")
    if found.error(target) > tolerance:
        # A run off its target is no data point for the study: fail instead of saving it.
        best = max((t.get("achieved", 0.0) for t in trials), default=0.0)
        if found.reduction < target:
            raise TargetOutOfReach(
                f"no ratio up to max_pruning_ratio={settings.max_pruning_ratio:.3g} reaches "
                f"{window.describe(base_macs)} (best removes {best:.3f} of the MACs); raise "
                "max_pruning_ratio or lower the target"
            )
        raise PruningError(
            f"closest pruning removes {found.reduction:.4f} of the MACs, outside "
            f"{window.describe(base_macs)}; set a finer round_to or topup_scopes, or a wider "
            "prune.tolerance (prune.gmacs_tolerance for a GMACs target)"
        )
    return found.model, ratio, topup_record


def check_forward_backward(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Run a forward and a backward pass; raise :class:`PruningError` if either fails."""
    model.eval()
    try:
        out = model(example_inputs.repeat(2, 1, 1, 1))
        out.float().sum().backward()
    except RuntimeError as err:
        raise PruningError(f"pruned model fails a forward/backward pass: {err}") from err
    finally:
        model.zero_grad(set_to_none=True)
    if not torch.isfinite(out).all():
        raise PruningError("pruned model produces non-finite outputs")
