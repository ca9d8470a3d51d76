"""iCBS: iterative Combinatorial Brain Surgeon (arXiv 2411.17796), written from the algorithm.

Per layer, from an initial mask at the target density, block coordinate descent improves the
mask: each block update picks a block of weights around the pruning threshold (the best-scored
pruned weights and the worst-scored kept ones), builds the block's QUBO from the gradient and a
Hessian or Fisher estimate on calibration data, and re-decides which of the block's weights to
keep by cardinality-constrained simulated annealing. A block keeps as many weights as it had, so
each layer's pruned count stays exact at every step. Kept weights return to their original values.

A step is one forward/backward pass on ``batches_per_step`` calibration batches
(:class:`~agentprune.pruning.icbs.qubo.GradientTaps`) that yields every sample's gradient of the
layer's weights, from which each block's gradient and Fisher block are a gather; the step then
makes ``blocks_per_step`` block updates. The per-sample gradients ``G`` define the step's
quadratic model of the loss, ``g^T d + 1/2 d^T F d`` with ``F = G^T G / N``, so a later block's
gradient is corrected for the step's earlier changes: ``g_B + G_B^T u / N`` with ``u = sum G_A
delta_A`` the per-sample loss shift of the accepted changes. Each block update is thus exact block
coordinate descent on the step's model. With one batch and one block per step this is the
per-step fresh gradient and Fisher of the reference algorithm, at one pass per step instead of a
batched per-sample pass per block.

``schedule="layers"`` runs the layers one after the other, a pass per step; ``"rounds"`` shares
round ``r``'s one pass among every layer's step ``r`` (the model then also corrects for the other
layers' changes of the round), far fewer passes for a coarser model.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numba
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


def _initial_mask(
    score: torch.Tensor, order: torch.Tensor, pruned: int, per_row: bool
) -> torch.Tensor:
    """The ``pruned`` lowest scores pruned (``order``: the stable ascending order of ``score``)."""
    if per_row:
        return unstructured.mask_from_scores(score, pruned / score.numel(), True).flatten()
    mask = torch.ones(score.numel())
    mask[order[:pruned]] = 0
    return mask


def layer_steps(numel: int, max_numel: int, steps: int) -> int:
    """Steps of a layer: proportional to log(numel), ``steps`` for the largest layer."""
    return max(1, round(steps * math.log(max(2, numel)) / math.log(max(2, max_numel))))


def _stable_order(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(values, stable=True)


def _first_matching(order: torch.Tensor, ok: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` entries of ``order`` whose ``ok`` flag is set (fewer if there are not
    that many), scanning a growing prefix so that a block near the threshold costs O(block)."""
    span = max(64, 4 * count)
    while True:
        head = order[:span]
        found = head[ok[head]]
        if len(found) >= count or span >= len(order):
            return found[:count]
        span *= 4


class LayerSearch:
    """Block coordinate descent on one layer's mask.

    Args:
        name: the layer's module name.
        module: the layer (its weight is overwritten with ``w0 * mask``).
        score: initial scores; the lowest ``pruned`` are pruned first.
        selection: block-candidate ranking scores.
        pruned: the layer's exact pruned count.
        steps: the steps owed to this layer.
        cfg: the settings.
        rng: the draw of ``selection="random"``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        score: torch.Tensor,
        selection: torch.Tensor,
        pruned: int,
        steps: int,
        cfg: ICBSConfig,
        rng: np.random.Generator,
    ) -> None:
        self.name, self.param = name, f"{name}.weight"
        self.module = module
        self.cfg = cfg
        self.rng = rng
        self.owed = steps
        self.w0 = module.weight.detach().clone().flatten()
        n = self.w0.numel()
        order = _stable_order(score.flatten())
        self.mask = _initial_mask(score, order, pruned, cfg.init_per_row)
        # Candidates in ranking order, computed once: best-scored first among the pruned,
        # worst-scored first among the kept (stable, so ties go to the lower index).
        same = selection is score
        self.keep_order = order if same else _stable_order(selection.flatten())
        self.prune_order = _stable_order(-selection.flatten())
        self.fixed = torch.zeros(n, dtype=torch.bool)
        self.fixed[order[: int(cfg.fix_frac_prune * n)]] = True
        self.fixed[order[n - int(cfg.fix_frac_keep * n) :]] = True
        # Fixed fractions hold the mask where the initial scores put it.
        self.tabu: deque[torch.Tensor] = deque()
        self.barred = torch.zeros(n, dtype=torch.int32)
        self.tabu_size = 0
        self.tabu_cap = max(cfg.block_size, int(cfg.tabu_frac * n))
        self.accepted = self.steps = 0
        self.apply()

    def apply(self) -> None:
        """Write ``w0 * mask`` into the layer."""
        with torch.no_grad():
            self.module.weight.copy_((self.w0 * self.mask).view_as(self.module.weight))

    def block(self) -> tuple[torch.Tensor, int]:
        """The next block's indices and how many of them stay kept."""
        free = ~self.fixed & (self.barred == 0)
        want_p = self.cfg.pruned_per_block or self.cfg.block_size // 2
        # With selection="random" the draw is among the 4x nearest candidates.
        widen = 4 if self.cfg.selection == "random" else 1
        pruned = _first_matching(self.prune_order, free & (self.mask == 0), widen * want_p)
        p = min(want_p, len(pruned))
        kept = _first_matching(
            self.keep_order, free & (self.mask == 1), widen * (self.cfg.block_size - p)
        )
        q = min(self.cfg.block_size - p, len(kept))
        if self.cfg.selection == "random":
            pruned, kept = pruned[: 4 * max(1, p)], kept[: 4 * max(1, q)]
            pick_p = torch.as_tensor(self.rng.permutation(len(pruned))[:p], dtype=torch.long)
            pick_k = torch.as_tensor(self.rng.permutation(len(kept))[:q], dtype=torch.long)
            return torch.cat([pruned[pick_p], kept[pick_k]]), q
        return torch.cat([pruned[:p], kept[:q]]), q

    def _bar(self, idx: torch.Tensor) -> None:
        """Bars ``idx`` from the next blocks while the tabu list holds it."""
        self.tabu.append(idx)
        self.barred[idx] += 1
        self.tabu_size += len(idx)
        while self.tabu_size > self.tabu_cap:
            old = self.tabu.popleft()
            self.barred[old] -= 1
            self.tabu_size -= len(old)

    def step(
        self,
        taps: qubo.GradientTaps,
        shift: torch.Tensor,
        seed: int,
        curvature: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """One block update from the step's taps.

        Args:
            taps: the step's per-sample gradients (this layer among them).
            shift: ``(N,)`` per-sample loss shift ``u`` of the step's accepted changes so far.
            seed: the annealer's seed.
            curvature: ``(param, idx) -> H`` replacing the Fisher block (the exact Hessian).

        Returns:
            The per-sample loss shift ``G delta`` of the accepted change, or None when the mask
            stays.
        """
        idx, keep = self.block()
        if len(idx) < 2 or keep in (0, len(idx)):
            return None
        self.steps += 1
        per_sample = taps.per_sample(self.name, idx)
        g = qubo.fisher_model_gradient(per_sample, shift)
        H = curvature(self.param, idx) if curvature else qubo.fisher_from_samples(per_sample)
        current = (self.w0 * self.mask)[idx]
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
        self._bar(idx)
        now = self.mask[idx].numpy()
        x = np.asarray(x, dtype=np.float64)
        # Only a strict improvement of the block's estimate replaces the mask.
        if problem.energy(x) >= problem.energy(now) - 1e-12 or np.array_equal(x, now):
            return None
        new = torch.as_tensor(x, dtype=self.mask.dtype)
        delta = (self.w0[idx] * new - current).to(per_sample.dtype)
        self.mask[idx] = new
        self.apply()
        self.accepted += 1
        return per_sample @ delta


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
    batches = list(batches)
    if not batches:
        raise ValueError("icbs: no calibration batches")
    with _solver_threads(torch.get_num_threads()), _explicit_attention(model, cfg.hessian):
        return _icbs(model, layers, sparsity, batches, cfg, seed, log, start)


@contextmanager
def _solver_threads(threads: int) -> Iterator[None]:
    """Runs the annealer's restarts on at most the step's torch threads (its result does not
    depend on the count), so a one-thread job does not oversubscribe a shared machine."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextmanager
def _explicit_attention(model: nn.Module, hessian: str) -> Iterator[None]:
    """For the exact Hessian, turns timm's fused attention off while pruning.

    ``torch.func.hessian`` vmaps over the attention's backward, which has no batching rule for
    the fused kernel and falls back to a slow loop; timm's explicit attention path is the same
    function. The taps run the model as it is.
    """
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    if hessian == "exact":
        for m in fused:
            m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag


def _block_seed(seed: int, layer: int, step: int, block: int) -> int:
    return seed * 100_003 + layer * 1009 + step + block * 7_919


def _icbs(model, layers, sparsity, batches, cfg, seed, log, start) -> dict[str, Any]:
    grads = _gradients(model, layers, batches) if "gradient" in (cfg.init, cfg.selection) else {}
    init = _scores(cfg.init, model, layers, batches, grads)
    selection = (
        init
        if cfg.selection in (cfg.init, "random")
        else _scores(cfg.selection, model, layers, batches, grads)
    )
    counts = _pruned_counts(init, sparsity, cfg.density)
    rng = np.random.default_rng(seed)
    max_numel = max(m.weight.numel() for m in layers.values())
    searches = [
        LayerSearch(
            n,
            m,
            init[n],
            selection[n],
            counts[n],
            layer_steps(m.weight.numel(), max_numel, cfg.steps) if cfg.steps else 0,
            cfg,
            rng,
        )
        for n, m in layers.items()
    ]
    loss_init = calibration_loss(model, batches)
    passes = _search(model, searches, batches, cfg, seed)
    if log:
        for search in searches:
            log(f"icbs {search.name}: {search.accepted}/{search.steps} blocks improved")
    loss_final = calibration_loss(model, batches)
    return {
        "calibration_loss_init": loss_init,
        "calibration_loss": loss_final,
        "passes": passes,
        "blocks": sum(s.steps for s in searches),
        "blocks_improved": sum(s.accepted for s in searches),
        "pruned_counts": counts,
        "seconds": time.perf_counter() - start,
    }


def step_batches(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]], per_step: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch of each step: step ``j`` joins calibration batches ``j*k .. j*k + k - 1``
    (``k = per_step``, at most all of them), cycling; the list holds one entry per distinct step.

    ``per_step=1`` gives the calibration batches themselves (step ``j`` on batch ``j``).
    """
    k = max(1, min(per_step, len(batches)))
    if k == 1:
        return list(batches)
    groups = len(batches) // math.gcd(len(batches), k)
    joined = []
    for g in range(groups):
        parts = [batches[(g * k + i) % len(batches)] for i in range(k)]
        joined.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    return joined


def _search(
    model: nn.Module,
    searches: list[LayerSearch],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: ICBSConfig,
    seed: int,
) -> int:
    """Runs every layer's owed steps in the configured order; returns the passes made.

    ``layers``: layer after layer, each step on a fresh pass (step ``j`` on step batch ``j``).
    ``rounds``: round ``r`` is one pass on step batch ``r`` shared by every layer still owed.
    """
    per_step = step_batches(batches, cfg.batches_per_step)
    if cfg.schedule == "layers":
        for li, search in enumerate(searches):
            for step in range(search.owed):
                _update(model, [(li, search)], per_step[step % len(per_step)], cfg, seed, step)
        return sum(s.owed for s in searches)
    rounds = max((s.owed for s in searches), default=0)
    for r in range(rounds):
        active = [(li, s) for li, s in enumerate(searches) if r < s.owed]
        _update(model, active, per_step[r % len(per_step)], cfg, seed, r)
    return rounds


def _update(
    model: nn.Module,
    active: list[tuple[int, LayerSearch]],
    batch: tuple[torch.Tensor, torch.Tensor],
    cfg: ICBSConfig,
    seed: int,
    step: int,
) -> None:
    """One pass on ``batch``, then ``blocks_per_step`` block steps of each ``(index, layer)``."""
    taps = qubo.GradientTaps({s.name: s.module for _, s in active})
    taps.capture(model, batch, _loss)
    shift = active[0][1].w0.new_zeros(taps.batch_size)
    curvature = None
    if cfg.hessian == "exact":

        def curvature(param: str, idx: torch.Tensor) -> torch.Tensor:
            return qubo.block_hessian_exact(model, param, idx, _loss, [batch])

    for li, search in active:
        for b in range(cfg.blocks_per_step):
            change = search.step(taps, shift, _block_seed(seed, li, step, b), curvature)
            if change is not None:
                shift += change
