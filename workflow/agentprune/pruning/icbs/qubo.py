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

The gradient and Fisher blocks of the pruner come from :class:`GradientTaps`: one forward and
backward pass per batch records every tapped layer's input and the gradient of each sample's loss
with respect to the layer's output, from which the per-sample gradient of *any* block of the
layer's weight is a gather and a sum (a Linear layer's per-sample weight gradient is
``sum_t dy_t x_t^T``; a convolution's is the same over its input patches, read from a strided
view of the padded input). So all the blocks of all the layers share one pass per batch, where a
per-block ``vmap(grad)`` costs a batched pass per block; :func:`fisher_model_gradient` corrects a
block's gradient for changes made since the pass under the pass's Fisher model.
:func:`block_gradient`, :func:`block_hessian_exact` and :func:`block_fisher` compute the same
quantities per block by differentiating the loss with respect to the block entries only (the
parameter is rebuilt from a block variable with ``index_put`` inside
:func:`torch.func.functional_call`); the pruner uses them for the exact Hessian, and the tests use
them as the reference of the taps. None of them modifies the model.

Implemented from the equations above; no reference code was consulted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

__all__ = [
    "BlockQUBO",
    "GradientTaps",
    "block_fisher",
    "block_gradient",
    "block_hessian_exact",
    "build_qubo",
    "fisher_from_samples",
    "fisher_model_gradient",
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
    if any(training for _, training in flags):
        model.eval()
    try:
        yield
    finally:
        # Flag by flag: ``train()`` recurses, so calling it per module would be quadratic.
        for module, training in flags:
            module.training = training


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


# --- per-sample block gradients of every layer from one pass per batch ----------------------------

TAPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def fisher_from_samples(per_sample: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher ``(1/N) sum_s g_s g_s^T`` from the ``(N, n)`` per-sample gradients.

    Raises:
        ValueError: If ``per_sample`` is not a non-empty 2-D tensor.
    """
    if per_sample.ndim != 2 or per_sample.shape[0] == 0:
        raise ValueError(f"per_sample must be (N, n) with N > 0, got {tuple(per_sample.shape)}")
    fisher = per_sample.T @ per_sample / per_sample.shape[0]
    return 0.5 * (fisher + fisher.T)


def fisher_model_gradient(per_sample: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The block gradient of the pass's quadratic loss model after changes ``d`` elsewhere.

    With per-sample gradients ``G`` (rows ``g_s``) at the pass's weights, the model
    ``L(d) = mean(g_s)^T d + 1/2 d^T F d`` with ``F = G^T G / N`` has gradient
    ``mean(g_s) + F d``. For a block ``B`` and changes already made ``d`` (any coordinates),
    ``(F d)_B = G_B^T (G d) / N``, so only the per-sample loss shift ``u = G d`` (``(N,)``, the
    sum of ``G_A d_A`` over the changed blocks ``A``) is needed.

    Args:
        per_sample: ``(N, n)`` per-sample gradients of the block.
        shift: ``(N,)`` per-sample loss shift ``u`` of the changes made since the pass.

    Returns:
        ``(n,)`` gradient.

    Raises:
        ValueError: On inconsistent shapes.
    """
    if per_sample.ndim != 2 or shift.shape != (per_sample.shape[0],):
        raise ValueError(
            f"per_sample (N, n) and shift (N,) disagree: {tuple(per_sample.shape)}, "
            f"{tuple(shift.shape)}"
        )
    return per_sample.mean(0) + per_sample.T @ shift / per_sample.shape[0]


def _conv_pads(module: nn.Conv1d | nn.Conv2d) -> list[int]:
    """``F.pad`` widths (last dimension first) of the convolution's own padding.

    ``padding="same"`` puts the odd pixel on the right, as the convolution itself does.
    """
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pairs = [(0, 0)] * len(module.kernel_size)
        else:
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in module.padding]
    return [v for pair in reversed(pairs) for v in pair]


def pad_conv_input(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input with its own padding applied (``padding_mode`` included)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, _conv_pads(module), mode=mode)


def _conv_windows(module: nn.Conv1d | nn.Conv2d, padded: torch.Tensor) -> torch.Tensor:
    """A strided view ``(C_in, B, *out_positions, *kernel_span)`` of the channel-major padded
    input ``(C_in, B, *spatial)``: entry ``[..., p, q]`` is the input pixel that kernel offset
    ``q`` (in dilated units) meets at output position ``p``. A view, so no patch matrix (im2col)
    is ever materialised."""
    windows = padded
    for dim, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        windows = windows.unfold(2 + dim, d * (k - 1) + 1, s)
    return windows


def _channel_major(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call's input and output gradient with the channel first, ``(C, B, ...)``, so that a
    block's channels are gathered as contiguous rows. A convolution's input is padded first."""
    if isinstance(module, nn.Linear):
        xs = x.reshape(x.shape[0], -1, module.in_features).permute(2, 0, 1)
        dys = dy.reshape(dy.shape[0], -1, module.out_features).permute(2, 0, 1)
        return xs.contiguous(), dys.contiguous()
    padded = pad_conv_input(module, x).transpose(0, 1).contiguous()
    dys = dy.reshape(dy.shape[0], module.out_channels, -1).transpose(0, 1).contiguous()
    return padded, dys


def _block_per_sample(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """``(B, n)`` per-sample gradients of the flat weight entries ``idx`` from one call's input
    ``x`` and output gradient ``dy``, both channel-major (:func:`_channel_major`)."""
    if isinstance(module, nn.Linear):
        fan_in = module.in_features
        return (dy[idx // fan_in] * x[idx % fan_in]).sum(-1).T
    # Weight entry (o, c, *k) meets input channel group(o) * C_in/groups + c at offset k.
    shape = module.weight.shape
    coords = list(torch.unravel_index(idx, shape))
    out, channel, offsets = coords[0], coords[1], coords[2:]
    group = out // (module.out_channels // module.groups)
    channel = group * shape[1] + channel
    windows = _conv_windows(module, x)
    spatial = len(offsets)
    # Advanced indices on dim 0 and the trailing kernel dims: the result is (n, B, *positions).
    picked = windows[
        (
            channel,
            slice(None),
            *([slice(None)] * spatial),
            *[o * d for o, d in zip(offsets, module.dilation)],
        )
    ]
    return (dy[out] * picked.reshape(len(idx), x.shape[1], -1)).sum(-1).T


class GradientTaps:
    """Per-sample gradients of any weight block of the tapped layers from one pass per batch.

    :meth:`capture` runs the model once forward and once backward on a batch, recording each
    tapped layer's input and the gradient of every sample's own loss with respect to the layer's
    output (the batch-mean loss times the batch size, so sample ``s``'s output rows receive
    ``d loss_s / d y_s``; valid for a loss that is a mean of per-sample losses and a model whose
    samples do not interact in eval mode). A weight entry's per-sample gradient is then the sum
    over positions of output gradient times input (:meth:`per_sample`), so every block of every
    tapped layer is served by the same pass. A layer called several times sums its calls.

    Args:
        layers: name -> ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` module of the model.

    Raises:
        ValueError: On another module type.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        for name, module in layers.items():
            if not isinstance(module, TAPPABLE):
                kind = type(module).__name__
                raise ValueError(f"layer {name!r} is a {kind}; taps support Linear/Conv1d/Conv2d")
        self.layers = dict(layers)
        # Per layer, each call's (input, output gradient), channel-major.
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.batch_size = 0

    def capture(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn
    ) -> float:
        """Runs the forward/backward pass on ``batch`` (eval mode, model unchanged).

        Returns:
            The batch's mean loss.
        """
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

        def recorder(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
                inputs[name].append(args[0].detach())
                outputs[name].append(out)

            return record

        # Only the tapped weights require grad during the pass: their outputs carry the graph,
        # and nothing upstream of the first tapped layer records one. Flags are restored.
        tapped = {id(m.weight) for m in self.layers.values()}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        handles = [m.register_forward_hook(recorder(n)) for n, m in self.layers.items()]
        try:
            for param, _ in flags:
                param.requires_grad_(id(param) in tapped)
            with _eval_mode(model), torch.enable_grad():
                x, y = _to(batch, next(model.parameters()))
                loss = loss_fn(model(x), y)
                flat = [out for name in self.layers for out in outputs[name]]
                grads = torch.autograd.grad(loss * x.shape[0], flat, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for param, flag in flags:
                param.requires_grad_(flag)
        it = iter(grads)
        self._calls = {}
        for name, module in self.layers.items():
            calls = []
            for x_in, out in zip(inputs[name], outputs[name]):
                dy = next(it)
                dy = torch.zeros_like(out) if dy is None else dy.detach()
                calls.append(_channel_major(module, x_in, dy))
            self._calls[name] = calls
        self.batch_size = int(x.shape[0])
        return float(loss.detach())

    def per_sample(self, name: str, idx: Any) -> torch.Tensor:
        """``(B, n)`` gradients of each sample's loss with respect to ``weight.view(-1)[idx]``.

        Raises:
            ValueError: Before :meth:`capture`, for an untapped layer, or on bad indices.
        """
        if name not in self._calls:
            raise ValueError(f"layer {name!r} was not captured (tapped: {sorted(self.layers)})")
        module = self.layers[name]
        index = torch.as_tensor(idx, dtype=torch.long, device=module.weight.device)
        if index.ndim != 1 or index.numel() == 0:
            shape = tuple(index.shape)
            raise ValueError(f"idx must be a non-empty 1-D index list, got shape {shape}")
        if int(index.min()) < 0 or int(index.max()) >= module.weight.numel():
            raise ValueError(f"idx out of range for {name!r} with {module.weight.numel()} entries")
        total = module.weight.new_zeros((self.batch_size, index.numel()))
        for x, dy in self._calls[name]:
            total += _block_per_sample(module, x, dy, index)
        return total

    def block_statistics(self, name: str, idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's batch-mean gradient ``(n,)`` and empirical Fisher ``(n, n)``."""
        per_sample = self.per_sample(name, idx)
        return per_sample.mean(0), fisher_from_samples(per_sample)
