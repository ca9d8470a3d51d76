"""Evaluation: top-1/top-5/loss, MACs/params, sparsity, latency and throughput."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from agentprune import data
from agentprune.settings import EvaluateSettings


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``."""
    dev = next(model.parameters()).device
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    for x, y in data.loader(dataset, batch_size, shuffle=False):
        x, y = x.to(dev), y.to(dev)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += len(y)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


def macs_params(model: nn.Module, img_size: int) -> tuple[int, int]:
    """MACs and parameters at batch 1, via ``tp.utils.count_ops_and_params``."""
    import torch_pruning as tp

    dev = next(model.parameters()).device
    macs, params = tp.utils.count_ops_and_params(model, data.example_inputs(img_size).to(dev))
    return int(macs), int(params)


def sparsity(model: nn.Module, prunable: list[str] | None = None) -> dict[str, float]:
    """Fraction of exactly-zero weights among the prunable weights and among all parameters.

    Args:
        model: the model.
        prunable: parameter names counted as prunable; default: weights of Linear and Conv layers
            except the classifier.
    """
    if prunable is None:
        prunable = prunable_weight_names(model)
    params = dict(model.named_parameters())
    zero_p = sum(int((params[n] == 0).sum()) for n in prunable)
    total_p = sum(params[n].numel() for n in prunable)
    zero_all = sum(int((p == 0).sum()) for p in params.values())
    total_all = sum(p.numel() for p in params.values())
    return {
        "sparsity": zero_p / max(1, total_p),
        "sparsity_overall": zero_all / max(1, total_all),
    }


def classifier_names(model: nn.Module) -> set[str]:
    """Module names of the classifier head(s)."""
    names = set()
    get = getattr(model, "get_classifier", None)
    heads = get() if callable(get) else None
    heads = heads if isinstance(heads, tuple | list) else [heads]
    for name, module in model.named_modules():
        if any(module is h for h in heads if h is not None):
            names.add(name)
    return names


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Weights of Linear and Conv layers, the classifier excluded."""
    skip = classifier_names(model)
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) and name not in skip
    ]


@torch.no_grad()
def timing(
    model: nn.Module,
    img_size: int,
    latency_batch: int = 1,
    throughput_batch: int = 64,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """Median latency (ms) at ``latency_batch`` and median throughput (images/s) at
    ``throughput_batch``, each after ``warmup`` untimed forward passes."""
    dev = next(model.parameters()).device
    model.eval()

    def median_seconds(batch: int) -> float:
        x = data.example_inputs(img_size, batch).to(dev)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    latency = median_seconds(latency_batch)
    batch_time = median_seconds(throughput_batch)
    return {"latency_ms": 1000.0 * latency, "throughput": throughput_batch / batch_time}


def evaluate_model(
    model: nn.Module,
    test_set: Dataset,
    img_size: int,
    cfg: EvaluateSettings,
    known_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Everything a run reports about one model: accuracy, size, sparsity, speed.

    Args:
        model: the model.
        test_set: the held-out split.
        img_size: input side.
        cfg: the ``evaluate`` settings.
        known_size: (MACs, params) already counted with Torch-Pruning on this architecture (by the
            prune step). Fine-tuning cannot change shapes, so the MACs are reused; the parameter
            count is re-checked. None: count both here.

    Raises:
        ValueError: if the model's parameter count differs from ``known_size``.
    """
    out: dict[str, Any] = dict(accuracy(model, test_set, cfg.batch_size))
    if known_size is None:
        macs, params = macs_params(model, img_size)
    else:
        macs, params = known_size
        counted = sum(p.numel() for p in model.parameters())
        if counted != params:
            raise ValueError(
                f"model has {counted} parameters but the prune step counted {params}: "
                "its architecture changed after pruning"
            )
    out.update(macs=int(macs), params=int(params))
    out.update(sparsity(model))
    out.update(
        timing(
            model,
            img_size,
            cfg.latency_batch,
            cfg.throughput_batch,
            cfg.warmup,
            cfg.repeats,
        )
    )
    return out
