"""Perplexity of a causal LM, peak memory, and the 2:4 speed measurement on a GPU.

Perplexity is token-level over non-overlapping windows: ``exp`` of the mean next-token negative
log-likelihood over every predicted token (``seq - 1`` per window; no token is scored twice and
no context crosses a window boundary). Wanda's and SparseGPT's evaluation code multiplies each
window's mean NLL by ``seq`` instead of ``seq - 1``; on equal windows the two agree exactly.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    """The result of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean next-token negative log-likelihood (nats).
        tokens: predicted tokens.
        windows: windows evaluated.
        seconds: wall time.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: str = "cpu"
) -> Perplexity:
    """Token-level perplexity of ``model`` on ``windows`` (``(m, seq)`` token ids).

    Args:
        model: a causal LM returning ``logits`` of shape ``(batch, seq, vocab)``.
        windows: non-overlapping windows, e.g. from :func:`agentprune.lm.text.evaluation_windows`.
        batch_size: windows per forward pass.
        device: where the model runs (it is moved there).

    Returns:
        The :class:`Perplexity`.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (m >= 1, seq >= 2), got {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    model.eval().to(device)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        logits = _logits(model, ids)[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += nll.double().cpu()
        count += targets.numel()
    mean = float(total) / count
    return Perplexity(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=int(windows.shape[0]),
        seconds=time.perf_counter() - start,
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _time_forward(model: nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass on a CUDA device (after a warm-up)."""
    with torch.no_grad():
        _logits(model, ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            _logits(model, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def semi_structured_speed(
    model: nn.Module, windows: torch.Tensor, repeats: int = 10
) -> dict[str, Any] | None:
    """Forward time of a 2:4-pruned model dense vs. with ``to_sparse_semi_structured`` weights.

    Needs a CUDA device with semi-structured sparse kernels (Ampere or newer) and half precision;
    returns None without CUDA. The model is converted in place (its decoder Linears' weights
    become semi-structured sparse tensors), so pass a copy you no longer need as dense.

    Args:
        model: a 2:4-pruned causal LM in float16 or bfloat16.
        windows: ``(batch, seq)`` token ids for the timed forward pass.
        repeats: timed passes (the median is reported).

    Returns:
        ``{"dense_seconds", "sparse_seconds", "speedup", "linears"}`` or None.
    """
    if not torch.cuda.is_available():
        return None
    from torch.sparse import to_sparse_semi_structured

    from agentprune.lm.pruning import prunable_linears

    model.eval().to("cuda")
    ids = windows.to("cuda")
    dense = _time_forward(model, ids, repeats)
    linears = prunable_linears(model)
    for linear in linears.values():
        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()))
    sparse = _time_forward(model, ids, repeats)
    return {
        "dense_seconds": dense,
        "sparse_seconds": sparse,
        "speedup": dense / sparse,
        "linears": len(linears),
    }
