"""Unstructured (weight-level) pruning: magnitude and Wanda scores, exact-density masks.

Every method here keeps the shapes and zeroes weights. A layer of ``n`` weights at sparsity ``s``
loses exactly ``round(s * n)`` of them, whether the comparison is per layer or per output row
(Wanda compares within each output row: Sun et al., "A Simple and Effective Pruning Approach for
Large Language Models", 2023).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agentprune.evaluate import prunable_weight_names

Masks = dict[str, torch.Tensor]
"""Parameter name (``<module>.weight``) -> 0/1 mask of the same shape (1 keeps)."""


def prunable_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Linear/Conv layers whose weights may be pruned (classifier excluded), filtered by
    module-name globs."""
    modules = dict(model.named_modules())
    out = {}
    for weight in prunable_weight_names(model):
        name = weight.rsplit(".", 1)[0]
        if any(fnmatch.fnmatch(name, g) for g in include) and not any(
            fnmatch.fnmatch(name, g) for g in exclude
        ):
            out[name] = modules[name]
    return out


def pruned_count(numel: int, sparsity: float) -> int:
    """Weights a layer of ``numel`` loses at ``sparsity`` (the exact density contract)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return int(round(sparsity * numel))


def magnitude_scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """|W| per weight."""
    return {name: m.weight.detach().abs() for name, m in layers.items()}


@torch.no_grad()
def input_norms(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The L2 norm of every input feature of every layer over the calibration batches, shaped
    like the layer's weight (broadcast over output rows): the ``‖X_j‖`` of Wanda. A Conv2d's
    features are its unfolded patches (input channel x kernel position)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module):
        def collect(_m, args, _out) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):
                cols = F.unfold(
                    x, module.kernel_size, module.dilation, module.padding, module.stride
                )  # (B, C*kh*kw, L)
                sq = cols.pow(2).sum(dim=(0, 2))
            else:
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            sums[name] = sums.get(name, 0) + sq

        return collect

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    try:
        model.eval()
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    norms = {}
    for name, module in layers.items():
        norm = sums[name].sqrt()
        w = module.weight
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            per_group = norm.view(groups, -1)  # (groups, C/groups * kh * kw)
            rows = w.shape[0] // groups
            norm = per_group.repeat_interleave(rows, dim=0).view_as(w)
        else:
            norm = norm.expand_as(w)
        norms[name] = norm
    return norms


def wanda_scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """|W_ij| * ‖X_j‖ per weight."""
    norms = input_norms(model, layers, batches)
    return {name: m.weight.detach().abs() * norms[name] for name, m in layers.items()}


def mask_from_scores(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """A 0/1 mask removing exactly ``round(sparsity * numel)`` of the lowest-scored weights,
    compared across the whole layer or within each output row.

    Per row, every row loses ``floor(k / rows)`` weights and the remainder goes to the rows whose
    next weight scores lowest, so the layer's count stays exact.
    """
    k = pruned_count(score.numel(), sparsity)
    flat = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k == 0:
        return mask.view_as(score).to(score.dtype)
    rows, width = flat.shape
    order = torch.argsort(flat, dim=1, stable=True)
    base, extra = divmod(k, rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    if extra:
        nxt = flat.gather(1, order[:, base : base + 1]).squeeze(1)
        counts[torch.argsort(nxt, stable=True)[:extra]] += 1
    cols = torch.arange(width).expand(rows, width)
    prune = cols < counts[:, None]
    mask.scatter_(1, order, ~prune)
    return mask.view_as(score).to(score.dtype)


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, per_row: bool) -> Masks:
    """``mask_from_scores`` for every layer, keyed by weight parameter name."""
    return {f"{name}.weight": mask_from_scores(s, sparsity, per_row) for name, s in scores.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def masks_of(model: nn.Module, names: Sequence[str] | None = None) -> Masks:
    """The masks a pruned model carries: its exact zeros among the prunable weights (a trained
    weight is never exactly zero, so the zeros are the pruning)."""
    params = dict(model.named_parameters())
    names = prunable_weight_names(model) if names is None else names
    return {n: (params[n] != 0).to(params[n].dtype) for n in names}


def layer_densities(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, float]:
    """Fraction of non-zero weights per layer."""
    return {name: float((m.weight != 0).sum()) / m.weight.numel() for name, m in layers.items()}
