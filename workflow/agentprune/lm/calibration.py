"""Calibration statistics of ``nn.Linear`` layers from forward hooks, for any model.

Wanda needs the L2 norm of every input feature, ``||X_j||_2`` over all calibration tokens;
SparseGPT and iCBS need the layer Hessian ``H = 2 X X^T / n`` of the squared reconstruction error
(``n`` tokens). :class:`StatsCollector` accumulates either from forward hooks. Linears that read
the very same input tensor (q/k/v, gate/up) share one accumulator, so a block's Gram matrices cost
one product per distinct input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Need = Literal["none", "norms", "hessian"]
NEEDS = ("none", "norms", "hessian")


@dataclass
class LinearStats:
    """What the calibration tokens tell about one Linear's inputs.

    Attributes:
        sq_norms: ``(in,)`` float64, ``sum_t x_tj^2`` over the tokens.
        gram: ``(in, in)`` float64 ``sum_t x_t x_t^T``, or None when only norms were collected.
        tokens: Number of tokens ``n`` seen.
    """

    sq_norms: torch.Tensor
    gram: torch.Tensor | None
    tokens: int

    def input_norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature (float32), Wanda's activation term."""
        return self.sq_norms.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """``H = 2 X X^T / n`` (float64)."""
        if self.gram is None:
            raise ValueError("these statistics hold no Gram matrix (collected with need='norms')")
        if self.tokens == 0:
            raise ValueError("no calibration token reached this layer")
        return self.gram * (2.0 / self.tokens)


class _Accumulator:
    """Running sums for one distinct input."""

    def __init__(self, features: int, gram: bool, device: torch.device) -> None:
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = (
            torch.zeros(features, features, dtype=torch.float64, device=device) if gram else None
        )
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq += flat.pow(2).sum(dim=0).double()
        if self.gram is not None:
            # The product in float32 (BLAS speed), the running sum in float64.
            self.gram += (flat.T @ flat).double()
        self.tokens += flat.shape[0]


def stats_of(x: torch.Tensor, need: Need) -> LinearStats:
    """The statistics of one input tensor (all its tokens at once)."""
    if need not in ("norms", "hessian"):
        raise ValueError(f"need must be 'norms' or 'hessian', got {need!r}")
    acc = _Accumulator(x.shape[-1], need == "hessian", x.device)
    acc.add(x)
    return LinearStats(sq_norms=acc.sq, gram=acc.gram, tokens=acc.tokens)


class StatsCollector:
    """Forward hooks that accumulate :class:`LinearStats` for the given Linears.

    Use as a context manager around the calibration forward passes, then read :meth:`stats`.
    Each forward pass of the hooked module must go through :meth:`batch` so that the identity of
    shared inputs is tracked per pass.
    """

    def __init__(self, linears: dict[str, nn.Linear], need: Need) -> None:
        if need not in ("norms", "hessian"):
            raise ValueError(f"need must be 'norms' or 'hessian', got {need!r}")
        for name, module in linears.items():
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        self.linears = linears
        self.need = need
        self.owner: dict[str, str] = {}  # Linear -> name of the accumulator it shares
        self.acc: dict[str, _Accumulator] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> StatsCollector:
        self._handles = [
            m.register_forward_hook(self._hook(name)) for name, m in self.linears.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = []

    def batch(self) -> None:
        """Forget the inputs of the previous forward pass (call before each pass)."""
        self._seen = []

    def _hook(self, name: str):
        def collect(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0]
            # A strong reference keeps the tensor alive for the pass, so `is` cannot be fooled by
            # a freed tensor's address being reused.
            shared = next((key for t, key in self._seen if t is x), None)
            if shared is not None:
                self.owner.setdefault(name, shared)
                return
            self._seen.append((x, name))
            self.owner.setdefault(name, name)
            if name not in self.acc:
                self.acc[name] = _Accumulator(x.shape[-1], self.need == "hessian", x.device)
            self.acc[name].add(x)

        return collect

    def stats(self) -> dict[str, LinearStats]:
        """The statistics of every hooked Linear (Linears with a shared input share tensors)."""
        out = {}
        for name in self.linears:
            if name not in self.owner:
                raise RuntimeError(f"{name}: no calibration input reached this Linear")
            acc = self.acc[self.owner[name]]
            out[name] = LinearStats(sq_norms=acc.sq, gram=acc.gram, tokens=acc.tokens)
        return out
