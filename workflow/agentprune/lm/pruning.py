"""One entry point per method for a whole causal LM: magnitude, Wanda, SparseGPT, iCBS.

Each prunes every ``nn.Linear`` of the decoder blocks in place (embeddings and ``lm_head`` stay
dense, as in Wanda and SparseGPT) and returns a JSON-able report with the wall time of the step.
Wanda, SparseGPT and iCBS run through :func:`agentprune.lm.layerwise.prune_layerwise`, so every
block is calibrated on the outputs of the already pruned blocks before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from agentprune.lm import icbs, layerwise, masks, methods
from agentprune.lm.calibration import LinearStats
from agentprune.lm.settings import EngineSettings, LayerICBSSettings, SparseGPTSettings, Sparsity

Log = Callable[[str], None] | None


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the decoder blocks, by its name in the model."""
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(layerwise.decoder_layers(model)):
        out.update(layerwise.block_linears(block, f"model.layers.{i}"))
    return out


def zeros_summary(model: nn.Module) -> dict[str, Any]:
    """Exact zeros among the decoder Linears' weights and among all parameters (tied weights
    once). A dequantized checkpoint has some zeros before pruning, so these can exceed the
    masks' counts."""
    linears = prunable_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    numel = sum(m.weight.numel() for m in linears.values())
    params = {id(p): p for p in model.parameters()}
    all_zeros = sum(int((p == 0).sum()) for p in params.values())
    all_numel = sum(p.numel() for p in params.values())
    return {
        "prunable_params": numel,
        "prunable_zeros": zeros,
        "params": all_numel,
        "params_nonzero": all_numel - all_zeros,
    }


def _pruned(mask: torch.Tensor, sparsity: Sparsity, name: str, exact: bool = True) -> int:
    """Check the pattern of one Linear's mask; return how many weights it prunes."""
    if exact:
        masks.check(mask, sparsity, name)
    return int((~mask).sum())


def _finish(
    model: nn.Module,
    method: str,
    sparsity: Sparsity,
    start: float,
    pruned: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    zeros = zeros_summary(model)
    return {
        "method": method,
        "target": sparsity.label(),
        "achieved": pruned / zeros["prunable_params"],
        "pruned": pruned,
        "seconds": seconds,
        **zeros,
        **extra,
    }


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: Sparsity) -> dict[str, Any]:
    """Magnitude pruning per row (or N:M group); needs no calibration data."""
    start = time.perf_counter()
    pruned = sum(
        _pruned(methods.magnitude_prune(linear, sparsity), sparsity, name)
        for name, linear in prunable_linears(model).items()
    )
    return _finish(model, "magnitude", sparsity, start, pruned, {})


def prune_wanda(
    model: nn.Module,
    windows: torch.Tensor,
    sparsity: Sparsity,
    engine: EngineSettings,
    log: Log = None,
) -> dict[str, Any]:
    """Wanda (|W| * ||X||, per row or N:M group), block by block on ``windows``."""
    start = time.perf_counter()

    def prune(name: str, linear: nn.Linear, stats: LinearStats | None) -> dict[str, Any]:
        return {"pruned": _pruned(methods.wanda_prune(linear, stats, sparsity), sparsity, name)}

    run = layerwise.prune_layerwise(model, windows, prune, "norms", engine, log)
    return _finish(model, "wanda", sparsity, start, _total(run, "pruned"), _timing(run))


def prune_sparsegpt(
    model: nn.Module,
    windows: torch.Tensor,
    sparsity: Sparsity,
    settings: SparseGPTSettings,
    engine: EngineSettings,
    log: Log = None,
) -> dict[str, Any]:
    """SparseGPT (OBS updates with the calibration Hessian), block by block on ``windows``.

    With ``selection='block'`` an unstructured target holds per layer, not per row."""
    start = time.perf_counter()
    per_row = settings.selection == "row" or sparsity.is_n_m

    def prune(name: str, linear: nn.Linear, stats: LinearStats | None) -> dict[str, Any]:
        mask = methods.sparsegpt_prune(linear, stats, sparsity, settings)
        return {"pruned": _pruned(mask, sparsity, name, exact=per_row)}

    run = layerwise.prune_layerwise(model, windows, prune, "hessian", engine, log)
    return _finish(model, "sparsegpt", sparsity, start, _total(run, "pruned"), _timing(run))


def prune_icbs(
    model: nn.Module,
    windows: torch.Tensor,
    sparsity: Sparsity,
    settings: LayerICBSSettings,
    engine: EngineSettings,
    seed: int,
    log: Log = None,
) -> dict[str, Any]:
    """iCBS from the Wanda mask with the layer-wise objective, block by block on ``windows``.

    The report's ``icbs`` totals sum the layer losses (the mean squared output error of each
    Linear on its calibration inputs) under the Wanda start and under the final masks."""
    start = time.perf_counter()
    index = {name: i for i, name in enumerate(prunable_linears(model))}

    def prune(name: str, linear: nn.Linear, stats: LinearStats | None) -> dict[str, Any]:
        layer_seed = int(np.random.SeedSequence([seed, index[name]]).generate_state(1)[0])
        mask, report = icbs.icbs_prune(linear, stats, sparsity, settings, layer_seed)
        return {**report, "pruned": _pruned(mask, sparsity, name)}

    run = layerwise.prune_layerwise(model, windows, prune, "hessian", engine, log)
    keys = ("loss_init", "loss", "blocks", "blocks_improved", "blocks_infeasible")
    totals = {key: _total(run, key) for key in keys}
    extra = {**_timing(run), "icbs": totals}
    return _finish(model, "icbs", sparsity, start, _total(run, "pruned"), extra)


def _total(run: dict[str, Any], key: str) -> Any:
    return sum(report[key] for report in run["layers"].values())


def _timing(run: dict[str, Any]) -> dict[str, float]:
    return {"capture_seconds": run["capture_seconds"], "blocks_seconds": run["blocks_seconds"]}
