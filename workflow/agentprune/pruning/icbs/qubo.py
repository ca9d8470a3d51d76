"""iCBS block problem: the second-order loss estimate of a keep/prune choice as a QUBO.

iCBS (iterative Combinatorial Brain Surgeon, arXiv 2411.17796) prunes a layer one block of weights
at a time. For a block of ``n`` weights, ``x_i = 1`` keeps weight ``i`` at its *original* value
``w0_i`` and ``x_i = 0`` prunes it. With the block's current weights ``w`` (e.g. ``w0`` masked by
the current mask), the new weights are ``x * w0``, so the change is ``delta = D x - w`` with
``D = diag(w0)``. The loss change is estimated by

    L(x) = gamma * g^T delta + 1/2 delta^T H delta + lambda * ||delta||^2,

with ``g`` the gradient at the current weights, ``H`` a (symmetric) Hessian or Fisher block,
``gamma`` a gradient multiplier and ``lambda`` a ridge. Expanding and using ``x_i^2 = x_i`` (binary
``x``) to move the linear terms onto the diagonal gives ``L(x) = x^T Q x + c`` exactly, with

    Q = 1/2 D H D + lambda D^2 + diag(gamma D g - D H w - 2 lambda D w),
    c = -gamma g^T w + 1/2 w^T H w + lambda w^T w

(:func:`build_qubo`). The cardinality-constrained solver minimises ``x^T Q x`` subject to
``sum(x) = k``; :func:`scale_for_solver` normalises ``Q`` for it without moving the argmin.

The gradient and Hessian blocks come from :func:`block_gradient`, :func:`block_hessian_exact` and
:func:`block_fisher`, which differentiate the loss with respect to the block entries only (the
parameter is rebuilt from a block variable with ``index_put`` inside
:func:`torch.func.functional_call`), so the model is never modified.

Implemented from the equations above; no reference code was consulted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

__all__ = [
    "BlockQUBO",
    "block_fisher",
    "block_gradient",
    "block_hessian_exact",
    "build_qubo",
    "scale_for_solver",
    "taylor_estimate",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _as_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """Converts a tensor or array-like to a float64 numpy array of the given rank."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    array = np.array(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries")
    return array


def _check_vector(array: np.ndarray, name: str, n: int) -> None:
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {array.shape}")


def _check_square(array: np.ndarray, name: str, n: int | None = None) -> None:
    rows = array.shape[0] if n is None else n
    if array.shape != (rows, rows):
        raise ValueError(f"{name} must be square ({rows}, {rows}), got {array.shape}")


@dataclass
class BlockQUBO:
    """The QUBO of one block: ``L(x) = x^T Q x + c`` for binary keep masks ``x``.

    Attributes:
        Q: ``(n, n)`` float64 symmetric matrix; negative entries are kept.
        c: Constant offset, ``L(0)``: the estimated loss change of pruning the whole block.
    """

    Q: np.ndarray
    c: float

    @property
    def n(self) -> int:
        """Number of weights in the block."""
        return int(self.Q.shape[0])

    def energy(self, x: Any) -> float:
        """Returns ``x^T Q x + c``, the estimated loss change for the keep mask ``x``.

        The identity with the Taylor estimate holds for binary ``x`` only (``x_i^2 = x_i``).

        Args:
            x: ``(n,)`` keep mask (1 keeps ``w0_i``, 0 prunes); tensor or array-like.

        Returns:
            The energy as a Python float.

        Raises:
            ValueError: If ``x`` does not have shape ``(n,)``.
        """
        xs = _as_array(x, "x", 1)
        _check_vector(xs, "x", self.n)
        return float(xs @ self.Q @ xs + self.c)


def taylor_estimate(
    delta: Any,
    g: Any,
    H: Any,
    grad_multiplier: float = 1.0,
    ridge: float = 0.0,
) -> float:
    """Second-order estimate ``gamma g^T delta + 1/2 delta^T H delta + lambda ||delta||^2``.

    Args:
        delta: ``(n,)`` change of the block's weights.
        g: ``(n,)`` gradient of the loss at the current weights.
        H: ``(n, n)`` Hessian (or Fisher) block.
        grad_multiplier: ``gamma``, the weight of the gradient term.
        ridge: ``lambda``, the weight of the squared-norm penalty.

    Returns:
        The estimate as a Python float.

    Raises:
        ValueError: On inconsistent shapes.
    """
    d = _as_array(delta, "delta", 1)
    n = d.shape[0]
    gv = _as_array(g, "g", 1)
    _check_vector(gv, "g", n)
    Hm = _as_array(H, "H", 2)
    _check_square(Hm, "H", n)
    return float(grad_multiplier * gv @ d + 0.5 * d @ Hm @ d + ridge * d @ d)


def build_qubo(
    w: Any,
    w0: Any,
    g: Any,
    H: Any,
    grad_multiplier: float = 1.0,
    ridge: float = 0.0,
) -> BlockQUBO:
    """Builds the QUBO whose energy equals :func:`taylor_estimate` of ``delta = x * w0 - w``.

    ``H`` is symmetrised first (``delta^T H delta`` only sees its symmetric part, and the
    expansion assumes symmetry), so the identity ``energy(x) == taylor_estimate(x * w0 - w, g, H,
    grad_multiplier, ridge)`` holds for every binary ``x`` and any square ``H``.

    Args:
        w: ``(n,)`` current weights of the block (e.g. ``w0`` masked by the current mask).
        w0: ``(n,)`` original weights; a kept weight returns to this value.
        g: ``(n,)`` gradient of the loss at the current weights.
        H: ``(n, n)`` Hessian or Fisher block.
        grad_multiplier: ``gamma``.
        ridge: ``lambda``.

    Returns:
        The :class:`BlockQUBO` with float64 symmetric ``Q`` and exact constant ``c``.

    Raises:
        ValueError: On inconsistent shapes or non-finite inputs.
    """
    w0v = _as_array(w0, "w0", 1)
    n = w0v.shape[0]
    wv = _as_array(w, "w", 1)
    _check_vector(wv, "w", n)
    gv = _as_array(g, "g", 1)
    _check_vector(gv, "g", n)
    Hm = _as_array(H, "H", 2)
    _check_square(Hm, "H", n)
    Hm = 0.5 * (Hm + Hm.T)
    gamma = float(grad_multiplier)
    lam = float(ridge)

    Hw = Hm @ wv
    Q = 0.5 * (w0v[:, None] * Hm * w0v[None, :])
    Q[np.diag_indices(n)] += lam * w0v**2 + gamma * w0v * gv - w0v * Hw - 2.0 * lam * w0v * wv
    Q = 0.5 * (Q + Q.T)
    c = -gamma * float(gv @ wv) + 0.5 * float(wv @ Hw) + lam * float(wv @ wv)
    return BlockQUBO(Q=Q, c=c)


def scale_for_solver(Q: Any) -> tuple[np.ndarray, float]:
    """Divides ``Q`` by the mean ``|Q_ij|`` so the solver sees entries of order one.

    Only a *positive* scaling leaves ``argmin x^T Q x`` (under any constraint on ``x``)
    unchanged; a negative one would turn the minimisation into a maximisation. The mean absolute
    entry is positive unless ``Q`` is all zeros, in which case ``Q`` is returned as is with factor
    ``1.0``. Energies map back as ``x^T Q x = factor * x^T Q_scaled x`` (``c`` is unaffected).

    Args:
        Q: ``(n, n)`` QUBO matrix (tensor or array).

    Returns:
        ``(Q_scaled, factor)`` with ``Q_scaled = Q / factor`` (float64) and ``factor > 0``.

    Raises:
        ValueError: If ``Q`` is not square or has non-finite entries.
    """
    Qm = _as_array(Q, "Q", 2)
    _check_square(Qm, "Q")
    factor = float(np.mean(np.abs(Qm))) if Qm.size else 0.0
    if not factor > 0.0:
        return Qm.copy(), 1.0
    return Qm / factor, factor


# --- gradient and curvature of one parameter block ----------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.train(training)


def _block_setup(
    model: nn.Module, param_name: str, idx: Any, loss_fn: LossFn, batches: Batches
) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Returns the block's current values and ``loss(v, x, y)`` with the block set to ``v``.

    All parameters and buffers are passed detached to :func:`functional_call`, so only the block
    variable ``v`` is differentiated and the model is left untouched.
    """
    params = dict(model.named_parameters())
    if param_name not in params:
        raise ValueError(f"model has no parameter named {param_name!r}")
    if len(batches) == 0:
        raise ValueError("batches is empty")
    param = params[param_name]
    flat = param.detach().reshape(-1)
    index = torch.as_tensor(idx, dtype=torch.long, device=flat.device)
    if index.ndim != 1 or index.numel() == 0:
        raise ValueError(f"idx must be a non-empty 1-D index list, got shape {tuple(index.shape)}")
    if int(index.min()) < 0 or int(index.max()) >= flat.numel():
        raise ValueError(f"idx out of range for {param_name!r} with {flat.numel()} entries")
    if torch.unique(index).numel() != index.numel():
        raise ValueError("idx has duplicate entries")

    state = {name: p.detach() for name, p in model.named_parameters()}
    state.update({name: b.detach() for name, b in model.named_buffers()})

    def loss_at(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rebuilt = flat.index_put((index,), v).view_as(param)
        out = functional_call(model, {**state, param_name: rebuilt}, (x,))
        return loss_fn(out, y)

    return flat[index].clone(), loss_at


def _to(batch: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> tuple[Any, Any]:
    x, y = batch
    return x.to(like.device), y.to(like.device)


def block_gradient(
    model: nn.Module, param_name: str, idx: Any, loss_fn: LossFn, batches: Batches
) -> torch.Tensor:
    """Gradient of the loss with respect to the block entries ``param.view(-1)[idx]``.

    Cost: one forward and one backward pass per batch. The model is evaluated in eval mode and is
    not modified (its training flags are restored).

    Args:
        model: The network.
        param_name: Name of the parameter in ``model.named_parameters()``.
        idx: ``(n,)`` distinct flat indices into ``param.view(-1)``.
        loss_fn: ``loss_fn(logits, targets)``, e.g. ``F.cross_entropy``.
        batches: List of ``(x, y)`` batches.

    Returns:
        ``(n,)`` gradient in the parameter's dtype, the unweighted mean over batches of each
        batch's gradient.

    Raises:
        ValueError: On an unknown parameter, bad indices or no batches.
    """
    v, loss_at = _block_setup(model, param_name, idx, loss_fn, batches)
    total = torch.zeros_like(v)
    with _eval_mode(model):
        for batch in batches:
            total += grad(loss_at)(v, *_to(batch, v))
    return total / len(batches)


def block_hessian_exact(
    model: nn.Module, param_name: str, idx: Any, loss_fn: LossFn, batches: Batches
) -> torch.Tensor:
    """Exact Hessian of the loss with respect to the block entries ``param.view(-1)[idx]``.

    Uses :func:`torch.func.hessian` (forward-over-reverse: ``jacfwd(jacrev(loss))``) on the block
    variable only, so the cost per batch is ``n`` Hessian-vector products, i.e. roughly ``n``
    backward passes (vectorised with ``vmap``, so memory grows with ``n`` too), never the
    full parameter's Hessian. The model is evaluated in eval mode and not modified.

    Args:
        model: The network.
        param_name: Name of the parameter in ``model.named_parameters()``.
        idx: ``(n,)`` distinct flat indices into ``param.view(-1)``.
        loss_fn: ``loss_fn(logits, targets)``.
        batches: List of ``(x, y)`` batches.

    Returns:
        ``(n, n)`` symmetric Hessian in the parameter's dtype, the unweighted mean over batches.

    Raises:
        ValueError: On an unknown parameter, bad indices or no batches.
    """
    v, loss_at = _block_setup(model, param_name, idx, loss_fn, batches)
    n = v.numel()
    total = v.new_zeros((n, n))
    with _eval_mode(model):
        for batch in batches:
            total += hessian(loss_at)(v, *_to(batch, v))
    total /= len(batches)
    return 0.5 * (total + total.T)


def block_fisher(
    model: nn.Module, param_name: str, idx: Any, loss_fn: LossFn, batches: Batches
) -> torch.Tensor:
    """Empirical Fisher ``(1/N) sum_s g_s g_s^T`` of the block from per-sample gradients.

    ``g_s`` is the gradient of ``loss_fn`` on sample ``s`` alone (its batch dimension kept, size
    one) with respect to the block entries; ``N`` is the total number of samples. Per-sample
    gradients come from one ``vmap(grad(...))`` per batch, so the cost is about one batched
    forward/backward pass per batch plus an ``(B, n)`` outer product. The model must support
    ``vmap`` (eval mode, which is enforced: no batch-norm statistics or dropout). The model is
    not modified.

    Args:
        model: The network.
        param_name: Name of the parameter in ``model.named_parameters()``.
        idx: ``(n,)`` distinct flat indices into ``param.view(-1)``.
        loss_fn: ``loss_fn(logits, targets)``.
        batches: List of ``(x, y)`` batches.

    Returns:
        ``(n, n)`` symmetric positive semi-definite matrix in the parameter's dtype.

    Raises:
        ValueError: On an unknown parameter, bad indices or no batches.
    """
    v, loss_at = _block_setup(model, param_name, idx, loss_fn, batches)

    def sample_loss(vb: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return loss_at(vb, xs.unsqueeze(0), ys.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    n = v.numel()
    total = v.new_zeros((n, n))
    count = 0
    with _eval_mode(model):
        for batch in batches:
            grads = per_sample(v, *_to(batch, v))
            total += grads.T @ grads
            count += grads.shape[0]
    total /= count
    return 0.5 * (total + total.T)
