"""Cardinality-constrained QUBO solver for iCBS blocks: simulated annealing with swap moves.

Minimises ``E(x) = x^T Q x`` over ``x in {0, 1}^n`` with ``sum(x) = k`` for a dense symmetric
``Q`` (float64). iCBS (arXiv 2411.17796) solves one such problem per block of weights; see
:mod:`agentprune.pruning.icbs.qubo` for how ``Q`` is built and scaled.

Algorithm (implemented from the description above; no reference code was consulted):

* **Moves keep the cardinality.** A proposal picks a uniformly random ``i`` with ``x_i = 1`` and a
  uniformly random ``j`` with ``x_j = 0`` and swaps them, so every ``x`` visited has exactly ``k``
  ones. Index lists of the ones and of the zeros make each pick O(1): an accepted swap exchanges the
  two list entries in place.
* **Cached local fields.** With ``h = Q x`` and the move ``x' = x - e_i + e_j``, symmetry of ``Q``
  gives ``E(x') = E(x) + 2 (e_j - e_i)^T Q x + (e_j - e_i)^T Q (e_j - e_i)``, i.e.

      dE = 2 h_j - 2 h_i + Q_ii + Q_jj - 2 Q_ij,

  which is O(1). An accepted swap updates the fields in O(n): ``h <- h + Q[j] - Q[i]`` (rows, since
  ``Q`` is symmetric and C-contiguous). A rejected proposal costs O(1).
* **Metropolis acceptance** at inverse temperature ``beta``: accept when ``dE <= 0``, otherwise
  with probability ``exp(-beta dE)``.
* **Geometric schedule.** The levels are ``beta_initial * beta_factor**l`` for every ``l >= 0``
  that stays below ``beta_final``, followed by ``beta_final`` itself (so the last level is always
  exactly ``beta_final``; with the defaults that is 121 + 1 = 122 levels). Each level runs
  ``sweeps`` sweeps, and **one sweep is ``n`` proposals** (accepted or not).
* **Restarts.** Each restart starts from a uniformly random ``k``-subset and keeps the lowest-energy
  state seen at the end of any level (the final state, for a schedule that ends cold). Restarts run
  in parallel (numba ``prange``, on the workqueue threading layer; one numba thread runs a serial
  kernel instead); restart ``r`` draws all its random numbers from its own
  splitmix64 stream seeded by ``numpy.random.SeedSequence(seed, spawn_key=(r,))``, and the best
  restart is chosen by exact energy with ties going to the lowest index, so the result depends on
  ``seed`` only and not on the number of threads.
* **Exact energy.** The returned energy is recomputed from scratch in float64 as ``x @ Q @ x``
  (the annealer's running energy accumulates rounding error).

``beta`` is measured in units of ``1 / Q``: the default schedule (``1e-3`` to ``100``) suits a
``Q`` scaled to mean ``|Q_ij| = 1`` (:func:`agentprune.pruning.icbs.qubo.scale_for_solver`).

The numba kernels are compiled on first use and cached on disk (``cache=True``), so later processes
load them instead of compiling.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
from typing import Any

import numba
import numpy as np
from numba import njit, prange

# numba's OpenMP threading layer next to torch's OpenMP runtime makes torch's kernels in the same
# process an order of magnitude slower once the annealer has run in parallel (measured: a 14 ms
# ConvNeXt forward pass took 250 ms); the workqueue layer has no such interaction. An explicit
# NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["anneal", "beta_schedule", "energy", "exhaustive", "restart_seeds"]

EXHAUSTIVE_MAX_N = 20
# |Q_ij - Q_ji| may be at most this times max |Q| (round-off of e.g. a float32 W H W product).
SYMMETRY_RTOL = 1e-6

# splitmix64 constants (Steele, Lea & Flood 2014), as uint64 so numba keeps the arithmetic unsigned.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_TWO_M53 = 2.0**-53


# --- numba kernels --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _next_u64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    """splitmix64: advances ``state`` and returns ``(state, 64 random bits)``."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return state, z ^ (z >> _S31)


@njit(cache=True, inline="always")
def _below(state: np.uint64, m: int) -> tuple[np.uint64, int]:
    """Uniform integer in ``[0, m)`` for ``1 <= m < 2**32`` (Lemire's multiply-shift)."""
    state, r = _next_u64(state)
    return state, np.int64(((r >> _S32) * np.uint64(m)) >> _S32)


@njit(cache=True, inline="always")
def _uniform(state: np.uint64) -> tuple[np.uint64, float]:
    """Uniform float in ``[0, 1)`` with 53 random bits."""
    state, r = _next_u64(state)
    return state, np.float64(r >> _S11) * _TWO_M53


@njit(cache=True)
def _scan(q: np.ndarray) -> tuple[bool, float, float]:
    """One pass over ``q``: ``(all finite, max |q_ij|, max |q_ij - q_ji|)`` without temporaries."""
    n = q.shape[0]
    finite = True
    max_abs = 0.0
    max_asym = 0.0
    block = 64
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            for i in range(i0, i1):
                for j in range(max(j0, i), j1):
                    a = q[i, j]
                    b = q[j, i]
                    if not (np.isfinite(a) and np.isfinite(b)):
                        finite = False
                        continue
                    max_abs = max(max_abs, abs(a), abs(b))
                    max_asym = max(max_asym, abs(a - b))
    return finite, max_abs, max_asym


@njit(cache=True)
def _subset_energy(q: np.ndarray, x: np.ndarray) -> float:
    """``x^T q x`` as the sum of ``q`` over the rows and columns where ``x = 1`` (O(k^2))."""
    idx = np.nonzero(x)[0]
    total = 0.0
    for a in range(idx.shape[0]):
        row = q[idx[a]]
        for b in range(idx.shape[0]):
            total += row[idx[b]]
    return total


@njit(cache=True)
def _anneal_one(
    q: np.ndarray, k: int, betas: np.ndarray, steps: int, seed: np.uint64, x: np.ndarray
) -> float:
    """One annealing run from a random ``k``-subset; writes the best state into ``x``.

    Args:
        q: ``(n, n)`` symmetric C-contiguous float64 matrix, ``0 < k < n``.
        k: Number of ones.
        betas: Inverse temperature of each level.
        steps: Proposals per level (``sweeps * n``).
        seed: Initial splitmix64 state of this run.
        x: ``(n,)`` int8 output.

    Returns:
        The exact energy of the state written into ``x``.
    """
    n = q.shape[0]
    nz = n - k
    state = seed
    # Initial state: the first k entries of a partial Fisher-Yates shuffle are the ones.
    perm = np.arange(n)
    for a in range(k):
        state, r = _below(state, n - a)
        b = a + r
        t = perm[a]
        perm[a] = perm[b]
        perm[b] = t
    ones = perm[:k].copy()
    zeros = perm[k:].copy()
    diag = np.empty(n)
    for i in range(n):
        diag[i] = q[i, i]
    x[:] = 0
    h = np.zeros(n)  # h = Q x
    for a in range(k):
        x[ones[a]] = 1
        row = q[ones[a]]
        for t in range(n):
            h[t] += row[t]
    e = 0.0
    for a in range(k):
        e += h[ones[a]]
    best_e = e
    best_x = x.copy()
    for level in range(betas.shape[0]):
        beta = betas[level]
        for _ in range(steps):
            state, a = _below(state, k)
            state, b = _below(state, nz)
            i = ones[a]
            j = zeros[b]
            de = 2.0 * (h[j] - h[i]) + diag[i] + diag[j] - 2.0 * q[i, j]
            if de > 0.0:
                state, u = _uniform(state)
                if u >= math.exp(-beta * de):
                    continue
            ones[a] = j
            zeros[b] = i
            x[i] = 0
            x[j] = 1
            qi = q[i]
            qj = q[j]
            for t in range(n):
                h[t] += qj[t] - qi[t]
            e += de
        if e < best_e:
            best_e = e
            best_x[:] = x
    x[:] = best_x
    return _subset_energy(q, x)


@njit(cache=True, parallel=True)
def _anneal_restarts(
    q: np.ndarray,
    k: int,
    betas: np.ndarray,
    steps: int,
    seeds: np.ndarray,
    xs: np.ndarray,
    energies: np.ndarray,
) -> None:
    """Runs one :func:`_anneal_one` per seed in parallel into ``xs[r]`` and ``energies[r]``."""
    for r in prange(seeds.shape[0]):
        energies[r] = _anneal_one(q, k, betas, steps, seeds[r], xs[r])


@njit(cache=True)
def _anneal_restarts_serial(
    q: np.ndarray,
    k: int,
    betas: np.ndarray,
    steps: int,
    seeds: np.ndarray,
    xs: np.ndarray,
    energies: np.ndarray,
) -> None:
    """:func:`_anneal_restarts` on the calling thread (the same results: one stream per seed)."""
    for r in range(seeds.shape[0]):
        energies[r] = _anneal_one(q, k, betas, steps, seeds[r], xs[r])


def _restart_kernel(restarts: int) -> Any:
    """The serial kernel when one thread would run the restarts anyway: it starts no thread pool,
    loads faster from the cache, and leaves the process's OpenMP (torch's) undisturbed."""
    if restarts == 1 or numba.get_num_threads() == 1:
        return _anneal_restarts_serial
    return _anneal_restarts


# --- validation -----------------------------------------------------------------------------------


def _as_int(value: Any, name: str) -> int:
    """``value`` as a Python int; bools, floats and other non-integers raise ValueError."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_float(value: Any, name: str) -> float:
    """``value`` as a finite Python float."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_q(Q: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates ``Q``; returns ``(Q as float64, its symmetric C-contiguous part for the kernels)``.

    Raises:
        ValueError: If ``Q`` is not a real square matrix, has non-finite entries, or is asymmetric
            beyond ``SYMMETRY_RTOL * max |Q|``.
    """
    try:
        q = np.asarray(Q, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("Q must be a real numeric matrix") from None
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"Q must be a square 2-D matrix, got shape {q.shape}")
    qc = np.ascontiguousarray(q)
    finite, max_abs, max_asym = _scan(qc)
    if not finite:
        raise ValueError("Q has non-finite (NaN or inf) entries")
    if max_asym > SYMMETRY_RTOL * max_abs:
        raise ValueError(
            f"Q must be symmetric: max |Q_ij - Q_ji| = {max_asym:.3g} exceeds "
            f"{SYMMETRY_RTOL:g} * max |Q_ij| = {SYMMETRY_RTOL * max_abs:.3g}"
        )
    if max_asym > 0.0:  # x^T Q x = x^T ((Q + Q^T) / 2) x, and the kernels need exact symmetry
        qc = np.ascontiguousarray((q + q.T) * 0.5)
    return q, qc


def _check_k(k: Any, n: int) -> int:
    """Validates the cardinality ``k`` against ``n``."""
    k = _as_int(k, "k")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    return k


def beta_schedule(
    beta_initial: float = 1e-3, beta_final: float = 100.0, beta_factor: float = 1.1
) -> np.ndarray:
    """Inverse temperatures of the annealing levels (see the module docstring).

    Args:
        beta_initial: First level, ``> 0``.
        beta_final: Last level, ``>= beta_initial``.
        beta_factor: Ratio between consecutive levels, ``> 1``.

    Returns:
        float64 array ``[beta_initial * beta_factor**l for l while < beta_final] + [beta_final]``.

    Raises:
        ValueError: If the parameters are not finite or out of range.
    """
    b0 = _as_float(beta_initial, "beta_initial")
    b1 = _as_float(beta_final, "beta_final")
    f = _as_float(beta_factor, "beta_factor")
    if not b0 > 0.0:
        raise ValueError(f"beta_initial must be > 0, got {beta_initial!r}")
    if not b1 >= b0:
        raise ValueError(f"beta_final must be >= beta_initial, got {beta_final!r} < {b0!r}")
    if not f > 1.0:
        raise ValueError(f"beta_factor must be > 1, got {beta_factor!r}")
    levels = []
    level = 0
    while True:
        beta = b0 * f**level
        if beta >= b1 * (1.0 - 1e-12):
            break
        levels.append(beta)
        level += 1
    levels.append(b1)
    return np.asarray(levels, dtype=np.float64)


# --- public API -----------------------------------------------------------------------------------


def energy(Q: Any, x: Any) -> float:
    """``x^T Q x`` in float64 as a Python float.

    Args:
        Q: ``(n, n)`` matrix.
        x: ``(n,)`` vector (any numeric or bool dtype).

    Raises:
        ValueError: If the shapes do not match.
    """
    q = np.asarray(Q, dtype=np.float64)
    xv = np.asarray(x, dtype=np.float64)
    if q.ndim != 2 or xv.ndim != 1 or q.shape != (xv.shape[0], xv.shape[0]):
        raise ValueError(f"shapes do not match: Q {q.shape}, x {xv.shape}")
    return float(xv @ q @ xv)


def _trivial(q: np.ndarray, k: int) -> tuple[np.ndarray, float] | None:
    """The only feasible ``x`` when ``k`` is 0 or ``n``, else None."""
    n = q.shape[0]
    if k == 0:
        return np.zeros(n, dtype=np.int8), 0.0
    if k == n:
        x = np.ones(n, dtype=np.int8)
        return x, energy(q, x)
    return None


def restart_seeds(seed: int, restarts: int) -> np.ndarray:
    """Initial splitmix64 state of each restart: ``SeedSequence(seed, spawn_key=(r,))``."""
    return np.array(
        [
            np.random.SeedSequence(seed, spawn_key=(r,)).generate_state(1, dtype=np.uint64)[0]
            for r in range(restarts)
        ],
        dtype=np.uint64,
    )


def anneal(
    Q: Any,
    k: int,
    restarts: int = 10,
    seed: int = 0,
    beta_initial: float = 1e-3,
    beta_final: float = 100.0,
    beta_factor: float = 1.1,
    sweeps: int = 1,
) -> tuple[np.ndarray, float]:
    """Minimises ``x^T Q x`` subject to ``sum(x) = k``, ``x`` binary, by simulated annealing.

    See the module docstring for the moves, schedule and seeding.

    Args:
        Q: ``(n, n)`` symmetric real matrix (array-like; converted to float64). Asymmetry up to
            ``SYMMETRY_RTOL * max |Q|`` is tolerated and symmetrised away.
        k: Number of ones, ``0 <= k <= n``.
        restarts: Independent annealing runs (in parallel); the best is returned.
        seed: Non-negative integer; the result is a function of ``seed`` alone (not of the number
            of threads).
        beta_initial: Inverse temperature of the first level (in units of ``1 / Q``).
        beta_final: Inverse temperature of the last level.
        beta_factor: Geometric ratio between levels.
        sweeps: Sweeps per level; one sweep is ``n`` swap proposals.

    Returns:
        ``(x, energy)``: ``x`` an ``(n,)`` int8 array of 0/1 with ``x.sum() == k``, and
        ``energy = x @ Q @ x`` recomputed in float64 as a Python float.

    Raises:
        ValueError: On a non-square, asymmetric or non-finite ``Q``, ``k`` outside ``[0, n]``, or
            invalid schedule, restart or seed arguments.
    """
    q, qs = _check_q(Q)
    n = q.shape[0]
    k = _check_k(k, n)
    restarts = _as_int(restarts, "restarts")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    sweeps = _as_int(sweeps, "sweeps")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    seed = _as_int(seed, "seed")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    betas = beta_schedule(beta_initial, beta_final, beta_factor)
    if n >= 2**31:
        raise ValueError(f"n = {n} is too large (at most 2**31 - 1)")
    trivial = _trivial(q, k)
    if trivial is not None:
        return trivial
    xs = np.zeros((restarts, n), dtype=np.int8)
    energies = np.empty(restarts, dtype=np.float64)
    kernel = _restart_kernel(restarts)
    kernel(qs, k, betas, sweeps * n, restart_seeds(seed, restarts), xs, energies)
    best = int(np.argmin(energies))  # first minimum: deterministic tie-break
    x = xs[best].copy()
    return x, energy(q, x)


def exhaustive(Q: Any, k: int) -> tuple[np.ndarray, float]:
    """Exact minimiser of ``x^T Q x`` subject to ``sum(x) = k`` by enumerating all k-subsets.

    Ties go to the first subset in :func:`itertools.combinations` order. Meant for tests.

    Args:
        Q: ``(n, n)`` symmetric real matrix with ``n <= 20``.
        k: Number of ones, ``0 <= k <= n``.

    Returns:
        ``(x, energy)`` as for :func:`anneal`.

    Raises:
        ValueError: On invalid ``Q`` or ``k``, or ``n > 20``.
    """
    q, qs = _check_q(Q)
    n = q.shape[0]
    if n > EXHAUSTIVE_MAX_N:
        raise ValueError(f"exhaustive search is limited to n <= {EXHAUSTIVE_MAX_N}, got n = {n}")
    k = _check_k(k, n)
    trivial = _trivial(q, k)
    if trivial is not None:
        return trivial
    combos = itertools.combinations(range(n), k)
    best_e = math.inf
    best_c: np.ndarray | None = None
    while True:
        chunk = np.array(list(itertools.islice(combos, 4096)), dtype=np.intp)
        if chunk.size == 0:
            break
        energies = qs[chunk[:, :, None], chunk[:, None, :]].sum(axis=(1, 2))
        a = int(np.argmin(energies))
        if energies[a] < best_e:
            best_e = float(energies[a])
            best_c = chunk[a]
    x = np.zeros(n, dtype=np.int8)
    x[best_c] = 1
    return x, energy(q, x)
