"""iCBS on one ``nn.Linear`` with the layer-wise reconstruction objective.

The objective of a Linear with calibration inputs ``X`` is the squared output error
``||(W - W0) X||^2 / n = 1/2 sum_r delta_r^T H delta_r`` with ``H = 2 X X^T / n`` and
``delta_r = w_r - w0_r`` the change of output row ``r`` (SparseGPT's layer-wise problem). It
separates over rows, so every QUBO block lies in one row. Starting from the Wanda mask, for each
selected row a block of weights around the row's threshold (the best-scored pruned ones and the
worst-scored kept ones) is re-decided: ``x_i = 1`` keeps weight ``i`` at its original value, and
with the row's gradient ``g = H delta_r`` and Hessian ``H`` the QUBO of
:func:`agentprune.pruning.icbs.qubo.build_qubo` is *exactly* the change of the row's loss (the
objective is quadratic, so its second-order expansion has no remainder). The existing
cardinality-constrained annealer (:func:`agentprune.pruning.icbs.solver.anneal`) solves it with
the block's kept count fixed, so every row keeps its exact count. A solution replaces the block's
mask only if it lowers the exact loss, so the layer's loss never rises above the Wanda mask's.

N:M: a block is ``block_size // m`` whole groups of the row (those whose kept and pruned scores
are closest). The annealer fixes only the block's total, so a penalty
``A * sum_g ((sum_{i in g} x_i - k)^2 - k^2)`` (``k = m - n`` kept per group) steers it to ``k``
per group; any solution that still breaks a group's count is rejected, so the pattern stays exact.

Written from the iCBS algorithm (arXiv 2411.17796) and the equations above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agentprune.lm import masks, methods
from agentprune.lm.calibration import LinearStats
from agentprune.lm.settings import LayerICBSSettings, Sparsity
from agentprune.pruning.icbs import solver

# A new block mask must lower the row's loss by more than this fraction of the block's scale.
IMPROVEMENT_RTOL = 1e-12


@dataclass
class _Layer:
    """The state of one layer's search (float64 numpy)."""

    w0: np.ndarray  # (rows, cols) original weights
    hessian: np.ndarray  # (cols, cols)
    scores: np.ndarray  # (rows, cols) selection scores (Wanda)
    mask: np.ndarray  # (rows, cols) bool keep-mask
    grad: dict[int, np.ndarray]  # row -> H delta_r, for the rows being optimised

    def set_block(self, r: int, idx: np.ndarray, keep: np.ndarray) -> None:
        """Replace the block's mask; update the row's gradient by the change alone."""
        change = (keep.astype(np.float64) - self.mask[r, idx]) * self.w0[r, idx]  # new - old delta
        self.grad[r] += change @ self.hessian[idx]
        self.mask[r, idx] = keep

    def row_loss(self, r: int) -> float:
        """``1/2 delta_r^T H delta_r`` of an optimised row."""
        return 0.5 * float(self.grad[r] @ np.where(self.mask[r], 0.0, -self.w0[r]))


def _row_blocks(
    keep: np.ndarray, score: np.ndarray, used: np.ndarray, size: int
) -> tuple[np.ndarray, int] | None:
    """The next unstructured block of every given row: ``(indices (rows, p + q), kept q)``.

    The ``p`` best-scored pruned and the ``q`` worst-scored kept weights no earlier block of the
    row used. Every row prunes the same count and a block keeps its count, so ``p`` and ``q`` are
    the same for all rows.
    """
    pruned_free = ~keep & ~used
    kept_free = keep & ~used
    p = min(size // 2, int(pruned_free[0].sum()))
    q = min(size - p, int(kept_free[0].sum()))
    if p == 0 or q == 0:
        return None
    s = torch.from_numpy(score)
    top_pruned = torch.topk(s.masked_fill(torch.from_numpy(~pruned_free), -np.inf), p, dim=1)
    low_kept = torch.topk(s.masked_fill(torch.from_numpy(~kept_free), np.inf), q, 1, largest=False)
    return torch.cat([top_pruned.indices, low_kept.indices], dim=1).numpy(), q


def _group_blocks(
    keep: np.ndarray, score: np.ndarray, used: np.ndarray, size: int, m: int
) -> tuple[np.ndarray, int] | None:
    """The next N:M block of every given row: whole groups with the smallest kept-minus-pruned
    score margin, ``(indices (rows, groups * m), kept count)``."""
    rows = keep.shape[0]
    k = keep.reshape(rows, -1, m)
    sc = score.reshape(rows, -1, m)
    free = ~used.reshape(rows, -1, m).any(axis=2)
    count = min(max(1, size // m), int(free[0].sum()))
    if count == 0:
        return None
    margin = np.where(k, sc, np.inf).min(axis=2) - np.where(k, -np.inf, sc).max(axis=2)
    margin = torch.from_numpy(np.where(free, margin, np.inf))
    groups = torch.topk(margin, count, dim=1, largest=False).indices.sort(dim=1).values.numpy()
    idx = (groups[:, :, None] * m + np.arange(m)[None, None, :]).reshape(rows, -1)
    return idx, int(k[0].sum(axis=1)[0]) * count


def _group_penalties(q: np.ndarray, groups: int, m: int, keep: int, weight: float) -> np.ndarray:
    """``A * sum_g ((s_g - k)^2 - k^2)`` as a matrix for binary ``x`` (``s_g`` the group's sum),
    for each of a batch of block QUBOs ``q`` ``(rows, n, n)``."""
    scale = weight * np.abs(q).sum(axis=2).max(axis=1)  # (rows,)
    block = np.ones((m, m))
    np.fill_diagonal(block, 1 - 2 * keep)
    return scale[:, None, None] * np.kron(np.eye(groups), block)[None]


def _row_seed(seed: int, row: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, row, block]).generate_state(1)[0])


class _Counts:
    def __init__(self) -> None:
        self.blocks = self.improved = self.infeasible = 0


def _block_qubos(layer: _Layer, rows: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block QUBOs of ``rows`` (block ``idx[i]`` of row ``rows[i]``), all at once: ``(Q, c)``
    with ``Q`` ``(rows, n, n)`` symmetric, the same as
    :func:`agentprune.pruning.icbs.qubo.build_qubo` builds one at a time (gradient multiplier 1,
    no ridge; the layer's Hessian is already symmetric)."""
    w0 = np.take_along_axis(layer.w0[rows], idx, axis=1)
    current = np.where(np.take_along_axis(layer.mask[rows], idx, axis=1), w0, 0.0)
    grad = np.stack([layer.grad[int(r)][i] for r, i in zip(rows, idx)])
    hessian = layer.hessian[idx[:, :, None], idx[:, None, :]]
    hw = np.einsum("rij,rj->ri", hessian, current)
    q = 0.5 * (w0[:, :, None] * hessian * w0[:, None, :])
    diagonal = np.arange(idx.shape[1])
    q[:, diagonal, diagonal] += w0 * grad - w0 * hw
    q = 0.5 * (q + q.transpose(0, 2, 1))
    c = -np.einsum("ri,ri->r", grad, current) + 0.5 * np.einsum("ri,ri->r", current, hw)
    return q, c


def _solve_blocks(
    layer: _Layer,
    rows: np.ndarray,
    idx: np.ndarray,
    keep: int,
    sparsity: Sparsity,
    settings: LayerICBSSettings,
    seeds: list[int],
    counts: _Counts,
) -> None:
    """Build the blocks' QUBOs (one per row, batched), anneal each, and apply every solution that
    lowers its row's exact loss. Rows are independent: a row's loss depends on its own mask only.
    """
    q, c = _block_qubos(layer, rows, idx)
    matrix = q
    if sparsity.is_n_m:
        m = sparsity.m
        groups = idx.shape[1] // m
        matrix = q + _group_penalties(q, groups, m, m - sparsity.n, settings.group_penalty)
    factor = np.abs(matrix).mean(axis=(1, 2))
    factor[~(factor > 0)] = 1.0
    scaled = matrix / factor[:, None, None]
    solutions = np.empty(idx.shape, dtype=bool)
    for i, seed in enumerate(seeds):
        x, _ = solver.anneal(
            scaled[i],
            keep,
            restarts=settings.restarts,
            seed=seed,
            beta_initial=settings.beta_initial,
            beta_final=settings.beta_final,
            beta_factor=settings.beta_factor,
            sweeps=settings.sweeps,
        )
        solutions[i] = np.asarray(x, dtype=bool)
    counts.blocks += len(rows)
    now = np.take_along_axis(layer.mask[rows], idx, axis=1)
    feasible = np.ones(len(rows), dtype=bool)
    if sparsity.is_n_m:
        per_group = solutions.reshape(len(rows), -1, sparsity.m).sum(axis=2)
        feasible = (per_group == sparsity.m - sparsity.n).all(axis=1)
        counts.infeasible += int((~feasible).sum())

    def energies(x: np.ndarray) -> np.ndarray:
        xf = x.astype(np.float64)
        return np.einsum("ri,rij,rj->r", xf, q, xf) + c

    tol = IMPROVEMENT_RTOL * (np.abs(c) + 1e-300)
    changed = ~(solutions == now).all(axis=1)
    better = energies(solutions) < energies(now) - tol
    for i in np.flatnonzero(feasible & changed & better):
        layer.set_block(int(rows[i]), idx[i], solutions[i])
        counts.improved += 1


def _row_losses(w0: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``1/2 delta_r^T H delta_r`` of every row under ``keep`` (float32 products: only used to
    rank the rows and for the rows iCBS leaves alone)."""
    delta = torch.where(keep, 0.0, -w0)
    return 0.5 * ((delta @ hessian.float()) * delta).sum(dim=1).double()


def icbs_mask(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scores: torch.Tensor,
    sparsity: Sparsity,
    settings: LayerICBSSettings,
    seed: int,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """iCBS's keep-mask for one layer, starting from the mask of ``scores`` (Wanda's).

    Args:
        weight: ``(rows, cols)`` dense weights (kept weights keep these values).
        hessian: ``(cols, cols)`` ``H = 2 X X^T / n``.
        scores: ``(rows, cols)`` scores of the initial mask and of the block selection.
        sparsity: per-row fraction or N:M.
        settings: block construction and annealing schedule.
        seed: seeds the annealer (with the row and block index).

    Returns:
        ``(keep_mask, report)``; the report holds the layer loss under the initial and the final
        mask, and the numbers of blocks solved, improved and (N:M) rejected as infeasible.
    """
    w0 = weight.detach().float().cpu()
    h = hessian.detach().double().cpu()
    h = 0.5 * (h + h.T)
    init = masks.mask_from_scores(scores.detach().cpu(), sparsity)
    row_loss = _row_losses(w0, h, init)
    rows = torch.argsort(-row_loss, stable=True)[: math.ceil(settings.row_fraction * len(w0))]
    # Exact (float64) gradients of the optimised rows only; the rest keep their mask.
    delta = torch.where(init[rows], 0.0, -w0[rows]).double()
    grad = (delta @ h).numpy()
    start = 0.5 * (grad * delta.numpy()).sum(axis=1)
    layer = _Layer(
        w0.double().numpy(),
        h.numpy(),
        scores.detach().double().cpu().numpy(),
        init.numpy().copy(),
        {int(r): g for r, g in zip(rows.tolist(), grad)},
    )
    rows = rows.numpy()
    others = torch.ones(len(w0), dtype=torch.bool)
    others[rows] = False
    loss_init = float(row_loss[others].sum()) + float(start.sum())
    counts = _Counts()
    used = np.zeros((len(rows), w0.shape[1]), dtype=bool)
    for j in range(settings.blocks_per_row):
        keep_rows, score_rows = layer.mask[rows], layer.scores[rows]
        if sparsity.is_n_m:
            blocks = _group_blocks(keep_rows, score_rows, used, settings.block_size, sparsity.m)
        else:
            blocks = _row_blocks(keep_rows, score_rows, used, settings.block_size)
        if blocks is None:
            break
        idx, keep = blocks
        np.put_along_axis(used, idx, True, axis=1)
        seeds = [_row_seed(seed, int(r), j) for r in rows]
        _solve_blocks(layer, rows, idx, keep, sparsity, settings, seeds, counts)
    mask = torch.from_numpy(layer.mask)
    masks.check(mask, sparsity, "icbs")
    gain = float(start.sum()) - sum(layer.row_loss(int(r)) for r in rows)
    report = {
        "loss_init": loss_init,
        "loss": loss_init - gain,
        "rows": len(rows),
        "blocks": counts.blocks,
        "blocks_improved": counts.improved,
        "blocks_infeasible": counts.infeasible,
    }
    return mask, report


def icbs_prune(
    linear: nn.Linear,
    stats: LinearStats,
    sparsity: Sparsity,
    settings: LayerICBSSettings,
    seed: int,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """Prune ``linear`` with iCBS from its Wanda mask; returns ``(keep_mask, report)``."""
    scores = methods.wanda_scores(linear.weight, stats.input_norms())
    mask, report = icbs_mask(linear.weight, stats.hessian(), scores, sparsity, settings, seed)
    methods.apply_mask(linear, mask)
    return mask, report
