"""Unit tests for agentprune.stats: loading, summaries, paired tests and Holm adjustment."""

from __future__ import annotations

import json
import math
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from agentprune.settings import StatsSettings
from agentprune.stats import (
    COMPARE_COLUMNS,
    SUMMARY_METRICS,
    SUMMARY_STATS,
    compare,
    holm,
    load_runs,
    summarize,
    write_stats,
)
from scipy import stats as sps

DATASET, MODEL = "digits", "resnet_tiny"
RATIOS = (0.3, 0.5)
# method -> (family, top1 offset): "agent" is clearly better, the other two are close. All are
# structured here so that every pair is compared; test_compare_never_pairs_families mixes them.
METHODS = {"agent": ("structured", 5.0), "l1": ("structured", 0.0), "wanda": ("structured", 0.3)}
SEEDS = (0, 1, 2, 3, 4)


def _metrics(method: str, ratio: float, seed: int, rng: np.random.Generator) -> dict:
    family, offset = METHODS[method]
    macs_base, params_base = 1_000_000, 50_000
    return {
        "dataset": DATASET,
        "model": MODEL,
        "method": method,
        "family": family,
        "ratio": ratio,
        "seed": seed,
        "target": ratio,
        "achieved": ratio + float(rng.normal(0, 0.01)),
        "macs_base": macs_base,
        "macs": int(macs_base * (1 - ratio)) + int(rng.integers(0, 1000)),
        "params_base": params_base,
        "params": int(params_base * (1 - ratio)) + int(rng.integers(0, 100)),
        "sparsity": ratio,
        "sparsity_overall": ratio * 0.9,
        "top1": 90.0 - 10 * ratio + offset + float(rng.normal(0, 0.5)),
        "top5": 99.0 + float(rng.normal(0, 0.1)),
        "loss": 0.3 + float(rng.normal(0, 0.02)),
        "top1_pruned": 60.0 + offset + float(rng.normal(0, 2.0)),
        "top5_pruned": 90.0 + float(rng.normal(0, 1.0)),
        "loss_pruned": 1.2 + float(rng.normal(0, 0.1)),
        "top1_base": 95.0,
        "top5_base": 99.5,
        "loss_base": 0.2,
        "latency_ms": 3.0 + float(rng.normal(0, 0.1)),
        "throughput": 5000.0 + float(rng.normal(0, 50)),
        "seconds": {
            "plan": float(rng.uniform(0, 2)),
            "prune": float(rng.uniform(1, 5)),
            "finetune": float(rng.uniform(10, 20)),
            "evaluate": float(rng.uniform(1, 2)),
        },
        "planning": {
            "backend": "mock" if method == "agent" else "none",
            "llm_calls": 3 if method == "agent" else 0,
            "prompt_tokens": 1200 if method == "agent" else 0,
            "completion_tokens": 300 if method == "agent" else 0,
            "trials": 2 if method == "agent" else 0,
            "fallbacks": 0,
            "seconds": 0.5 if method == "agent" else 0.0,
            "influence": {
                "decisions": 3,
                "llm": 3 if method == "agent" else 0,
                "llm_differs": int(rng.integers(0, 4)) if method == "agent" else 0,
                "trials": 2,
                "llm_trials": int(rng.integers(0, 3)) if method == "agent" else 0,
                "selected_llm": bool(rng.integers(0, 2)) and method == "agent",
                "fallback_share": 0.0 if method == "agent" else None,
            },
        },
    }


def _write(root: Path, record: dict) -> Path:
    path = (
        root
        / record["dataset"]
        / record["model"]
        / record["method"]
        / f"r{record['ratio']}"
        / f"s{record['seed']}"
        / "metrics.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def metric_files(tmp_path: Path) -> list[Path]:
    """30 metrics.json files: 1 dataset, 1 model, 2 ratios, 3 methods, 5 seeds."""
    rng = np.random.default_rng(20240601)
    paths = [
        _write(tmp_path / "results", _metrics(method, ratio, seed, rng))
        for ratio in RATIOS
        for method in METHODS
        for seed in SEEDS
    ]
    # Shuffle so that load_runs' sorting is actually exercised.
    order = rng.permutation(len(paths))
    return [paths[i] for i in order]


@pytest.fixture
def runs(metric_files: list[Path]) -> pd.DataFrame:
    return load_runs(metric_files)


def _toy_runs(values: dict[str, list[float]], metric: str = "top1") -> pd.DataFrame:
    """A minimal runs table: one (dataset, model, ratio), methods -> per-seed values."""
    rows = [
        {
            "dataset": "d",
            "model": "m",
            "method": method,
            "family": "structured",
            "ratio": 0.5,
            "seed": seed,
            metric: value,
        }
        for method, vals in values.items()
        for seed, value in enumerate(vals)
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- load_runs


def test_load_runs_flattens_and_sorts(runs: pd.DataFrame) -> None:
    assert len(runs) == len(RATIOS) * len(METHODS) * len(SEEDS)
    assert list(runs.columns[:6]) == ["dataset", "model", "method", "family", "ratio", "seed"]
    for col in ("seconds_plan", "seconds_prune", "seconds_finetune", "seconds_evaluate"):
        assert col in runs.columns
    assert {"planning_backend", "planning_llm_calls", "planning_seconds"} <= set(runs.columns)
    assert "seconds" not in runs.columns and "planning" not in runs.columns
    keys = list(zip(runs["dataset"], runs["model"], runs["ratio"], runs["method"], runs["seed"]))
    assert keys == sorted(keys)
    assert runs.index.tolist() == list(range(len(runs)))
    agent = runs[runs["method"] == "agent"]
    assert (agent["planning_backend"] == "mock").all()
    assert (agent["planning_llm_calls"] == 3).all()


def test_load_runs_bad_json_names_file(tmp_path: Path, metric_files: list[Path]) -> None:
    bad = tmp_path / "broken" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"dataset": "digits", ')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_runs([*metric_files[:3], bad])
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["dataset", "model", "method", "family", "ratio", "seed"])
def test_load_runs_missing_identity_key_names_file(tmp_path: Path, key: str) -> None:
    record = _metrics("agent", 0.5, 0, np.random.default_rng(0))
    good = _write(tmp_path / "good", record)
    del record[key]
    bad = tmp_path / "bad" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"missing identity key.*{key}") as info:
        load_runs([good, bad])
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_runs_rejects_duplicate_run(tmp_path: Path) -> None:
    record = _metrics("agent", 0.5, 0, np.random.default_rng(0))
    first = _write(tmp_path / "a", record)
    second = _write(tmp_path / "b", record)
    with pytest.raises(ValueError, match="duplicate run") as info:
        load_runs([first, second])
    assert str(second) in str(info.value)


def test_load_runs_empty() -> None:
    assert load_runs([]).empty


# --------------------------------------------------------------------------- summarize


def test_summarize_matches_numpy_scipy(runs: pd.DataFrame) -> None:
    confidence = 0.9
    summary = summarize(runs, confidence=confidence)
    assert len(summary) == len(RATIOS) * len(METHODS)
    assert list(summary.columns[:6]) == ["dataset", "model", "family", "ratio", "method", "n"]
    for metric in SUMMARY_METRICS:
        for stat in SUMMARY_STATS:
            assert f"{metric}_{stat}" in summary.columns
    assert (summary["n"] == len(SEEDS)).all()
    for row in summary.itertuples(index=False):
        group = runs[(runs["ratio"] == row.ratio) & (runs["method"] == row.method)]
        assert row.family == METHODS[row.method][0]
        for metric in ("top1", "seconds_prune", "latency_ms", "macs"):
            values = group[metric].to_numpy(dtype=float)
            mean, std = values.mean(), values.std(ddof=1)
            low, high = sps.t.interval(
                confidence, len(values) - 1, loc=mean, scale=std / np.sqrt(len(values))
            )
            got = summary.loc[
                (summary["ratio"] == row.ratio) & (summary["method"] == row.method)
            ].iloc[0]
            assert got[f"{metric}_mean"] == pytest.approx(mean, rel=1e-12)
            assert got[f"{metric}_std"] == pytest.approx(std, rel=1e-12)
            assert got[f"{metric}_ci_low"] == pytest.approx(low, rel=1e-10)
            assert got[f"{metric}_ci_high"] == pytest.approx(high, rel=1e-10)
            assert got[f"{metric}_ci_half"] == pytest.approx((high - low) / 2, rel=1e-10)


def test_summarize_confidence_changes_width(runs: pd.DataFrame) -> None:
    narrow = summarize(runs, confidence=0.8)["top1_ci_half"].to_numpy()
    wide = summarize(runs, confidence=0.99)["top1_ci_half"].to_numpy()
    assert (wide > narrow).all()


def test_summarize_single_run_and_zero_std() -> None:
    single = summarize(_toy_runs({"a": [70.0]}))
    assert single["n"].tolist() == [1]
    assert single["top1_mean"].iloc[0] == 70.0
    for stat in ("std", "ci_low", "ci_high", "ci_half"):
        assert math.isnan(single[f"top1_{stat}"].iloc[0])
    constant = summarize(_toy_runs({"a": [70.0, 70.0, 70.0]})).iloc[0]
    assert constant["top1_std"] == 0.0
    assert constant["top1_ci_low"] == constant["top1_ci_high"] == 70.0
    assert constant["top1_ci_half"] == 0.0


def test_summarize_skips_absent_metrics() -> None:
    summary = summarize(_toy_runs({"a": [1.0, 2.0]}))
    assert "top1_mean" in summary.columns
    assert not any(c.startswith("top5_") for c in summary.columns)


def test_summarize_rejects_bad_confidence(runs: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="confidence"):
        summarize(runs, confidence=95)


# --------------------------------------------------------------------------- holm


def test_holm_hand_example() -> None:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_holm_monotone_capped_and_nan() -> None:
    raw = np.array([0.2, np.nan, 0.001, 0.04, 0.5, 0.03, 0.9])
    adjusted = holm(raw)
    assert np.isnan(adjusted[1])
    valid = ~np.isnan(raw)
    order = np.argsort(raw[valid])
    assert np.all(np.diff(adjusted[valid][order]) >= 0)
    assert np.all(adjusted[valid] >= raw[valid])
    assert np.all(adjusted[valid] <= 1.0)
    # m = 6 valid p-values: 0.001 -> 0.006; 0.03 -> 5 * 0.03 = 0.15; 0.04 -> 4 * 0.04 = 0.16;
    # 0.2 -> 3 * 0.2 = 0.6; 0.5 -> 2 * 0.5 = 1.0; 0.9 -> max(1.0, 0.9) = 1.0.
    np.testing.assert_allclose(adjusted[valid], [0.6, 0.006, 0.16, 1.0, 0.15, 1.0])
    assert holm([]).shape == (0,)
    assert np.isnan(holm([np.nan])).all()


# --------------------------------------------------------------------------- compare


def test_compare_matches_scipy(runs: pd.DataFrame) -> None:
    result = compare(runs, "top1")
    assert list(result.columns) == COMPARE_COLUMNS
    pairs = list(combinations(sorted(METHODS), 2))
    assert len(result) == len(RATIOS) * len(pairs)
    assert (result["method_a"] < result["method_b"]).all()
    assert (result["metric"] == "top1").all()
    for row in result.itertuples(index=False):
        at_ratio = runs[runs["ratio"] == row.ratio]
        a = at_ratio[at_ratio["method"] == row.method_a].set_index("seed")["top1"]
        b = at_ratio[at_ratio["method"] == row.method_b].set_index("seed")["top1"]
        a, b = a.loc[list(SEEDS)].to_numpy(), b.loc[list(SEEDS)].to_numpy()
        diff = a - b
        assert row.n == len(SEEDS)
        assert row.mean_a == pytest.approx(a.mean())
        assert row.mean_b == pytest.approx(b.mean())
        assert row.mean_diff == pytest.approx(a.mean() - b.mean())
        t_ref = sps.ttest_rel(a, b)
        assert row.t_stat == pytest.approx(t_ref.statistic, rel=1e-12)
        assert row.t_p == pytest.approx(t_ref.pvalue, rel=1e-12)
        w_ref = sps.wilcoxon(a, b)
        assert row.wilcoxon_stat == pytest.approx(w_ref.statistic)
        assert row.wilcoxon_p == pytest.approx(w_ref.pvalue, rel=1e-12)
        d_hand = diff.mean() / math.sqrt(((diff - diff.mean()) ** 2).sum() / (len(diff) - 1))
        assert row.cohens_d == pytest.approx(d_hand, rel=1e-12)
        # agent is ~5 points better, so agent - other is positive with large effect
        if row.method_a == "agent":
            assert row.mean_diff > 0 and row.cohens_d > 1


def test_compare_holm_within_family(runs: pd.DataFrame) -> None:
    alpha = 0.05
    result = compare(runs, "top1", alpha=alpha)
    for _, family in result.groupby(["dataset", "model", "ratio", "metric"]):
        assert len(family) == 3
        np.testing.assert_allclose(family["t_p_holm"], holm(family["t_p"].to_numpy()))
        np.testing.assert_allclose(family["wilcoxon_p_holm"], holm(family["wilcoxon_p"].to_numpy()))
        # Holm is monotone in the raw order and never below the raw p-value.
        ordered = family.sort_values("t_p")
        assert ordered["t_p_holm"].is_monotonic_increasing
        assert (family["t_p_holm"] >= family["t_p"]).all()
    # Adjusting over the whole table (6 tests) would differ from per-family (3 tests).
    assert not np.allclose(result["t_p_holm"], holm(result["t_p"].to_numpy()))
    assert (result["significant"] == (result["t_p_holm"] < alpha)).all()
    assert result["significant"].dtype == bool
    agent_rows = result[result["method_a"] == "agent"]
    assert agent_rows["significant"].all()


def test_compare_alpha_controls_significance(runs: pd.DataFrame) -> None:
    result = compare(runs, "top1", alpha=1e-12)
    assert not result["significant"].any()


def test_compare_pairs_only_common_seeds(runs: pd.DataFrame) -> None:
    dropped = runs[~((runs["method"] == "wanda") & (runs["seed"] == 2))]
    result = compare(dropped, "top1")
    with_wanda = (result["method_a"] == "wanda") | (result["method_b"] == "wanda")
    assert (result.loc[with_wanda, "n"] == len(SEEDS) - 1).all()
    assert (result.loc[~with_wanda, "n"] == len(SEEDS)).all()
    row = result[(result["ratio"] == 0.3) & (result["method_a"] == "l1")].iloc[0]
    at = dropped[dropped["ratio"] == 0.3]
    a = at[at["method"] == "l1"].set_index("seed")["top1"].loc[[0, 1, 3, 4]].to_numpy()
    b = at[at["method"] == "wanda"].set_index("seed")["top1"].loc[[0, 1, 3, 4]].to_numpy()
    assert row.t_p == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)


def test_compare_wilcoxon_nan_below_three_pairs() -> None:
    result = compare(_toy_runs({"a": [70.0, 72.5], "b": [69.0, 70.0]}))
    row = result.iloc[0]
    assert row.n == 2
    assert math.isnan(row.wilcoxon_stat) and math.isnan(row.wilcoxon_p)
    assert math.isnan(row.wilcoxon_p_holm)
    assert row.t_p == pytest.approx(sps.ttest_rel([70.0, 72.5], [69.0, 70.0]).pvalue)
    assert not math.isnan(row.cohens_d)


def test_compare_degenerate_inputs_give_nan_without_warnings() -> None:
    values = {
        "a": [70.0, 71.0, 72.0, 73.0],
        "b": [69.0, 70.0, 71.0, 72.0],  # a - b is constant 1: zero variance
        "c": [70.0, 71.0, 72.0, 73.0],  # a - c is all zero
        "d": [60.0, 70.0, 65.0, 75.0],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compare(_toy_runs(values)).set_index(["method_a", "method_b"])
    const = result.loc[("a", "b")]
    assert const["mean_diff"] == pytest.approx(1.0)
    assert math.isnan(const["t_stat"]) and math.isnan(const["t_p"])
    assert math.isnan(const["cohens_d"])
    assert not const["significant"]
    assert not math.isnan(const["wilcoxon_p"])  # nonzero differences: Wilcoxon still defined
    zero = result.loc[("a", "c")]
    for col in ("t_p", "wilcoxon_stat", "wilcoxon_p", "cohens_d", "t_p_holm", "wilcoxon_p_holm"):
        assert math.isnan(zero[col]), col
    # NaN p-values (a-b, a-c, b-c) are left out of the Holm family: the three pairs with "d"
    # are adjusted among themselves (m = 3, not 6).
    valid = result["t_p"].dropna()
    assert sorted(valid.index) == [("a", "d"), ("b", "d"), ("c", "d")]
    np.testing.assert_allclose(result.loc[valid.index, "t_p_holm"], holm(valid.to_numpy()))


def test_compare_rejects_unknown_metric_and_empty_ok(runs: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        compare(runs, "accuracy")
    empty = compare(load_runs([]), "top1")
    assert empty.empty and list(empty.columns) == COMPARE_COLUMNS


# --------------------------------------------------------------------------- write_stats


def stats_paths(out: Path) -> dict[str, Path]:
    """The stats rule's layout under ``out``."""
    return {name: out / f"{name}.csv" for name in ("runs", "summary", "comparisons")}


def test_write_stats_files_and_columns(tmp_path: Path, metric_files: list[Path]) -> None:
    out = tmp_path / "results" / "stats"
    written = write_stats(metric_files, stats_paths(out), StatsSettings(confidence=0.9, alpha=0.01))
    assert set(written) == {"runs", "summary", "comparisons"}
    assert {p.name for p in written.values()} == {"runs.csv", "summary.csv", "comparisons.csv"}
    assert all(p.parent == out and p.is_file() for p in written.values())

    runs_csv = pd.read_csv(written["runs"])
    assert len(runs_csv) == 30
    assert {"seconds_prune", "planning_backend", "top1", "top1_pruned"} <= set(runs_csv.columns)

    summary_csv = pd.read_csv(written["summary"])
    assert len(summary_csv) == 6
    assert {"n", "top1_mean", "top1_ci_half", "seconds_finetune_ci_low"} <= set(summary_csv.columns)
    expected = summarize(load_runs(metric_files), confidence=0.9)
    np.testing.assert_allclose(summary_csv["top1_ci_half"], expected["top1_ci_half"])

    comparisons_csv = pd.read_csv(written["comparisons"])
    assert list(comparisons_csv.columns) == COMPARE_COLUMNS
    assert comparisons_csv["metric"].value_counts().to_dict() == {"top1": 6, "top1_pruned": 6}
    loaded = load_runs(metric_files)
    ref = compare(loaded, "top1_pruned", alpha=0.01)
    got = comparisons_csv[comparisons_csv["metric"] == "top1_pruned"].reset_index(drop=True)
    np.testing.assert_allclose(got["t_p"], ref["t_p"])
    assert got["significant"].tolist() == ref["significant"].tolist()


def test_write_stats_empty_comparisons_have_header(tmp_path: Path) -> None:
    record = _metrics("agent", 0.5, 0, np.random.default_rng(1))
    path = _write(tmp_path / "results", record)
    written = write_stats([path], stats_paths(tmp_path / "stats"), StatsSettings(0.95, 0.05))
    header = written["comparisons"].read_text().splitlines()
    assert header == [",".join(COMPARE_COLUMNS)]
    assert len(pd.read_csv(written["runs"])) == 1


def test_compare_never_pairs_families(runs: pd.DataFrame) -> None:
    """At the same ratio, a structured (MACs) and an unstructured (sparsity) run are not paired."""
    mixed = runs.copy()
    mixed.loc[mixed["method"] == "wanda", "family"] = "unstructured"
    result = compare(mixed)
    crosses = (result["method_a"] == "wanda") | (result["method_b"] == "wanda")
    assert not crosses.any()
    assert set(result["family"]) == {"structured"}
    assert len(result) == len(RATIOS)  # only agent vs l1 remains at each ratio
