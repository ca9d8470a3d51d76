"""Structured pruning through Torch-Pruning: plan settings -> pruner, MACs-target search, timm
fix-ups.

The search treats the pruner's global ``pruning_ratio`` as a knob. An upward scan brackets the
target and a bisection narrows the bracket until the fraction of base MACs removed is within
``tolerance`` of the target (:func:`search_ratio`). Importance scores are computed once per run
(Taylor gradients on the calibration batches, magnitudes, or seeded random scores) and cached by
group, so every trial ranks channels identically. When the channel granularity makes the MACs
curve jump over the tolerance window, a second "top-up" search prunes a few more channels from the
finest-grained layers (MLP hidden units by default) of the best model below the target.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentprune.pruning.settings import (
    IMPORTANCES,
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
    ratio_dict = {}
    for pattern, scale in settings.scope_ratios.items():
        cap = min(settings.max_pruning_ratio, float(settings.scope_max_ratio.get(pattern, 1.0)))
        for module in match_modules(model, [pattern]):
            ratio_dict[module] = min(cap, ratio * float(scale))
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
        prune_num_heads=settings.prune_num_heads and bool(num_heads),
        prune_head_dims=settings.prune_head_dims,
        head_pruning_ratio=min(settings.max_head_ratio, ratio * settings.head_ratio_scale),
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


def prune_at(
    base: nn.Module,
    settings: PrunerSettings,
    ratio: float,
    importance: CachedImportance,
    example_inputs: torch.Tensor,
) -> nn.Module:
    """A pruned copy of ``base`` at global ratio ``ratio`` (``base`` is left untouched)."""
    model = copy.deepcopy(base)
    if ratio <= 0:
        return model
    # deepcopy drops .grad; Taylor importance needs the base gradients on the first (uncached)
    # trial.
    for src, dst in zip(base.parameters(), model.parameters()):
        if src.grad is not None:
            dst.grad = src.grad.clone()
    pruner = build_pruner(model, settings, ratio, importance, example_inputs)
    pruner.step()
    fix_timm_attributes(model, pruner.num_heads, settings.attention_scale == "recompute")
    return model


Trial = Callable[[float], tuple[nn.Module | None, float]]


@dataclass
class SearchResult:
    """The outcome of :func:`search_ratio`: the closest model, and the closest one below target."""

    model: nn.Module | None
    reduction: float
    under_model: nn.Module | None
    under_reduction: float

    def error(self, target: float) -> float:
        """|reduction - target| of the closest model."""
        return abs(self.reduction - target) if self.model is not None else float("inf")


def search_ratio(
    trial: Trial,
    target: float,
    tolerance: float,
    step: float,
    max_ratio: float,
    resolution: float,
    max_steps: int,
) -> SearchResult:
    """Find the pruning ratio whose MACs reduction is within ``tolerance`` of ``target``.

    An upward scan in ``step`` brackets the target first, because Torch-Pruning skips groups
    that would exceed ``max_pruning_ratio``: the reduction grows with the ratio only up to some
    ratio, not up to the maximum. Bisection then narrows the bracket down to ``resolution``.

    Args:
        trial: prunes a copy at a ratio; returns (model, reduction), model None for an invalid trial
            (which counts as overshooting).
        target: MACs fraction to remove.
        tolerance: allowed |reduction - target|.
        step: scan step.
        max_ratio: largest ratio tried.
        resolution: bracket width below which bisection stops.
        max_steps: bisection steps.
    """
    result = SearchResult(None, 0.0, None, 0.0)

    def consider(model: nn.Module | None, reduction: float) -> None:
        if model is None:
            return
        if abs(reduction - target) < result.error(target):
            result.model, result.reduction = model, reduction
        if result.under_reduction <= reduction < target:
            result.under_model, result.under_reduction = model, reduction

    lo, hi, ratio = 0.0, None, step
    while ratio <= max_ratio + 1e-9:
        model, reduction = trial(ratio)
        consider(model, reduction)
        if result.error(target) <= tolerance:
            return result
        if reduction >= target:
            hi = ratio
            break
        lo, ratio = ratio, round(ratio + step, 10)
    if hi is None:
        return result
    for _ in range(max_steps):
        if result.error(target) <= tolerance or hi - lo < resolution:
            break
        mid = (lo + hi) / 2
        model, reduction = trial(mid)
        consider(model, reduction)
        if reduction < target:
            lo = mid
        else:
            hi = mid
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


def _topup_trial(
    model: nn.Module,
    settings: PrunerSettings,
    base_macs: int,
    example_inputs: torch.Tensor,
    seed: int,
    trials: list[dict[str, Any]],
    max_ratio: float,
) -> Trial | None:
    """A trial function that prunes only the ``topup_scopes`` layers of ``model`` a bit further."""
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
    importance = CachedImportance(
        "magnitude_l2" if settings.importance == "taylor" else settings.importance, seed
    )

    def trial(ratio: float) -> tuple[nn.Module | None, float]:
        candidate = copy.deepcopy(model)
        modules = dict(candidate.named_modules())
        importance.bind(candidate)
        pruner = tp.pruner.BasePruner(
            candidate,
            example_inputs,
            importance=importance,
            global_pruning=True,
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


def prune_to_target(
    base: nn.Module,
    settings: PrunerSettings,
    target: float,
    example_inputs: torch.Tensor,
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    tolerance: float = 0.005,
    max_steps: int = 30,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``base`` so that the fraction of its MACs removed is within ``tolerance`` of
    ``target``.

    Args:
        base: the unpruned model (not modified).
        settings: the plan's pruner settings.
        target: fraction of base MACs to remove, in [0, 1).
        example_inputs: a batch-1 input for tracing and MACs counting.
        calibration: batches for Taylor gradients.
        seed: seeds random importance.
        tolerance: allowed |achieved - target|.
        max_steps: bisection steps per stage.

    Returns:
        The pruned model and a report (achieved fraction, MACs, trials, seconds).
    """
    if not 0.0 <= target < 1.0:
        raise PruningError(f"target MACs fraction {target} is outside [0, 1)")
    start = time.perf_counter()
    base = copy.deepcopy(base).eval()
    base_macs, base_params = count_macs(base, example_inputs)
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

    model = base
    if target > tolerance:
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
        )
        if found.error(target) > tolerance:
            # The channel granularity jumps over the window: top up from the best model below it.
            start_model = found.under_model or base
            room = topup_room(base, start_model, settings)
            trial = _topup_trial(
                start_model, settings, base_macs, example_inputs, seed, trials, room
            )
            if trial is not None and room > 0:
                topup = search_ratio(trial, target, tolerance, 0.05, room, 1e-4, max_steps)
                if topup.error(target) < found.error(target):
                    found = topup
        if found.model is None:
            raise PruningError(f"no valid pruning found for target {target}")
        if found.error(target) > tolerance:
            # A run off its target is no data point for the study: fail instead of saving it.
            best = max((t.get("achieved", 0.0) for t in trials), default=0.0)
            if found.reduction < target:
                raise TargetOutOfReach(
                    f"no ratio up to max_pruning_ratio={settings.max_pruning_ratio} removes "
                    f"{target} of MACs (best {best:.3f}); raise max_pruning_ratio or lower the "
                    "target"
                )
            raise PruningError(
                f"closest pruning removes {found.reduction:.4f} of MACs, outside {target} ± "
                f"{tolerance}; set a finer round_to or topup_scopes, or a wider prune.tolerance"
            )
        model = found.model
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    macs, params = count_macs(model, example_inputs)
    check_forward_backward(model, example_inputs)
    return model, {
        "target": target,
        "achieved": 1 - macs / base_macs,
        "within_tolerance": abs(1 - macs / base_macs - target) <= tolerance,
        "tolerance": tolerance,
        "macs_base": base_macs,
        "params_base": base_params,
        "macs": macs,
        "params": params,
        "trials": trials,
        "importance_evaluations": importance.computed,
        "calibration_loss": calib_loss,
        "calibration_seconds": calib_seconds,
        "seconds": time.perf_counter() - start,
    }


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
