"""Speed and solution quality of the iCBS annealer against two yardsticks, on an iCBS-shaped block.

Usage:
    python benchmarks/bench_icbs_solver.py [--n 1024] [--k 512] [--restarts 10] [--seed 0]
        [--samples 256] [--numpy-restarts 1] [--numpy-levels 0] [--no-cold]

The block is dense and shaped like iCBS's: ``Q = W0 H W0`` with ``W0 = diag(w0)`` for random
weights ``w0`` and ``H = G^T G / m`` an empirical Fisher from ``m`` (``--samples``) random
per-sample gradient vectors (rows of ``G``), scaled so that mean ``|Q_ij| = 1``. Every solver runs
the default schedule (beta 1e-3 to 100, factor 1.1, one sweep of n proposals per level).

Solvers:

* ``anneal`` (:mod:`agentprune.pruning.icbs.solver`): numba, cached local fields, O(1) per rejected
  proposal and O(n) per accepted swap, restarts in parallel. Timed on the first call (compile or
  cache load) and the second call.
* yardstick "O(n^2)/sweep": the same algorithm and random streams in numba, restarts in parallel,
  but every proposal recomputes ``dE`` from ``Q`` and ``x`` (an O(n) dot product, so O(n^2) per
  sweep) instead of reading cached fields, as a stand-in for the cost model of the reference
  ``sa-card`` solver. It visits the same states as ``anneal`` up to round-off in ``dE``.
* yardstick "NumPy": the same cached-field algorithm as a Python loop over proposals (numpy row
  updates on accepted swaps, random numbers from ``numpy.random.Generator``), one process thread.
  It runs ``--numpy-restarts`` restarts (and only the first ``--numpy-levels`` levels when that is
  positive) and its time is extrapolated linearly to ``--restarts`` restarts and all levels.

``--no-cold`` skips the cold-compile measurement, which runs two child processes with an empty
``NUMBA_CACHE_DIR`` (compile, then load from that cache).

Written from the algorithm; no reference code was consulted. Prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from agentprune.pruning.icbs import solver
from agentprune.pruning.icbs.solver import anneal, beta_schedule, energy, restart_seeds
from numba import njit, prange


def icbs_block(n: int, samples: int, seed: int) -> np.ndarray:
    """``W0 H W0`` with an empirical-Fisher ``H`` from random gradients, scaled to mean |Q| = 1."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=n)
    grads = rng.normal(size=(samples, n))
    fisher = grads.T @ grads / samples
    q = w0[:, None] * fisher * w0[None, :]
    q = (q + q.T) * 0.5  # exact symmetry
    return q / np.mean(np.abs(q))


# --- yardstick 1: O(n^2) per sweep (dE recomputed from Q, no cached fields) -----------------------


@njit(cache=True)
def _dot_strict(xf: np.ndarray, qi: np.ndarray, qj: np.ndarray) -> float:
    """``xf . (qj - qi)`` in order (strict IEEE: the reduction cannot be vectorised)."""
    s = 0.0
    for t in range(xf.shape[0]):
        s += xf[t] * (qj[t] - qi[t])
    return s


@njit(cache=True, fastmath=True)
def _dot_fast(xf: np.ndarray, qi: np.ndarray, qj: np.ndarray) -> float:
    """``xf . (qj - qi)`` with reassociation allowed (SIMD reduction)."""
    s = 0.0
    for t in range(xf.shape[0]):
        s += xf[t] * (qj[t] - qi[t])
    return s


@njit(cache=True)
def _dense_one(
    q: np.ndarray,
    k: int,
    betas: np.ndarray,
    steps: int,
    seed: np.uint64,
    x: np.ndarray,
    fast: bool,
) -> float:
    """:func:`solver._anneal_one` with ``dE`` from an O(n) dot product per proposal."""
    n = q.shape[0]
    nz = n - k
    state = seed
    perm = np.arange(n)
    for a in range(k):
        state, r = solver._below(state, n - a)
        b = a + r
        t = perm[a]
        perm[a] = perm[b]
        perm[b] = t
    ones = perm[:k].copy()
    zeros = perm[k:].copy()
    xf = np.zeros(n)
    for a in range(k):
        xf[ones[a]] = 1.0
    e = 0.0
    for a in range(k):
        for b in range(k):
            e += q[ones[a], ones[b]]
    best_e = e
    best_x = xf.copy()
    for level in range(betas.shape[0]):
        beta = betas[level]
        for _ in range(steps):
            state, a = solver._below(state, k)
            state, b = solver._below(state, nz)
            i = ones[a]
            j = zeros[b]
            qi = q[i]
            qj = q[j]
            s = _dot_fast(xf, qi, qj) if fast else _dot_strict(xf, qi, qj)
            de = 2.0 * s + qi[i] + qj[j] - 2.0 * qi[j]
            if de > 0.0:
                state, u = solver._uniform(state)
                if u >= math.exp(-beta * de):
                    continue
            ones[a] = j
            zeros[b] = i
            xf[i] = 0.0
            xf[j] = 1.0
            e += de
        if e < best_e:
            best_e = e
            best_x[:] = xf
    for t in range(n):
        x[t] = np.int8(best_x[t])
    return solver._subset_energy(q, x)


@njit(cache=True, parallel=True)
def _dense_restarts(
    q: np.ndarray,
    k: int,
    betas: np.ndarray,
    steps: int,
    seeds: np.ndarray,
    xs: np.ndarray,
    energies: np.ndarray,
    fast: bool,
) -> None:
    """:func:`_dense_one` per seed, in parallel."""
    for r in prange(seeds.shape[0]):
        energies[r] = _dense_one(q, k, betas, steps, seeds[r], xs[r], fast)


def dense_anneal(
    q: np.ndarray, k: int, restarts: int, seed: int, fast: bool
) -> tuple[np.ndarray, np.ndarray]:
    """All restarts of the O(n^2)-per-sweep yardstick: ``(xs, energies)``."""
    n = q.shape[0]
    xs = np.zeros((restarts, n), dtype=np.int8)
    energies = np.empty(restarts)
    seeds = restart_seeds(seed, restarts)
    _dense_restarts(q, k, beta_schedule(), n, seeds, xs, energies, fast)
    return xs, energies


def cached_anneal(q: np.ndarray, k: int, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All restarts of the solver's kernel (what :func:`anneal` picks the best of)."""
    n = q.shape[0]
    xs = np.zeros((restarts, n), dtype=np.int8)
    energies = np.empty(restarts)
    solver._anneal_restarts(q, k, beta_schedule(), n, restart_seeds(seed, restarts), xs, energies)
    return xs, energies


# --- yardstick 2: plain NumPy, cached fields, Python loop over proposals --------------------------


def numpy_anneal_one(
    q: np.ndarray, k: int, betas: np.ndarray, seed: int
) -> tuple[np.ndarray, float, int, int]:
    """One restart of the cached-field annealer in NumPy: ``(x, energy, proposals, accepted)``."""
    n = q.shape[0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    ones = perm[:k].copy()
    zeros = perm[k:].copy()
    x = np.zeros(n, dtype=np.int8)
    x[ones] = 1
    diag = np.diag(q).copy()
    h = q[:, ones].sum(axis=1)
    e = float(h[ones].sum())
    best_e, best_x = e, x.copy()
    proposals = accepted = 0
    for beta in betas:
        a_draw = rng.integers(0, k, size=n)
        b_draw = rng.integers(0, n - k, size=n)
        u_draw = rng.random(size=n)
        for a, b, u in zip(a_draw.tolist(), b_draw.tolist(), u_draw.tolist()):
            i = int(ones[a])
            j = int(zeros[b])
            de = 2.0 * (h[j] - h[i]) + diag[i] + diag[j] - 2.0 * q[i, j]
            if de > 0.0 and u >= math.exp(-beta * de):
                continue
            ones[a] = j
            zeros[b] = i
            x[i] = 0
            x[j] = 1
            h += q[j] - q[i]
            e += de
            accepted += 1
        proposals += n
        if e < best_e:
            best_e, best_x = e, x.copy()
    return best_x, energy(q, best_x), proposals, accepted


# --- driver ---------------------------------------------------------------------------------------

_COLD_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
from agentprune.pruning.icbs.solver import anneal
t1 = time.perf_counter()
rng = np.random.default_rng(0)
a = rng.normal(size=(16, 16))
anneal((a + a.T) / 2, 8, restarts=2)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def cold_compile() -> tuple[float, float, float]:
    """(import s, first call with an empty cache s, first call with that cache filled s)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", _COLD_SNIPPET], env=env, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            runs.append([float(v) for v in out.stdout.split()])
    return runs[0][0], runs[0][1], runs[1][1]


def rel(a: float, b: float) -> str:
    """Relative difference of ``a`` to the reference ``b`` in percent."""
    return f"{100.0 * (a - b) / abs(b):+.4f} %" if b != 0 else "n/a"


def main() -> None:
    """Runs the benchmark and prints the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="block size (default 1024)")
    p.add_argument("--k", type=int, default=None, help="ones to keep (default n // 2)")
    p.add_argument("--restarts", type=int, default=10, help="restarts (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the block and solvers (default 0)")
    p.add_argument("--samples", type=int, default=256, help="gradients in the Fisher (default 256)")
    p.add_argument("--numpy-restarts", type=int, default=1, help="NumPy yardstick restarts run")
    p.add_argument("--numpy-levels", type=int, default=0, help="NumPy levels run (0: all)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-compile subprocesses")
    p.add_argument(
        "--quality-seeds", type=int, default=3, help="extra anneal seeds for the energy spread"
    )
    args = p.parse_args()
    n, restarts, seed = args.n, args.restarts, args.seed
    k = n // 2 if args.k is None else args.k
    betas = beta_schedule()
    import numba

    print(
        f"n={n} k={k} restarts={restarts} seed={seed} Fisher samples={args.samples} "
        f"levels={len(betas)} proposals/restart={len(betas) * n} "
        f"numba {numba.__version__}, {numba.get_num_threads()} threads"
    )
    if not args.no_cold:
        t_imp, t_cold, t_load = cold_compile()
        print(
            f"cold start (child processes, empty NUMBA_CACHE_DIR): import {t_imp:.2f} s, first "
            f"call (compile) {t_cold:.2f} s; next process's first call (cache load) {t_load:.2f} s"
        )

    q = icbs_block(n, args.samples, seed)
    t = time.perf_counter()
    x1, e1 = anneal(q, k, restarts=restarts, seed=seed)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    x, e = anneal(q, k, restarts=restarts, seed=seed)
    t_anneal = time.perf_counter() - t
    repeatable = np.array_equal(x, x1) and e == e1
    print(
        f"anneal: first call {t_first:.3f} s (compile or cache load + run), "
        f"second call {t_anneal:.3f} s, energy {e:.6f}, sum(x)={int(x.sum())}, "
        f"repeatable={repeatable}"
    )
    xs_c, en_c = cached_anneal(q, k, restarts, seed)
    if args.quality_seeds > 0:
        extra = range(seed + 1, seed + 1 + args.quality_seeds)
        other = [anneal(q, k, restarts=restarts, seed=s)[1] for s in extra]
        spread = 100 * (max(other + [e]) - min(other + [e])) / abs(e)
        print(
            f"  anneal best-of-{restarts} energy for seeds {extra[0]}..{extra[-1]}: "
            f"{', '.join(f'{v:.6f}' for v in other)} (spread over seeds incl. {seed}: "
            f"{spread:.2f} % of seed {seed}'s energy)"
        )

    # yardstick 1: warm up (compile / cache load) on a tiny block, then time.
    small = icbs_block(8, 4, 0)
    dense = {}
    for fast in (False, True):
        dense_anneal(small, 4, 2, 0, fast)
        t = time.perf_counter()
        xs_d, en_d = dense_anneal(q, k, restarts, seed, fast)
        t_dense = time.perf_counter() - t
        e_dense = energy(q, xs_d[int(np.argmin(en_d))])
        dense[fast] = (t_dense, e_dense)
        same = sum(np.array_equal(a, b) for a, b in zip(xs_c, xs_d))
        print(
            f"O(n^2)/sweep numba, {'fastmath SIMD dot' if fast else 'strict scalar dot'}: "
            f"{t_dense:.3f} s, energy {e_dense:.6f} "
            f"(same random streams; same final x as anneal in {same}/{restarts} restarts)"
        )

    # yardstick 2: NumPy, fewer restarts / levels, extrapolated.
    levels = betas if args.numpy_levels <= 0 else betas[: args.numpy_levels]
    seeds = restart_seeds(seed, args.numpy_restarts)
    t = time.perf_counter()
    np_runs = [numpy_anneal_one(q, k, levels, int(s)) for s in seeds]
    t_np_run = time.perf_counter() - t
    t_np = t_np_run * (restarts / len(seeds)) * (len(betas) / len(levels))
    props = sum(r[2] for r in np_runs)
    accs = sum(r[3] for r in np_runs)
    print(
        f"NumPy loop: ran {len(seeds)} restart(s) x {len(levels)}/{len(betas)} levels in "
        f"{t_np_run:.2f} s, extrapolated linearly to {restarts} restarts x {len(betas)} levels: "
        f"{t_np:.1f} s; acceptance {accs}/{props} = {accs / props:.3f}"
    )
    if len(levels) == len(betas):
        np_e = [r[1] for r in np_runs]
        print(
            f"  NumPy per-restart energies {', '.join(f'{v:.6f}' for v in np_e)}; "
            f"anneal per-restart median {np.median(en_c):.6f}, min {en_c.min():.6f}, "
            f"max {en_c.max():.6f}"
        )

    print("summary:")
    for fast, (t_dense, e_dense) in dense.items():
        print(
            f"  speedup vs O(n^2)/sweep ({'fastmath' if fast else 'strict'}): "
            f"{t_dense / t_anneal:.1f}x (target >= 20x); energy {rel(e, e_dense)} relative to it "
            "(target within 0.1 %)"
        )
    print(f"  speedup vs NumPy loop (extrapolated): {t_np / t_anneal:.0f}x")
    if len(levels) == len(betas):
        print(
            f"  best NumPy restart energy {rel(min(np_e), float(np.median(en_c)))} relative to "
            "anneal's median restart"
        )


if __name__ == "__main__":
    main()
