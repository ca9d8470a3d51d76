"""Masks of the ``lm`` family: exact per-row and N:M patterns, and the layer-wise error.

The contract: at an unstructured fraction ``s`` every output row of a ``(rows, cols)`` weight
loses exactly ``round(s * cols)`` weights (Wanda's comparison group is the output row: Sun et al.,
2023); at N:M every group of ``m`` consecutive input weights of a row loses exactly ``n``. A mask
is a bool tensor shaped like the weight, True where the weight is kept.
"""

from __future__ import annotations

import torch

from agentprune.lm.settings import Sparsity


def pruned_per_row(columns: int, fraction: float) -> int:
    """Weights a row of ``columns`` inputs loses at ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sparsity {fraction} is outside [0, 1)")
    return int(round(fraction * columns))


def lowest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning the ``count`` lowest scores of every row; among equal scores the lower
    index goes first (what a stable sort gives, but through ``kthvalue``: 3-4x faster, which
    matters because dequantized weights repeat values, so ties are common)."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if count <= 0:
        return mask
    if count >= score.shape[1]:
        return ~mask
    threshold = torch.kthvalue(score, count, dim=1, keepdim=True).values
    below = score < threshold
    need = count - below.sum(dim=1, keepdim=True)
    tied = score == threshold
    first_tied = tied & (torch.cumsum(tied, dim=1) <= need)
    return ~(below | first_tied)


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest scores of every ``m`` consecutive inputs of a row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    if n > 0:
        order = torch.argsort(groups, dim=2, stable=True)[..., :n]
        mask.scatter_(2, order, False)
    return mask.reshape(rows, cols)


def mask_from_scores(score: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """The keep-mask of ``sparsity`` that prunes the lowest scores (per row, or per N:M group)."""
    if score.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows, cols), got shape {tuple(score.shape)}")
    if sparsity.is_n_m:
        return n_m_mask(score, sparsity.n, sparsity.m)
    return lowest_per_row(score, pruned_per_row(score.shape[1], sparsity.fraction))


def satisfies(mask: torch.Tensor, sparsity: Sparsity) -> bool:
    """Whether ``mask`` has exactly the pattern of ``sparsity``."""
    rows, cols = mask.shape
    if sparsity.is_n_m:
        if cols % sparsity.m:
            return False
        zeros = (~mask).reshape(rows, cols // sparsity.m, sparsity.m).sum(dim=2)
        return bool((zeros == sparsity.n).all())
    zeros = (~mask).sum(dim=1)
    return bool((zeros == pruned_per_row(cols, sparsity.fraction)).all())


def check(mask: torch.Tensor, sparsity: Sparsity, name: str) -> None:
    """Raise a one-line error when ``mask`` breaks the pattern of ``sparsity``."""
    if not satisfies(mask, sparsity):
        raise RuntimeError(f"{name}: the mask does not have the {sparsity.label()} pattern")


def reconstruction_error(w0: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``1/2 tr((W - W0) H (W - W0)^T)``: with ``H = 2 X X^T / n`` this is the mean squared
    output error ``||(W - W0) X||^2 / n`` of the layer on its calibration inputs ``X``."""
    delta = (w.double() - w0.double()).reshape(w0.shape[0], -1)
    return float(0.5 * ((delta @ hessian.double()) * delta).sum())
