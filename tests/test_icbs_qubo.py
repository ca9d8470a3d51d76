"""iCBS block QUBO: the energy x^T Q x + c equals the second-order Taylor estimate of the keep
mask's weight change (checked against an independent full-parameter Hessian), the block
gradient/Hessian/Fisher match plain autograd, the taps' per-sample gradients match a sample-by-
sample autograd loop for Linear and Conv layers, and solver scaling keeps the argmin."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agentprune.pruning.icbs.qubo import (
    BlockQUBO,
    GradientTaps,
    block_fisher,
    block_gradient,
    block_hessian_exact,
    build_qubo,
    fisher_from_samples,
    fisher_model_gradient,
    scale_for_solver,
    taylor_estimate,
)
from torch import nn
from torch.func import functional_call

PARAM = "0.weight"
N_BLOCK = 6
ALL_MASKS = [np.array(bits, dtype=np.float64) for bits in itertools.product((0, 1), repeat=N_BLOCK)]


def _tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.fixture(scope="module")
def setup():
    model = _tiny_mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(size, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (size,)))
        for size in (8, 5)
    ]
    idx = torch.randperm(30, generator=gen)[:N_BLOCK]
    return model, batches, idx


def _flat(model: nn.Module) -> torch.Tensor:
    return dict(model.named_parameters())[PARAM].detach().reshape(-1).clone()


def _full_loss(model: nn.Module, flat: torch.Tensor, batches) -> torch.Tensor:
    """Mean over batches of the loss with the whole first-layer weight given by ``flat``."""
    shape = dict(model.named_parameters())[PARAM].shape
    losses = [
        F.cross_entropy(functional_call(model, {PARAM: flat.view(shape)}, (x,)), y)
        for x, y in batches
    ]
    return torch.stack(losses).mean()


def _reference(model: nn.Module, batches, idx: torch.Tensor):
    """Independent path: full-parameter gradient and Hessian, then sliced to the block."""
    flat = _flat(model)
    H_full = torch.func.hessian(lambda t: _full_loss(model, t, batches))(flat)
    t = flat.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(_full_loss(model, t, batches), t)
    return g_full[idx].detach().numpy(), H_full[idx][:, idx].detach().numpy()


def _with_block(model: nn.Module, idx: torch.Tensor, values: torch.Tensor) -> nn.Module:
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        dict(pruned.named_parameters())[PARAM].view(-1)[idx] = values
    return pruned


@pytest.mark.parametrize(
    ("prepruned", "gamma", "ridge"),
    [(False, 1.0, 0.0), (False, 0.7, 0.0), (False, 1.0, 0.3), (True, 1.0, 0.0), (True, 1.5, 0.2)],
)
def test_energy_equals_taylor_estimate_for_every_mask(setup, prepruned, gamma, ridge):
    model, batches, idx = setup
    w0 = _flat(model)[idx]
    current = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    if prepruned:
        model = _with_block(model, idx, w0 * current)
    w = _flat(model)[idx]
    assert torch.equal(w, w0 * current if prepruned else w0)

    g = block_gradient(model, PARAM, idx, F.cross_entropy, batches)
    H = block_hessian_exact(model, PARAM, idx, F.cross_entropy, batches)
    g_ref, H_ref = _reference(model, batches, idx)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H.numpy(), H_ref, rtol=1e-10, atol=1e-12)

    qubo = build_qubo(w, w0, g, H, grad_multiplier=gamma, ridge=ridge)
    assert qubo.Q.dtype == np.float64 and qubo.Q.shape == (N_BLOCK, N_BLOCK)
    np.testing.assert_array_equal(qubo.Q, qubo.Q.T)
    assert (qubo.Q < 0).any()  # negative entries are kept

    w_np, w0_np = w.numpy(), w0.numpy()
    energies = np.array([qubo.energy(x) for x in ALL_MASKS])
    estimates = np.array(
        [taylor_estimate(x * w0_np - w_np, g_ref, H_ref, gamma, ridge) for x in ALL_MASKS]
    )
    abs_err = np.abs(energies - estimates)
    assert abs_err.max() < 1e-5
    assert abs_err.max() / np.abs(estimates).max() < 1e-5
    big = np.abs(estimates) > 1e-8
    assert (abs_err[big] / np.abs(estimates[big])).max() < 1e-5
    # Keeping exactly the current weights changes nothing; pruning everything gives c.
    assert qubo.energy(current.numpy() if prepruned else np.ones(N_BLOCK)) == pytest.approx(
        0.0, abs=1e-12
    )
    assert qubo.energy(np.zeros(N_BLOCK)) == pytest.approx(qubo.c, abs=1e-15)


def test_taylor_estimate_matches_true_loss_change_for_tiny_delta(setup):
    model, batches, idx = setup
    g = block_gradient(model, PARAM, idx, F.cross_entropy, batches).numpy()
    H = block_hessian_exact(model, PARAM, idx, F.cross_entropy, batches).numpy()
    delta = 1e-2 * np.random.default_rng(2).standard_normal(N_BLOCK)
    flat = _flat(model)
    moved = flat.clone()
    moved[idx] += torch.from_numpy(delta)
    with torch.no_grad():
        true = float(_full_loss(model, moved, batches) - _full_loss(model, flat, batches))
    second = taylor_estimate(delta, g, H, 1.0, 0.0)
    first = float(g @ delta)
    assert abs(second - true) < 1e-3 * abs(true)
    assert abs(second - true) < abs(first - true)


def test_block_fisher_is_psd_and_matches_per_sample_loop(setup):
    model, batches, idx = setup
    fisher = block_fisher(model, PARAM, idx, F.cross_entropy, batches)
    assert fisher.shape == (N_BLOCK, N_BLOCK)
    assert torch.equal(fisher, fisher.T)
    assert torch.linalg.eigvalsh(fisher).min() > -1e-12

    flat = _flat(model)
    shape = dict(model.named_parameters())[PARAM].shape
    reference = torch.zeros(N_BLOCK, N_BLOCK, dtype=torch.float64)
    count = 0
    for x, y in batches:
        for s in range(x.shape[0]):
            t = flat.clone().requires_grad_(True)
            out = functional_call(model, {PARAM: t.view(shape)}, (x[s : s + 1],))
            (g_full,) = torch.autograd.grad(F.cross_entropy(out, y[s : s + 1]), t)
            reference += torch.outer(g_full[idx], g_full[idx])
            count += 1
    torch.testing.assert_close(fisher, reference / count, rtol=1e-10, atol=1e-14)


def test_block_functions_leave_the_model_alone_and_use_eval_mode():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2)).double()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 2, (7,)))]
    idx = [0, 5, 9, 23]
    for fn in (block_gradient, block_hessian_exact, block_fisher):
        first = fn(model, PARAM, idx, F.cross_entropy, batches)
        second = fn(model, PARAM, idx, F.cross_entropy, batches)
        assert torch.equal(first, second)  # dropout is off
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_scale_for_solver_keeps_the_constrained_argmin():
    rng = np.random.default_rng(4)
    n = 8
    A = rng.standard_normal((n, n))
    Q = 0.5 * (A + A.T)
    assert (Q < 0).any()
    Q_scaled, factor = scale_for_solver(Q)
    assert factor > 0
    assert np.mean(np.abs(Q_scaled)) == pytest.approx(1.0)
    np.testing.assert_allclose(Q_scaled * factor, Q, rtol=1e-14)
    for k in range(1, n):
        masks = []
        for keep in itertools.combinations(range(n), k):
            x = np.zeros(n)
            x[list(keep)] = 1.0
            masks.append(x)
        raw = [x @ Q @ x for x in masks]
        scaled = [x @ Q_scaled @ x for x in masks]
        assert int(np.argmin(raw)) == int(np.argmin(scaled))
        np.testing.assert_allclose(np.array(scaled) * factor, raw, rtol=1e-12, atol=1e-12)


def test_scale_for_solver_all_zero_and_tensor_input():
    Q_scaled, factor = scale_for_solver(np.zeros((3, 3)))
    assert factor == 1.0
    assert not Q_scaled.any()
    Q_scaled, factor = scale_for_solver(torch.full((2, 2), -2.0))
    assert factor == 2.0
    np.testing.assert_array_equal(Q_scaled, -np.ones((2, 2)))


def test_build_qubo_accepts_float32_tensors_and_symmetrises_H():
    rng = np.random.default_rng(5)
    n = 4
    w0 = rng.standard_normal(n)
    w = w0 * np.array([1, 0, 1, 1])
    g = rng.standard_normal(n)
    H = rng.standard_normal((n, n))  # not symmetric
    qubo = build_qubo(*(torch.from_numpy(a).float() for a in (w, w0, g, H)), 0.5, 0.1)
    assert isinstance(qubo, BlockQUBO) and qubo.Q.dtype == np.float64
    for bits in itertools.product((0, 1), repeat=n):
        x = np.array(bits, dtype=np.float64)
        expected = taylor_estimate(x * w0 - w, g, H, 0.5, 0.1)
        assert qubo.energy(torch.tensor(bits)) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_invalid_shapes_raise(setup):
    n = 3
    v, M = np.ones(n), np.eye(n)
    with pytest.raises(ValueError):
        build_qubo(np.ones(n + 1), v, v, M)
    with pytest.raises(ValueError):
        build_qubo(v, v, np.ones((n, 1)), M)
    with pytest.raises(ValueError):
        build_qubo(v, v, v, np.ones((n, n + 1)))
    with pytest.raises(ValueError):
        build_qubo(v, v, v, np.eye(n + 1))
    with pytest.raises(ValueError):
        build_qubo(v, np.ones((n, n)), v, M)
    with pytest.raises(ValueError):
        build_qubo(v, v, np.array([1.0, np.nan, 0.0]), M)
    with pytest.raises(ValueError):
        build_qubo(v, v, v, M).energy(np.ones(n + 1))
    with pytest.raises(ValueError):
        taylor_estimate(v, np.ones(n + 1), M)
    with pytest.raises(ValueError):
        taylor_estimate(v, v, np.eye(n + 1))
    with pytest.raises(ValueError):
        scale_for_solver(np.ones((n, n + 1)))
    with pytest.raises(ValueError):
        scale_for_solver(v)

    model, batches, _ = setup
    for fn in (block_gradient, block_hessian_exact, block_fisher):
        for bad_idx in ([[0, 1], [2, 3]], [0, 30], [-1, 2], [1, 1], []):
            with pytest.raises(ValueError):
                fn(model, PARAM, bad_idx, F.cross_entropy, batches)
        with pytest.raises(ValueError):
            fn(model, "nope.weight", [0, 1], F.cross_entropy, batches)
        with pytest.raises(ValueError):
            fn(model, PARAM, [0, 1], F.cross_entropy, [])


# --- GradientTaps: per-sample block gradients from one pass -----------------------------------


def _per_sample_reference(model: nn.Module, param: str, x: torch.Tensor, y: torch.Tensor):
    """Each sample's own full-weight gradient by plain autograd, one sample at a time."""
    weight = dict(model.named_parameters())[param]
    rows = []
    for s in range(x.shape[0]):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x[s : s + 1]), y[s : s + 1]), weight)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


class _Shared(nn.Module):
    """One Linear applied twice (weight sharing), over a token dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))).mean(1))


def _conv_net(conv: nn.Module, channels: int, dims: int) -> nn.Module:
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
    return nn.Sequential(conv, nn.Tanh(), pool, nn.Flatten(), nn.Linear(channels, 3))


TAP_CASES = {
    "linear-tokens": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Flatten(), nn.Linear(18, 3)),
        "0.weight",
        (3, 5),
    ),
    "shared-linear": (_Shared, "inner.weight", (3, 4)),
    "conv2d-grouped-strided-dilated": (
        lambda: _conv_net(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), 6, 2),
        "0.weight",
        (4, 7, 6),
    ),
    "conv2d-depthwise-same": (
        lambda: _conv_net(nn.Conv2d(3, 3, (3, 2), padding="same", groups=3), 3, 2),
        "0.weight",
        (3, 5, 5),
    ),
    "conv2d-reflect": (
        lambda: _conv_net(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), 4, 2),
        "0.weight",
        (2, 5, 4),
    ),
    "conv1d-strided": (
        lambda: _conv_net(nn.Conv1d(3, 4, 3, stride=2, padding=1), 4, 1),
        "0.weight",
        (3, 9),
    ),
}


@pytest.mark.parametrize("case", sorted(TAP_CASES))
def test_taps_give_each_samples_own_gradient(case):
    factory, param, shape = TAP_CASES[case]
    torch.manual_seed(7)
    model = factory().double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    layer = dict(model.named_modules())[param.rsplit(".", 1)[0]]
    taps = GradientTaps({"layer": layer})
    loss = taps.capture(model, (x, y), F.cross_entropy)
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    reference = _per_sample_reference(model, param, x, y)
    every = torch.arange(layer.weight.numel())
    torch.testing.assert_close(taps.per_sample("layer", every), reference, rtol=1e-10, atol=1e-12)
    idx = torch.randperm(layer.weight.numel(), generator=torch.Generator().manual_seed(1))[:7]
    g, fisher = taps.block_statistics("layer", idx)
    block = reference[:, idx]
    torch.testing.assert_close(g, block.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher, block.T @ block / 5, rtol=1e-10, atol=1e-12)


def test_taps_match_the_block_functions_and_leave_the_model_alone(setup):
    model, batches, idx = setup
    model = copy.deepcopy(model).train()
    model[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taps = GradientTaps({"0": model[0], "2": model[2]})
    taps.capture(model, batches[0], F.cross_entropy)
    g, fisher = taps.block_statistics("0", idx)
    one = batches[:1]
    expected_g = block_gradient(model, PARAM, idx, F.cross_entropy, one)
    expected_fisher = block_fisher(model, PARAM, idx, F.cross_entropy, one)
    torch.testing.assert_close(g, expected_g, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fisher, expected_fisher, rtol=1e-10, atol=1e-14)
    assert all(m.training for m in model.modules())
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fisher_from_samples_and_the_corrected_gradient_by_hand():
    G = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    # (G^T G) / 2 = [[1+9, 2+12], [2+12, 4+16]] / 2
    torch.testing.assert_close(
        fisher_from_samples(G), torch.tensor([[5.0, 7.0], [7.0, 10.0]], dtype=torch.float64)
    )
    # mean(g_s) = (2, 3); shift u = (1, -1): G^T u / 2 = ((1 - 3) / 2, (2 - 4) / 2) = (-1, -1).
    shift = torch.tensor([1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(
        fisher_model_gradient(G, shift), torch.tensor([1.0, 2.0], dtype=torch.float64)
    )


def test_the_corrected_gradient_is_the_fisher_models_gradient_after_other_changes():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(9, 10, generator=gen, dtype=torch.float64)
    d = torch.zeros(10, dtype=torch.float64)
    d[:4] = torch.randn(4, generator=gen, dtype=torch.float64)  # changes of block A = 0..3
    expected = G.mean(0) + fisher_from_samples(G) @ d  # gradient of g^T d + 1/2 d^T F d
    block_b = torch.arange(4, 10)
    corrected = fisher_model_gradient(G[:, block_b], G[:, :4] @ d[:4])
    torch.testing.assert_close(corrected, expected[block_b], rtol=1e-12, atol=1e-12)


def test_taps_reject_bad_input(setup):
    model, batches, _ = setup
    with pytest.raises(ValueError, match="taps support Linear/Conv1d/Conv2d"):
        GradientTaps({"act": model[1]})
    taps = GradientTaps({"0": model[0]})
    with pytest.raises(ValueError, match="was not captured"):
        taps.per_sample("0", [0, 1])
    taps.capture(model, batches[0], F.cross_entropy)
    with pytest.raises(ValueError, match="was not captured"):
        taps.per_sample("2", [0, 1])
    for bad in ([[0, 1]], [], [0, 30], [-1]):
        with pytest.raises(ValueError, match="idx"):
            taps.per_sample("0", bad)
    with pytest.raises(ValueError, match=r"\(N, n\)"):
        fisher_from_samples(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="disagree"):
        fisher_model_gradient(torch.zeros(4, 3), torch.zeros(3))
