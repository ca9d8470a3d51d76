"""iCBS: iterative Combinatorial Brain Surgeon (arXiv 2411.17796), written from the algorithm.

Per layer, from an initial mask at the target density, block coordinate descent improves the
mask: each step picks a block of weights around the pruning threshold (the best-scored pruned
weights and the worst-scored kept ones), builds the block's QUBO from the gradient and a Hessian
or Fisher estimate on one calibration batch, and re-decides which of the block's weights to keep
by cardinality-constrained simulated annealing. A block keeps as many weights as it had, so each
layer's pruned count stays exact at every step. Kept weights return to their original values.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agentprune.pruning import unstructured
from agentprune.pruning.icbs import qubo, solver
from agentprune.pruning.icbs.settings import ICBSConfig


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def calibration_loss(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean cross-entropy over ``batches``."""
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(_loss(model(x), y)) for x, y in batches]))


def _gradients(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.eval()
    for x, y in batches:
        (_loss(model(x), y) / len(batches)).backward()
    grads = {n: m.weight.grad.detach().clone() for n, m in layers.items()}
    model.zero_grad(set_to_none=True)
    return grads


def _scores(
    kind: str,
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grads: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    if kind == "wanda":
        return unstructured.wanda_scores(model, layers, batches)
    if kind == "gradient":
        return {n: (m.weight.detach() * grads[n]).abs() for n, m in layers.items()}
    return unstructured.magnitude_scores(layers)


def _pruned_counts(
    scores: dict[str, torch.Tensor], sparsity: float, density: str
) -> dict[str, int]:
    if density == "uniform":
        return {n: unstructured.pruned_count(s.numel(), sparsity) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = unstructured.pruned_count(flat.numel(), sparsity)
    order = torch.argsort(flat, stable=True)[:k]
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores.values())])
    counts = torch.bincount(owner[order], minlength=len(scores))
    return {n: int(c) for n, c in zip(scores, counts)}


def _initial_mask(score: torch.Tensor, pruned: int, per_row: bool) -> torch.Tensor:
    if per_row:
        return unstructured.mask_from_scores(score, pruned / score.numel(), True).flatten()
    mask = torch.ones(score.numel())
    mask[torch.argsort(score.flatten(), stable=True)[:pruned]] = 0
    return mask


def layer_steps(numel: int, max_numel: int, steps: int) -> int:
    """Steps of a layer: proportional to log(numel), ``steps`` for the largest layer."""
    return max(1, round(steps * math.log(max(2, numel)) / math.log(max(2, max_numel))))


class LayerSearch:
    """Block coordinate descent on one layer's mask."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        score: torch.Tensor,
        selection: torch.Tensor,
        pruned: int,
        cfg: ICBSConfig,
        rng: np.random.Generator,
    ) -> None:
        self.name, self.param = name, f"{name}.weight"
        self.module = module
        self.cfg = cfg
        self.rng = rng
        self.w0 = module.weight.detach().clone().flatten()
        self.mask = _initial_mask(score, pruned, cfg.init_per_row)
        self.selection = selection.flatten()
        n = self.w0.numel()
        order = torch.argsort(score.flatten(), stable=True)
        self.fixed = torch.zeros(n, dtype=torch.bool)
        self.fixed[order[: int(cfg.fix_frac_prune * n)]] = True
        self.fixed[order[n - int(cfg.fix_frac_keep * n) :]] = True
        # Fixed fractions hold the mask where the initial scores put it.
        self.tabu: deque[torch.Tensor] = deque()
        self.tabu_cap = max(cfg.block_size, int(cfg.tabu_frac * n))
        self.accepted = self.steps = 0
        self.apply()

    def apply(self) -> None:
        """Write ``w0 * mask`` into the layer."""
        with torch.no_grad():
            self.module.weight.copy_((self.w0 * self.mask).view_as(self.module.weight))

    def block(self) -> tuple[torch.Tensor, int]:
        """The next block's indices and how many of them stay kept."""
        free = ~self.fixed
        for idx in self.tabu:
            free[idx] = False
        pruned = torch.nonzero(free & (self.mask == 0)).flatten()
        kept = torch.nonzero(free & (self.mask == 1)).flatten()
        want_p = self.cfg.pruned_per_block or self.cfg.block_size // 2
        p = min(want_p, len(pruned))
        q = min(self.cfg.block_size - p, len(kept))
        if self.cfg.selection == "random":
            # The candidates nearest the threshold, then a seeded random draw among them.
            pruned = pruned[torch.argsort(-self.selection[pruned], stable=True)][: 4 * max(1, p)]
            kept = kept[torch.argsort(self.selection[kept], stable=True)][: 4 * max(1, q)]
            pick_p = torch.as_tensor(self.rng.permutation(len(pruned))[:p], dtype=torch.long)
            pick_k = torch.as_tensor(self.rng.permutation(len(kept))[:q], dtype=torch.long)
            return torch.cat([pruned[pick_p], kept[pick_k]]), q
        top_p = pruned[torch.argsort(-self.selection[pruned], stable=True)][:p]
        top_k = kept[torch.argsort(self.selection[kept], stable=True)][:q]
        return torch.cat([top_p, top_k]), q

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> bool:
        """One block update on ``batch``; returns whether the mask changed."""
        idx, keep = self.block()
        if len(idx) < 2 or keep in (0, len(idx)):
            return False
        self.steps += 1
        current = (self.w0 * self.mask)[idx]
        g = qubo.block_gradient(model, self.param, idx, _loss, [batch])
        hess = qubo.block_hessian_exact if self.cfg.hessian == "exact" else qubo.block_fisher
        H = hess(model, self.param, idx, _loss, [batch])
        problem = qubo.build_qubo(
            current, self.w0[idx], g, H, self.cfg.grad_multiplier, self.cfg.ridge
        )
        scaled, _ = qubo.scale_for_solver(problem.Q)
        x, _ = solver.anneal(
            scaled,
            keep,
            restarts=self.cfg.restarts,
            seed=seed,
            beta_initial=self.cfg.beta_initial,
            beta_final=self.cfg.beta_final,
            beta_factor=self.cfg.beta_factor,
            sweeps=self.cfg.sweeps,
        )
        self.tabu.append(idx)
        while sum(len(t) for t in self.tabu) > self.tabu_cap:
            self.tabu.popleft()
        now = self.mask[idx].numpy()
        x = np.asarray(x, dtype=np.float64)
        # Only a strict improvement of the block's estimate replaces the mask.
        if problem.energy(x) >= problem.energy(now) - 1e-12 or np.array_equal(x, now):
            return False
        self.mask[idx] = torch.as_tensor(x, dtype=self.mask.dtype)
        self.apply()
        self.accepted += 1
        return True


def icbs_prune(
    model: nn.Module,
    sparsity: float,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: ICBSConfig,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place to ``sparsity`` with iCBS; return a report.

    Args:
        model: the model (its prunable weights are overwritten with ``w0 * mask``).
        sparsity: the fraction of the prunable weights to remove.
        batches: calibration batches, cycled one per step.
        cfg: the settings.
        seed: seeds block selection and annealing.
        log: optional line logger.
    """
    start = time.perf_counter()
    layers = unstructured.prunable_layers(model, cfg.include, cfg.exclude)
    if not layers:
        raise ValueError("icbs: no prunable layer matches icbs.include/exclude")
    # Per-sample gradients (vmap) have no batching rule for the fused attention kernel's backward
    # and fall back to a slow loop; timm's explicit attention path is the same function.
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False
    try:
        return _icbs(model, layers, sparsity, batches, cfg, seed, log, start)
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag


def _icbs(model, layers, sparsity, batches, cfg, seed, log, start) -> dict[str, Any]:
    batches = list(batches)
    grads = _gradients(model, layers, batches) if "gradient" in (cfg.init, cfg.selection) else {}
    init = _scores(cfg.init, model, layers, batches, grads)
    selection = (
        init
        if cfg.selection in (cfg.init, "random")
        else _scores(cfg.selection, model, layers, batches, grads)
    )
    counts = _pruned_counts(init, sparsity, cfg.density)
    rng = np.random.default_rng(seed)
    searches = [
        LayerSearch(n, m, init[n], selection[n], counts[n], cfg, rng) for n, m in layers.items()
    ]
    loss_init = calibration_loss(model, batches)
    max_numel = max(s.w0.numel() for s in searches)
    for li, search in enumerate(searches):
        for step in range(layer_steps(search.w0.numel(), max_numel, cfg.steps)):
            search.step(model, batches[step % len(batches)], seed * 100_003 + li * 1009 + step)
        if log:
            log(f"icbs {search.name}: {search.accepted}/{search.steps} blocks improved")
    loss_final = calibration_loss(model, batches)
    return {
        "calibration_loss_init": loss_init,
        "calibration_loss": loss_final,
        "blocks": sum(s.steps for s in searches),
        "blocks_improved": sum(s.accepted for s in searches),
        "pruned_counts": counts,
        "seconds": time.perf_counter() - start,
    }
