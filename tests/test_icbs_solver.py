"""Tests of the iCBS cardinality-constrained QUBO annealer (agentprune.pruning.icbs.solver).

Sized for a shared 2-core CPU: after the numba kernels are compiled once (and cached on disk), the
whole module runs in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from agentprune.pruning.icbs import solver
from agentprune.pruning.icbs.solver import anneal, beta_schedule, energy, exhaustive

QUICK = {"beta_factor": 1.5}  # 30 levels instead of 122


def random_symmetric(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Symmetric matrix with standard normal entries (both signs) plus ``shift``."""
    a = np.random.default_rng(seed).normal(size=(n, n)) + shift
    return (a + a.T) / 2


def fisher_block(n: int, seed: int) -> np.ndarray:
    """iCBS-like PSD ``diag(w) G^T G / m diag(w)`` (entries of both signs), mean |Q_ij| = 1."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n)
    g = rng.normal(size=(max(2, n // 2), n))
    q = w[:, None] * (g.T @ g / g.shape[0]) * w[None, :]
    q = (q + q.T) / 2
    return q / np.mean(np.abs(q))


def small_instances() -> list:
    """20 small (n in 2..12) instances with various k and entries of both signs."""
    out = []
    for idx in range(20):
        rng = np.random.default_rng(1000 + idx)
        n = int(rng.integers(2, 13))
        k = int(rng.integers(1, n)) if idx % 5 else int(rng.choice([0, n, 1, n - 1]))
        if idx % 4 == 3:
            q = fisher_block(n, idx)
        else:
            q = random_symmetric(n, idx, shift=float(rng.uniform(-0.5, 0.5)))
        out.append(pytest.param(idx, q, k, id=f"{idx}-n{n}-k{k}"))
    return out


@pytest.mark.parametrize(("idx", "q", "k"), small_instances())
def test_anneal_matches_exhaustive(idx: int, q: np.ndarray, k: int) -> None:
    x_ex, e_ex = exhaustive(q, k)
    x, e = anneal(q, k, seed=idx)
    assert int(x.sum()) == k == int(x_ex.sum())
    assert e == pytest.approx(e_ex, rel=1e-12, abs=1e-12)


def test_exhaustive_small_known_answers() -> None:
    q = np.diag([3.0, 1.0, 2.0])
    x, e = exhaustive(q, 1)
    assert x.tolist() == [0, 1, 0] and e == 1.0
    # Off-diagonals make the pair {0, 2} best although its diagonal is not the smallest.
    q = np.array([[1.0, 2.0, -3.0], [2.0, 0.0, 1.0], [-3.0, 1.0, 1.0]])
    x, e = exhaustive(q, 2)
    assert x.tolist() == [1, 0, 1] and e == pytest.approx(-4.0)
    assert exhaustive(q, 0)[1] == 0.0
    assert exhaustive(q, 3)[1] == pytest.approx(q.sum())


@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (17, 5), (300, 1), (300, 299), (2000, 700)])
def test_cardinality_and_exact_energy(n: int, k: int) -> None:
    q = random_symmetric(n, n + k, shift=0.1)
    x, e = anneal(q, k, restarts=2, seed=3, **QUICK)
    assert x.shape == (n,) and x.dtype == np.int8
    assert set(np.unique(x).tolist()) <= {0, 1}
    assert int(x.sum()) == k
    assert isinstance(e, float)
    assert e == pytest.approx(float(x @ q @ x), rel=1e-12, abs=1e-9)
    assert e == energy(q, x)


def test_trivial_cardinalities_return_immediately() -> None:
    q = random_symmetric(6, 0)
    x, e = anneal(q, 0)
    assert x.tolist() == [0] * 6 and e == 0.0
    x, e = anneal(q, 6)
    assert x.tolist() == [1] * 6 and e == pytest.approx(q.sum())


def test_anneal_beats_random_subsets() -> None:
    q = fisher_block(200, 7)
    _, e = anneal(q, 100, restarts=4, seed=0, **QUICK)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = np.zeros(200)
        x[rng.choice(200, 100, replace=False)] = 1
        assert e < energy(q, x)


def test_determinism_and_seeds() -> None:
    q = random_symmetric(200, 11)
    x0, e0 = anneal(q, 60, restarts=4, seed=5, **QUICK)
    x1, e1 = anneal(q, 60, restarts=4, seed=5, **QUICK)
    assert np.array_equal(x0, x1) and e0 == e1
    others = [anneal(q, 60, restarts=4, seed=s, **QUICK)[0] for s in (6, 7, 8)]
    assert any(not np.array_equal(x0, x) for x in others)
    # Restart r's stream depends on (seed, r) only: more restarts can only help.
    assert anneal(q, 60, restarts=8, seed=5, **QUICK)[1] <= e0


def test_thread_count_independence() -> None:
    q = random_symmetric(120, 21)
    kwargs = {"restarts": 5, "seed": 9, **QUICK}
    x_default, _ = anneal(q, 40, **kwargs)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        x_one, _ = anneal(q, 40, **kwargs)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(x_default, x_one)
    # A fresh process limited to one thread by NUMBA_NUM_THREADS gives the same answer.
    code = textwrap.dedent(
        f"""
        import numpy as np
        from agentprune.pruning.icbs.solver import anneal
        a = np.random.default_rng(21).normal(size=(120, 120))
        x, _ = anneal((a + a.T) / 2, 40, **{kwargs!r})
        print("".join(map(str, x.tolist())))
        """
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "".join(map(str, x_default.tolist()))


def test_serial_and_parallel_kernels_agree() -> None:
    q = fisher_block(48, 5)
    betas = beta_schedule(1e-3, 100.0, 1.5)
    seeds = solver.restart_seeds(3, 4)
    results = []
    for kernel in (solver._anneal_restarts, solver._anneal_restarts_serial):
        xs = np.zeros((4, 48), dtype=np.int8)
        energies = np.empty(4)
        kernel(q, 20, betas, 48, seeds, xs, energies)
        results.append((xs, energies))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_parallel_restarts_use_the_workqueue_threading_layer() -> None:
    # numba's OpenMP layer next to torch's OpenMP slows torch down by an order of magnitude.
    code = textwrap.dedent(
        """
        import numba
        import numpy as np
        from agentprune.pruning.icbs.solver import anneal
        numba.set_num_threads(2)
        anneal(np.eye(16), 8, restarts=2, beta_factor=2.0)
        print(numba.threading_layer())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["NUMBA_NUM_THREADS"] = "2"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "workqueue"


def test_tolerated_asymmetry_uses_the_given_matrix() -> None:
    q = random_symmetric(10, 4)
    q[0, 1] += 1e-9
    x, e = anneal(q, 4)
    assert e == pytest.approx(float(x @ q @ x), rel=1e-12)
    assert e == pytest.approx(exhaustive(q, 4)[1], rel=1e-9)


def test_beta_schedule() -> None:
    b = beta_schedule()
    assert len(b) == 122 and b[0] == 1e-3 and b[-1] == 100.0
    np.testing.assert_allclose(b[1:-1] / b[:-2], 1.1)
    assert beta_schedule(2.0, 2.0, 1.5).tolist() == [2.0]
    assert beta_schedule(1.0, 8.0, 2.0).tolist() == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    ("q", "k", "kwargs", "match"),
    [
        (np.zeros((3, 4)), 1, {}, "square"),
        (np.zeros(4), 1, {}, "square"),
        (np.zeros((2, 2, 2)), 1, {}, "square"),
        (np.array([[0.0, 1.0], [0.0, 0.0]]), 1, {}, "symmetric"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), 1, {}, "non-finite"),
        (np.array([[0.0, np.inf], [np.inf, 0.0]]), 1, {}, "non-finite"),
        (np.array([["a", "b"], ["c", "d"]]), 1, {}, "real numeric"),
        (np.eye(3), -1, {}, r"k must be in \[0, n\]"),
        (np.eye(3), 4, {}, r"k must be in \[0, n\]"),
        (np.eye(3), 1.5, {}, "k must be an integer"),
        (np.eye(3), True, {}, "k must be an integer"),
        (np.eye(3), 1, {"restarts": 0}, "restarts"),
        (np.eye(3), 1, {"sweeps": 0}, "sweeps"),
        (np.eye(3), 1, {"seed": -1}, "seed"),
        (np.eye(3), 1, {"beta_initial": 0.0}, "beta_initial"),
        (np.eye(3), 1, {"beta_final": 1e-4}, "beta_final"),
        (np.eye(3), 1, {"beta_factor": 1.0}, "beta_factor"),
        (np.eye(3), 1, {"beta_final": float("inf")}, "beta_final must be finite"),
    ],
)
def test_invalid_inputs(q: np.ndarray, k: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        anneal(q, k, **kwargs)


def test_exhaustive_refuses_large_n() -> None:
    with pytest.raises(ValueError, match="n <= 20"):
        exhaustive(np.eye(21), 3)
    with pytest.raises(ValueError, match="symmetric"):
        exhaustive(np.triu(np.ones((4, 4))), 2)


def test_energy_shape_check() -> None:
    with pytest.raises(ValueError, match="shapes"):
        energy(np.eye(3), np.ones(4))
