"""Tests for agentprune.paper: results tables (md/tex/html), comparisons table and figures."""

from __future__ import annotations

import math
import shutil
from itertools import combinations
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pytest
from agentprune import paper
from agentprune.settings import PaperSettings
from agentprune.stats import SUMMARY_METRICS
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflow"
TEMPLATES = WORKFLOW / "templates"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = {  # label: (macs_base, params_base, top1_base)
    "resnet-18": (1.82e9, 11.7e6, 71.0),
    "tiny_cnn": (2.4e6, 5.2e4, 96.0),
}
RATIOS = (0.3, 0.5)
METHODS = {"isomorphic": "structured", "l1_norm": "structured", "magnitude": "unstructured"}
GROUP = ["dataset", "model", "family", "ratio", "method"]
# The results table holds the structured methods; the unstructured ones have their own table.
STRUCTURED = [m for m, family in METHODS.items() if family == "structured"]


# --------------------------------------------------------------------------- fixtures


def make_runs(seeds: int = 3, rng_seed: int = 0) -> pd.DataFrame:
    """Synthetic runs.csv: 2 models x 2 ratios x 3 methods x ``seeds`` seeds."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for model, (macs_base, params_base, base) in MODELS.items():
        for ratio in RATIOS:
            for method, family in METHODS.items():
                keep = 1 - ratio if family == "structured" else 1.0
                for seed in range(seeds):
                    rows.append(
                        {
                            "dataset": "digits",
                            "model": model,
                            "method": method,
                            "family": family,
                            "ratio": ratio,
                            "seed": seed,
                            "target": ratio,
                            "achieved": ratio + 0.005 * rng.standard_normal(),
                            "macs_base": macs_base,
                            "macs": macs_base * keep * (1 + 0.01 * rng.standard_normal()),
                            "params_base": params_base,
                            "params": params_base * (1 - ratio / 2),
                            "sparsity": ratio if family == "unstructured" else 0.0,
                            "top1": base - 8 * ratio + rng.standard_normal(),
                            "top5": 99.0 + 0.1 * rng.standard_normal(),
                            "loss": 0.3 + 0.01 * rng.standard_normal(),
                            "top1_pruned": base - 30 * ratio + 2 * rng.standard_normal(),
                            "top1_base": base,
                            "top5_base": 99.5,
                            "loss_base": 0.2,
                            "latency_ms": rng.uniform(1, 2),
                            "throughput": rng.uniform(900, 1100),
                            "seconds_plan": rng.uniform(0.1, 1),
                            "seconds_prune": rng.uniform(1, 3),
                            "seconds_finetune": rng.uniform(10, 20),
                            "seconds_evaluate": rng.uniform(1, 2),
                        }
                    )
    return pd.DataFrame(rows)


def _ci_half(values: pd.Series) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    return float(sps.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def make_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv by a plain groupby (mean, std, Student-t CI; NaN spread when n < 2)."""
    rows = []
    for keys, group in runs.groupby(GROUP, sort=True):
        row = dict(zip(GROUP, keys)) | {"n": len(group)}
        for metric in (m for m in SUMMARY_METRICS if m in runs.columns):
            values = group[metric]
            mean, half = float(values.mean()), _ci_half(values)
            std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row |= {
                f"{metric}_mean": mean,
                f"{metric}_std": std,
                f"{metric}_ci_low": mean - half,
                f"{metric}_ci_high": mean + half,
                f"{metric}_ci_half": half,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def make_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """comparisons.csv: paired t-test per method pair (only the columns the paper reads)."""
    rows = []
    for (dataset, model, ratio), group in runs.groupby(["dataset", "model", "ratio"]):
        table = group.pivot(index="seed", columns="method", values="top1")
        for a, b in combinations(sorted(table.columns), 2):
            diff = table[a] - table[b]
            res = sps.ttest_rel(table[a], table[b])
            rows.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "ratio": ratio,
                    "metric": "top1",
                    "method_a": a,
                    "method_b": b,
                    "n": len(diff),
                    "mean_a": table[a].mean(),
                    "mean_b": table[b].mean(),
                    "mean_diff": diff.mean(),
                    "t_stat": res.statistic,
                    "t_p": res.pvalue,
                    "wilcoxon_stat": math.nan,
                    "wilcoxon_p": math.nan,
                    "cohens_d": diff.mean() / diff.std(ddof=1),
                    "t_p_holm": min(1.0, 3 * res.pvalue),
                    "wilcoxon_p_holm": math.nan,
                    "significant": False,
                }
            )
    return pd.DataFrame(rows)


def write_inputs(tmp_path: Path, runs: pd.DataFrame, summary=None, comparisons=None):
    """Write the three CSVs; returns their paths."""
    stats = tmp_path / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    paths = (stats / "runs.csv", stats / "summary.csv", stats / "comparisons.csv")
    runs.to_csv(paths[0], index=False)
    (make_summary(runs) if summary is None else summary).to_csv(paths[1], index=False)
    (make_comparisons(runs) if comparisons is None else comparisons).to_csv(paths[2], index=False)
    return paths


def render(inputs, out_dir, reference_method="isomorphic", references=None, ablations=None):
    """render_paper into ``out_dir`` with the workflow's layout (tables/, figures/)."""
    settings = PaperSettings(reference_method, list(references or []), dict(ablations or {}))
    runs, summary, comparisons = inputs[:3]
    return paper.render_paper(
        runs,
        summary,
        comparisons,
        paper.paper_paths(out_dir),
        TEMPLATES,
        settings,
        *inputs[3:],
    )


def table_body(markdown: str) -> list[list[str]]:
    """Cells of the data rows of the (first) pipe table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """render_paper on the default fixture (3 seeds)."""
    tmp_path = tmp_path_factory.mktemp("paper")
    runs = make_runs()
    inputs = write_inputs(tmp_path, runs)
    outputs = render(inputs, tmp_path / "paper")
    return {"runs": runs, "summary": pd.read_csv(inputs[1]), "outputs": outputs}


# --------------------------------------------------------------------------- outputs


def test_render_paper_writes_every_output(rendered):
    outputs = rendered["outputs"]
    out = next(iter(outputs.values())).parents[1]
    expected = {
        "results_md": out / "tables" / "results.md",
        "results_tex": out / "tables" / "results.tex",
        "results_html": out / "tables" / "results.html",
        "unstructured_md": out / "tables" / "unstructured.md",
        "unstructured_tex": out / "tables" / "unstructured.tex",
        "unstructured_html": out / "tables" / "unstructured.html",
        "comparisons_md": out / "tables" / "comparisons.md",
        "comparisons_html": out / "tables" / "comparisons.html",
        "accuracy_vs_macs": out / "figures" / "accuracy_vs_macs.png",
        "accuracy_vs_sparsity": out / "figures" / "accuracy_vs_sparsity.png",
        "method_comparison": out / "figures" / "method_comparison.png",
        "time_per_step": out / "figures" / "time_per_step.png",
        "time_memory_per_step": out / "figures" / "time_memory_per_step.png",
        "lm_md": out / "tables" / "lm.md",
        "lm_tex": out / "tables" / "lm.tex",
        "lm_html": out / "tables" / "lm.html",
        "perplexity_vs_sparsity": out / "figures" / "perplexity_vs_sparsity.png",
    }
    assert outputs == expected
    for path in expected.values():
        assert path.is_file() and path.stat().st_size > 0
    for name in ("accuracy_vs_macs", "accuracy_vs_sparsity", "method_comparison", "time_per_step"):
        data = expected[name].read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000


def test_markdown_has_one_row_per_model_ratio_method_plus_base(rendered):
    markdown = rendered["outputs"]["results_md"].read_text()
    body = table_body(markdown)
    structured = [m for m, family in METHODS.items() if family == "structured"]
    assert len(body) == len(MODELS) * len(RATIOS) * len(structured) + len(MODELS)
    assert {row[1] for row in body} == {"**Base**", *structured}
    bases = [row for row in body if row[1] == "**Base**"]
    assert [row[0] for row in bases] == list(MODELS)
    header = [line for line in markdown.splitlines() if line.startswith("|")][0]
    assert "MACs (M)" in header  # the tiny model's 2.4 M MACs force mega-MACs for the table
    assert markdown.splitlines()[0].startswith("**")  # caption line


def test_unstructured_table_holds_the_unstructured_methods(rendered):
    body = table_body(rendered["outputs"]["unstructured_md"].read_text())
    sparse = [m for m, family in METHODS.items() if family == "unstructured"]
    assert {row[1] for row in body} == {"**Base**", *sparse}
    assert len(body) == len(MODELS) * len(RATIOS) * len(sparse) + len(MODELS)


def test_markdown_top1_is_mean_plus_minus_ci_half_from_summary(rendered):
    summary = rendered["summary"]
    body = table_body(rendered["outputs"]["results_md"].read_text())
    cells = {(row[0], row[1], row[2]): row for row in body}
    for record in summary[summary["method"].isin(STRUCTURED)].to_dict("records"):
        row = cells[(record["model"], record["method"], f"{record['ratio']:g}")]
        expected = f"{record['top1_mean']:.2f} ± {record['top1_ci_half']:.2f}"
        assert row[5] == expected
        assert row[8] == str(record["n"])
        assert row[3] == f"{record['macs_mean'] / 1e6:.3f}"


def test_rows_ordered_by_model_then_ascending_ratio(rendered):
    rows = paper.table_rows(rendered["summary"])
    for model in MODELS:
        mine = [row for row in rows if row["model"] == model]
        assert mine[0]["kind"] == "base" and mine[0]["method"] == "base"
        ratios = [float(row["ratio"]) for row in mine[1:]]
        assert ratios == sorted(ratios)


def test_delta_vs_reference_hand_checked():
    summary = pd.DataFrame(
        {
            "dataset": ["cifar10"] * 3,
            "model": ["resnet56"] * 3,
            "family": ["structured"] * 3,
            "ratio": [0.5] * 3,
            "method": ["isomorphic", "l1_norm", "random"],
            "n": [3, 3, 3],
            "top1_mean": [70.0, 68.75, 71.5],
            "top1_ci_half": [0.5, 0.25, math.nan],
            "top1_base_mean": [72.5] * 3,
            "macs_base_mean": [1.26e8] * 3,
            "params_base_mean": [8.5e5] * 3,
            "macs_mean": [6.3e7, 6.2e7, 6.4e7],
            "params_mean": [4.2e5, 4.1e5, 4.3e5],
        }
    )
    rows = {row["method"]: row for row in paper.table_rows(summary, "isomorphic")}
    assert rows["base"]["top1"] == "72.50" and rows["base"]["macs"] == "0.126"  # G: ≥ 0.01 G
    assert rows["l1_norm"]["delta_ref"] == "-1.25"
    assert rows["l1_norm"]["delta_ref_value"] == pytest.approx(-1.25)
    assert rows["l1_norm"]["delta_base"] == "-3.75"
    assert rows["random"]["delta_ref"] == "+1.50"
    assert rows["random"]["top1"] == "71.50"  # no CI half-width: mean only
    assert rows["isomorphic"]["delta_ref"] == ""  # blank for the reference itself
    assert rows["l1_norm"]["top1_pruned"] == ""  # column missing from the summary
    no_ref = {row["method"]: row for row in paper.table_rows(summary, "absent")}
    assert no_ref["l1_norm"]["delta_ref"] == ""


def _agent_summary(fallback_share: float) -> pd.DataFrame:
    """A structured block with multi_agent, its ablation and isomorphic (3 seeds each)."""
    base = {
        "dataset": "digits", "model": "vit", "family": "structured", "ratio": 0.5, "n": 3,
        "top1_ci_half": 1.0, "top1_base_mean": 95.0, "macs_base_mean": 2e6,
        "params_base_mean": 2e5, "macs_mean": 1e6, "params_mean": 1e5,
    }  # fmt: skip
    agents = {
        "planning_influence_decisions_mean": 3.0,
        "planning_influence_trials_mean": 2.0,
        "planning_influence_fallback_share_mean": fallback_share,
    }
    return pd.DataFrame(
        [
            {**base, "method": "isomorphic", "top1_mean": 90.0},
            {
                **base, **agents, "method": "multi_agent", "top1_mean": 88.0,
                "planning_influence_llm_differs_mean": 2.0,
                "planning_influence_llm_trials_mean": 1.0,
                "planning_influence_selected_llm_mean": 2 / 3,
            },
            {
                **base, **agents, "method": "agents_heuristic", "top1_mean": 89.5,
                "planning_influence_llm_differs_mean": 0.0,
                "planning_influence_llm_trials_mean": 0.0,
                "planning_influence_selected_llm_mean": 0.0,
                "planning_influence_fallback_share_mean": math.nan,
            },
        ]
    )  # fmt: skip


AGENT_PAIR = pd.DataFrame(
    [
        {"dataset": "digits", "model": "vit", "family": "structured", "ratio": 0.5,
         "metric": metric, "method_a": "agents_heuristic", "method_b": "multi_agent",
         "mean_diff": diff, "t_p_holm": p}
        for metric, diff, p in (("top1", 1.5, 0.0421), ("top1_pruned", 9.0, 0.5))
    ]
)  # fmt: skip


def test_ablation_delta_and_llm_influence_columns(tmp_path):
    summary = _agent_summary(0.0)
    ablations = {"multi_agent": "agents_heuristic"}
    rows = {
        r["method"]: r for r in paper.table_rows(summary, "isomorphic", [], ablations, AGENT_PAIR)
    }
    # multi_agent - agents_heuristic = -(a - b), paired over seeds, with the Holm p-value.
    assert rows["multi_agent"]["delta_ablation"] == "-1.50 (p 0.042)"
    assert rows["agents_heuristic"]["delta_ablation"] == rows["isomorphic"]["delta_ablation"] == ""
    assert rows["multi_agent"]["influence"] == ("own 2/3 decisions, LLM trials 1/2, selected 2/3")
    assert rows["agents_heuristic"]["influence"].startswith("own 0/3 decisions")
    assert rows["isomorphic"]["influence"] == "–" and not rows["multi_agent"]["fallback"]
    md, tex, html = paper.render_tables(
        summary,
        paper.table_paths(tmp_path, "results"),
        paper.TEMPLATES,
        ablations=ablations,
        comparisons=AGENT_PAIR,
    )
    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Model"))
    assert header.endswith("| Δ ablation | LLM influence |")
    row = next(line for line in lines if "| multi_agent |" in line)
    assert row.count("|") == header.count("|") and "-1.50 (p 0.042)" in row
    assert "Δ ablation" in html.read_text() and r"$\Delta$ ablation" in tex.read_text()
    # Without the ablation in the study there is no column; a fallback share marks the row.
    plain = paper.table_rows(_agent_summary(0.25), "isomorphic", [], {}, AGENT_PAIR)
    marked = {r["method"]: r for r in plain}
    assert marked["multi_agent"]["delta_ablation"] == "" and marked["multi_agent"]["fallback"]
    assert marked["multi_agent"]["influence"].endswith("failed 25%")
    md2, _, _ = paper.render_tables(
        _agent_summary(0.25), paper.table_paths(tmp_path / "b", "results"), paper.TEMPLATES
    )
    text = md2.read_text()
    assert "Δ ablation |" not in text and "| multi_agent ‡ |" in text


def test_latex_escapes_underscores_percent_and_pm(rendered):
    tex = rendered["outputs"]["results_tex"].read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\caption{" in tex
    assert r"tiny\_cnn" in tex and r"l1\_norm" in tex
    body = [line for line in tex.splitlines() if not line.lstrip().startswith("%")]
    assert all("_" not in line.replace(r"\_", "") for line in body)
    assert "±" not in tex and r"$\pm$" in tex
    assert r"Top-1 (\%)" in tex and "(%)" not in tex
    assert tex.count(r"\\") == len(MODELS) * (len(RATIOS) * len(STRUCTURED) + 1) + 1


def test_html_is_a_table_fragment(rendered):
    html = rendered["outputs"]["results_html"].read_text()
    assert html.lstrip().startswith("<table") and html.rstrip().endswith("</table>")
    for tag in ("<caption", "<thead>", "<tbody>", "style="):
        assert tag in html
    assert html.count("<tr") == 1 + len(MODELS) * (len(RATIOS) * len(STRUCTURED) + 1)


def test_comparisons_markdown(rendered, tmp_path):
    markdown = rendered["outputs"]["comparisons_md"].read_text()
    body = table_body(markdown)
    assert len(body) == len(MODELS) * len(RATIOS) * 3  # 3 method pairs
    comparisons = make_comparisons(rendered["runs"])
    first = comparisons.iloc[0]
    assert body[0][:5] == [
        first["model"],
        f"{first['ratio']:g}",
        "top1",
        first["method_a"],
        first["method_b"],
    ]
    assert body[0][6] == f"{first['mean_diff']:.3f}"
    assert body[0][9] == f"{first['cohens_d']:.3f}"


def test_references_rendered_as_flagged_rows(tmp_path):
    runs = make_runs()
    references = [
        {
            "model": "resnet-18",
            "label": "DepGraph <paper>",
            "macs_g": 1.09,
            "params_m": 7.1,
            "top1": 69.1,
            "source": "Fang et al., CVPR 2023 & more_info",
        }
    ]
    rows = paper.table_rows(make_summary(runs), references=references)
    flagged = [row for row in rows if row["reference"]]
    assert len(flagged) == 1 and flagged[0]["kind"] == "reference"
    assert flagged[0]["macs"] == "1090.000"  # G -> the table's M unit
    assert flagged[0]["top1"] == "69.10"
    inputs = write_inputs(tmp_path, runs)
    out = render(inputs, tmp_path / "paper", references=references)
    html = out["results_html"].read_text()
    assert "DepGraph &lt;paper&gt;" in html and "&amp; more_info" in html
    tex = out["results_tex"].read_text()
    assert r"\& more\_info" in tex
    assert "DepGraph <paper>" in out["results_md"].read_text()


# --------------------------------------------------------------------------- edge cases


def test_single_seed_renders_without_ci(tmp_path):
    runs = make_runs(seeds=1)
    empty = pd.DataFrame(columns=list(make_comparisons(make_runs()).columns))
    inputs = write_inputs(tmp_path, runs, comparisons=empty)
    out = render(inputs, tmp_path / "paper")
    markdown = out["results_md"].read_text()
    body = table_body(markdown)
    assert len(body) == len(MODELS) * (len(RATIOS) * len(STRUCTURED) + 1)
    assert all("±" not in row[5] for row in body)
    assert "No comparisons" in out["comparisons_md"].read_text()
    assert "No comparisons" in out["comparisons_html"].read_text()
    for name in ("accuracy_vs_macs", "method_comparison", "time_per_step"):
        assert out[name].read_bytes().startswith(PNG_MAGIC)


def test_missing_optional_columns(tmp_path):
    runs = make_runs().drop(columns=["seconds_plan"])
    summary = make_summary(runs)
    summary = summary.drop(columns=[c for c in summary.columns if c.startswith("top1_pruned")])
    inputs = write_inputs(tmp_path, runs, summary=summary)
    out = render(inputs, tmp_path / "paper")
    assert out["time_per_step"].stat().st_size > 5_000
    assert all(row[9] == "" for row in table_body(out["results_md"].read_text()))


def test_no_timing_columns_gives_placeholder(tmp_path):
    runs = make_runs().drop(columns=[f"seconds_{s}" for s in paper.STEPS])
    path = paper.plot_time_per_step(runs, tmp_path / "time.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_strict_undefined_catches_template_mistakes(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "table.md.j2").write_text("{% for row in rows %}{{ row.top_1 }}{% endfor %}\n")
    with pytest.raises(jinja2.UndefinedError):
        paper.render_tables(
            make_summary(make_runs()), paper.table_paths(tmp_path, "r"), templates, "isomorphic"
        )
    (templates / "table.md.j2").write_text("{{ undefined_variable }}\n")
    with pytest.raises(jinja2.UndefinedError):
        paper.render_tables(
            make_summary(make_runs()), paper.table_paths(tmp_path, "r"), templates, "isomorphic"
        )


@pytest.mark.parametrize(
    ("base_macs", "unit"),
    [([1.8e9, 2.4e6], "M"), ([1.8e9, 4.1e9], "G"), ([1e7], "G"), ([9.9e6], "M"), ([], "G")],
)
def test_macs_unit(base_macs, unit):
    assert paper.macs_unit(base_macs)[0] == unit


def test_formatters():
    assert paper.fmt_mean_ci(71.234, 0.456) == "71.23 ± 0.46"
    assert paper.fmt_mean_ci(71.234, math.nan) == "71.23"
    assert paper.fmt_mean_ci(math.nan, 0.4) == ""
    assert paper.fmt_number(0.00123) == "0.00123"
    assert paper.fmt_number(4.0891) == "4.089"
    assert paper.fmt_pvalue(0.0004) == "<0.001" and paper.fmt_pvalue(math.nan) == "–"
    assert paper.tex_escape("a_b & 5% ± 1") == r"a\_b \& 5\% $\pm$ 1"


def test_figure_interval_matches_summary_ci():
    values = pd.Series([70.1, 71.3, 69.8])
    low, high = paper.t_interval(values.to_numpy())
    assert (high - low) / 2 == pytest.approx(_ci_half(values))
    assert all(math.isnan(v) for v in paper.t_interval([70.0]))
