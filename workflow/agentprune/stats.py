"""Aggregate per-run ``metrics.json`` files into tables and paired significance tests.

The input contract is ``results/README.md`` (one ``metrics.json`` per run). Three tables come out:

* ``runs.csv``: one row per run, nested dicts flattened with ``_`` (``seconds_prune``, ...);
* ``summary.csv``: per (dataset, model, family, ratio, method) the mean, sample standard deviation
  and Student-t confidence interval of every metric in :data:`SUMMARY_METRICS`;
* ``comparisons.csv``: every pair of methods at the same (dataset, model, ratio), paired over the
  seeds both have, with a paired t-test, a Wilcoxon signed-rank test, the paired effect size
  ``d_z`` and Holm-Bonferroni adjusted p-values.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from agentprune.settings import StatsSettings

IDENTITY_KEYS = ("dataset", "model", "method", "family", "ratio", "seed")
"""Keys every ``metrics.json`` must have."""

RUN_KEYS = ("dataset", "model", "method", "family", "ratio", "seed")
"""Keys that identify one run uniquely (``family`` follows from ``method``, except that an lm
run at 2:4 is ``semi_structured`` beside the same method's 50 % ``unstructured`` run)."""

SORT_KEYS = ["dataset", "model", "ratio", "method", "seed"]
GROUP_KEYS = ["dataset", "model", "family", "ratio", "method"]
# A ratio is MACs removed (structured) or sparsity (unstructured): never pair across families.
PAIR_KEYS = ["dataset", "model", "family", "ratio"]

SUMMARY_METRICS = (
    "top1",
    "top5",
    "loss",
    "top1_pruned",
    "macs",
    "params",
    "macs_base",
    "params_base",
    "top1_base",
    "achieved",
    "sparsity",
    "latency_ms",
    "throughput",
    "seconds_plan",
    "seconds_prune",
    "seconds_finetune",
    "seconds_evaluate",
    "planning_llm_calls",
    "planning_prompt_tokens",
    "planning_completion_tokens",
    "planning_trials",
    "planning_fallbacks",
    "planning_influence_decisions",
    "planning_influence_llm",
    "planning_influence_llm_differs",
    "planning_influence_trials",
    "planning_influence_llm_trials",
    "planning_influence_selected_llm",
    "planning_influence_fallback_share",
)
"""Metrics summarised by :func:`summarize` (those present in the runs)."""

LM_SUMMARY_METRICS = (
    "perplexity",
    "perplexity_pruned",
    "perplexity_base",
    "params_nonzero",
    "peak_memory_mb_prune",
    "peak_memory_mb_evaluate",
)
"""Metrics of the lm family's runs, summarised like :data:`SUMMARY_METRICS` when present (an lm
run has no top-1 or MACs, a vision run no perplexity)."""

SUMMARY_STATS = ("mean", "std", "ci_low", "ci_high", "ci_half")

COMPARE_COLUMNS = [
    "dataset",
    "model",
    "family",
    "ratio",
    "metric",
    "method_a",
    "method_b",
    "n",
    "mean_a",
    "mean_b",
    "mean_diff",
    "t_stat",
    "t_p",
    "wilcoxon_stat",
    "wilcoxon_p",
    "cohens_d",
    "t_p_holm",
    "wilcoxon_p_holm",
    "significant",
]
"""Columns of :func:`compare` (and of ``comparisons.csv``)."""

COMPARE_METRICS = ("top1", "top1_pruned", "perplexity")
"""Metrics compared pairwise in ``comparisons.csv`` (those present in the runs)."""

# Relative tolerance below which the spread of paired differences counts as zero: floating-point
# noise in differences of nearly identical values otherwise yields huge, meaningless t statistics.
_ZERO_SPREAD_RTOL = 1e-12


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts, joining keys with ``_``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _read_run(path: Path) -> dict[str, Any]:
    """Read and validate one ``metrics.json``; errors are one-line ``ValueError``s naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in IDENTITY_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path}: missing identity key(s): {', '.join(missing)}")
    ratio, seed = record["ratio"], record["seed"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ValueError(f"{path}: 'ratio' must be a number, got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | float) or seed != int(seed):
        raise ValueError(f"{path}: 'seed' must be an integer, got {seed!r}")
    record["ratio"], record["seed"] = float(ratio), int(seed)
    return _flatten(record)


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Load ``metrics.json`` files into one table.

    Args:
        paths: The ``metrics.json`` files, one per run.

    Returns:
        One row per file, identity columns first, nested dicts flattened with ``_``
        (``seconds_prune``, ``planning_backend``, ...), sorted by dataset, model, ratio,
        method and seed.

    Raises:
        ValueError: A file is not valid JSON, is not a JSON object, lacks an identity key
            (dataset, model, method, family, ratio, seed), has a non-numeric ratio or
            non-integer seed, or two files describe the same run.
    """
    records: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for raw in paths:
        path = Path(raw)
        record = _read_run(path)
        key = tuple(record[k] for k in RUN_KEYS)
        if key in seen:
            raise ValueError(f"{path}: duplicate run {key} (also in {seen[key]})")
        seen[key] = path
        records.append(record)
    if not records:
        return pd.DataFrame(columns=list(IDENTITY_KEYS))
    runs = pd.DataFrame.from_records(records)
    runs = runs[list(IDENTITY_KEYS) + [c for c in runs.columns if c not in IDENTITY_KEYS]]
    return runs.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)


def _describe(values: np.ndarray, confidence: float) -> dict[str, float]:
    """Mean, sample std and two-sided Student-t CI of the mean for non-NaN ``values``."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    if n < 2:
        return dict.fromkeys(SUMMARY_STATS, math.nan) | {"mean": mean}
    std = float(np.std(values, ddof=1))
    half = 0.0 if std == 0 else float(sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n))
    return {
        "mean": mean,
        "std": std,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "ci_half": half,
    }


def summarize(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Summarise runs per (dataset, model, family, ratio, method).

    For each metric ``m`` of :data:`SUMMARY_METRICS` present in ``runs``: ``m_mean``, ``m_std``
    (ddof=1), ``m_ci_low``/``m_ci_high`` (two-sided Student-t interval on the mean,
    ``mean ± t_{(1+c)/2, n-1} · std / sqrt(n)``) and ``m_ci_half`` (its half-width). Std and CI
    are NaN with fewer than two values; the CI collapses to the mean when std is zero. Missing
    (NaN) values of a metric are left out of that metric's statistics.

    Args:
        runs: The output of :func:`load_runs`.
        confidence: Confidence level of the interval, in (0, 1).

    Returns:
        One row per group: the group keys, ``n`` (runs in the group) and the statistics above.

    Raises:
        ValueError: ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    metrics = [m for m in SUMMARY_METRICS + LM_SUMMARY_METRICS if m in runs.columns]
    columns = GROUP_KEYS + ["n"] + [f"{m}_{s}" for m in metrics for s in SUMMARY_STATS]
    rows: list[dict[str, Any]] = []
    if len(runs):
        for keys, group in runs.groupby(GROUP_KEYS, sort=True):
            row: dict[str, Any] = dict(zip(GROUP_KEYS, keys)) | {"n": len(group)}
            for metric in metrics:
                values = pd.to_numeric(group[metric]).dropna().to_numpy(dtype=float)
                for stat, value in _describe(values, confidence).items():
                    row[f"{metric}_{stat}"] = value
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values.

    With the ``m`` non-NaN p-values sorted ascending, ``p_(i)`` (i = 1..m) becomes
    ``max_{j<=i} min(1, (m - j + 1) · p_(j))``. NaN p-values are not part of the family and stay
    NaN.

    Args:
        pvalues: Raw p-values, in any order.

    Returns:
        Adjusted p-values in the input order.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m:
        order = valid[np.argsort(p[valid], kind="stable")]
        scaled = (m - np.arange(m)) * p[order]
        adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def _paired_tests(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test, Wilcoxon signed-rank test and ``d_z`` for ``a - b``; NaN when undefined."""
    n = len(a)
    diff = a - b
    out = dict.fromkeys(("t_stat", "t_p", "wilcoxon_stat", "wilcoxon_p", "cohens_d"), math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n >= 2:
            sd = float(np.std(diff, ddof=1))
            if sd > _ZERO_SPREAD_RTOL * float(np.max(np.abs(diff))):
                res = sps.ttest_rel(a, b)
                out["t_stat"], out["t_p"] = float(res.statistic), float(res.pvalue)
                out["cohens_d"] = float(np.mean(diff)) / sd
        if n >= 3 and np.any(diff != 0):
            try:
                res = sps.wilcoxon(a, b, alternative="two-sided")
                out["wilcoxon_stat"], out["wilcoxon_p"] = float(res.statistic), float(res.pvalue)
            except ValueError:
                pass
    return out


def compare(runs: pd.DataFrame, metric: str = "top1", alpha: float = 0.05) -> pd.DataFrame:
    """Paired comparisons of every pair of methods at each (dataset, model, family, ratio).

    Methods are paired over the seeds where both have a non-NaN ``metric``; ``method_a`` sorts
    before ``method_b`` and ``mean_diff`` is ``a - b``. Tests: ``scipy.stats.ttest_rel`` (NaN with
    fewer than two pairs or zero spread of the differences), ``scipy.stats.wilcoxon`` two-sided
    (NaN with fewer than three pairs or all differences zero) and ``cohens_d`` = paired ``d_z`` =
    ``mean(diff) / std(diff, ddof=1)`` (NaN when undefined). ``t_p_holm`` and ``wilcoxon_p_holm``
    are Holm-adjusted within each (dataset, model, family, ratio, metric) family (see :func:`holm`);
    ``significant`` is ``t_p_holm < alpha``.

    Args:
        runs: The output of :func:`load_runs`.
        metric: The run column to compare.
        alpha: Family-wise significance level.

    Returns:
        A table with the columns :data:`COMPARE_COLUMNS`.

    Raises:
        ValueError: ``metric`` is not a column of non-empty ``runs``, ``alpha`` is not in
            (0, 1), or a (dataset, model, ratio, method, seed) occurs more than once.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not len(runs):
        return pd.DataFrame(columns=COMPARE_COLUMNS)
    if metric not in runs.columns:
        raise ValueError(f"unknown metric {metric!r}; runs have no such column")
    dupes = runs.duplicated(list(RUN_KEYS), keep=False)
    if dupes.any():
        first = runs.loc[dupes, list(RUN_KEYS)].iloc[0].to_dict()
        raise ValueError(f"duplicate runs, e.g. {first}")
    rows: list[dict[str, Any]] = []
    for keys, group in runs.groupby(PAIR_KEYS, sort=True):
        table = group.pivot(index="seed", columns="method", values=metric).apply(pd.to_numeric)
        family: list[dict[str, Any]] = []
        for method_a, method_b in combinations(sorted(table.columns), 2):
            pair = table[[method_a, method_b]].dropna()
            a = pair[method_a].to_numpy(dtype=float)
            b = pair[method_b].to_numpy(dtype=float)
            row: dict[str, Any] = dict(zip(PAIR_KEYS, keys)) | {
                "metric": metric,
                "method_a": method_a,
                "method_b": method_b,
                "n": len(pair),
                "mean_a": float(np.mean(a)) if len(a) else math.nan,
                "mean_b": float(np.mean(b)) if len(b) else math.nan,
                "mean_diff": float(np.mean(a - b)) if len(a) else math.nan,
            }
            family.append(row | _paired_tests(a, b))
        t_holm = holm([r["t_p"] for r in family])
        w_holm = holm([r["wilcoxon_p"] for r in family])
        for row, t_adj, w_adj in zip(family, t_holm, w_holm):
            row.update(t_p_holm=t_adj, wilcoxon_p_holm=w_adj, significant=bool(t_adj < alpha))
        rows.extend(family)
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def write_stats(
    paths: Iterable[str | Path], outputs: Mapping[str, str | Path], settings: StatsSettings
) -> dict[str, Path]:
    """Write ``runs``, ``summary`` and ``comparisons`` to the paths ``outputs`` names (the stats
    rule's named outputs; other keys are ignored).

    ``comparisons`` holds :func:`compare` for each metric of :data:`COMPARE_METRICS` that the runs
    have (``top1``, ``top1_pruned``, ``perplexity``); it always has a header row.

    Args:
        paths: The runs' ``metrics.json`` files.
        outputs: Where each table goes (``runs``, ``summary``, ``comparisons``).
        settings: The confidence level of the summary intervals and the family-wise
            significance level of the comparisons.

    Returns:
        The written files, keyed ``runs``, ``summary`` and ``comparisons``.
    """
    written = {name: Path(outputs[name]) for name in ("runs", "summary", "comparisons")}
    for path in written.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    runs = load_runs(paths)
    summary = summarize(runs, confidence=settings.confidence)
    metrics = [m for m in COMPARE_METRICS if m in runs.columns] or list(COMPARE_METRICS[:1])
    frames = [compare(runs, metric=m, alpha=settings.alpha) for m in metrics]
    nonempty = [f for f in frames if len(f)]
    comparisons = pd.concat(nonempty, ignore_index=True) if nonempty else frames[0]
    runs.to_csv(written["runs"], index=False)
    summary.to_csv(written["summary"], index=False)
    comparisons.to_csv(written["comparisons"], index=False)
    return written
