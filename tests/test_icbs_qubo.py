"""iCBS block QUBO: the energy x^T Q x + c equals the second-order Taylor estimate of the keep
mask's weight change (checked against an independent full-parameter Hessian), the block
gradient/Hessian/Fisher match plain autograd, and solver scaling keeps the argmin."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agentprune.pruning.icbs.qubo import (
    BlockQUBO,
    block_fisher,
    block_gradient,
    block_hessian_exact,
    build_qubo,
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
