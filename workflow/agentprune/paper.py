"""Paper-style tables and figures from the study's statistics.

Inputs are the three tables of :mod:`agentprune.stats` (``runs.csv``, ``summary.csv``,
``comparisons.csv``). The results table follows the layout of Isomorphic Pruning (Fang et al.,
ECCV 2024), Tables 1-2: per model a *Base* row, then for every pruning ratio one row per method
with MACs, parameters, top-1 accuracy (mean ± half-width of the 95 % Student-t interval over
seeds), the change relative to the base model and to a reference method, the number of seeds and
the accuracy before fine-tuning. Optional published reference rows can be appended per model.

Tables are rendered from Jinja2 templates (Markdown, LaTeX/booktabs, HTML fragment); figures are
seaborn PNGs. Everything tolerates a single seed (no intervals) and missing optional columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from scipy import stats as sps

from agentprune.benchmarks import STEPS  # the per-run steps, in pipeline order
from agentprune.settings import PaperSettings

matplotlib.use("Agg")

DPI = 150
CONFIDENCE = 0.95
"""Confidence level of the figures' error bars/bands (Student-t over seeds, as in the tables)."""
BASE_METHOD = "base"
# The jinja2 templates shipped next to the package (workflow/templates).
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
"""Pipeline steps with a ``seconds_{step}`` column in ``runs.csv``."""

TABLE_FORMATS = ("md", "tex", "html")
"""Formats of the results table; each has a template ``table.{fmt}.j2``."""

ROW_KEYS = (
    "kind",
    "reference",
    "dataset",
    "model",
    "method",
    "label",
    "family",
    "ratio",
    "macs",
    "params",
    "top1",
    "planning",
    "influence",
    "fallback",
    "delta_base",
    "delta_ref",
    "delta_ablation",
    "n",
    "top1_pruned",
    "source",
    "top1_mean",
    "delta_base_value",
    "delta_ref_value",
    "new_model",
    "new_ratio",
)
"""Keys of every row returned by :func:`table_rows` (formatted strings plus raw values/flags)."""

_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "†": r"$^\dagger$",
    "−": r"$-$",
}
_TEX_TABLE = str.maketrans(_TEX_ESCAPES)


# --------------------------------------------------------------------------- formatting


def tex_escape(value: Any) -> str:
    """Escape a value for LaTeX text mode.

    Args:
        value: Anything; converted with ``str``.

    Returns:
        The text with LaTeX specials escaped and ``±``/``Δ``/``†`` as math symbols.
    """
    return str(value).translate(_TEX_TABLE)


def md_escape(value: Any) -> str:
    """Escape a value for a GitHub pipe-table cell (``|`` and line breaks)."""
    return str(value).replace("|", r"\|").replace("\n", " ")


def _missing(value: Any) -> bool:
    """Whether a scalar is None/NaN/NA."""
    return value is None or bool(pd.isna(value))


def fmt_number(value: Any, decimals: int = 3) -> str:
    """Format a number with ``decimals`` decimals, or 3 significant digits when it is tiny.

    Args:
        value: The number (NaN/None gives an empty string).
        decimals: Decimals for ordinary values.

    Returns:
        E.g. ``"4.089"``, ``"0.00123"`` or ``""``.
    """
    if _missing(value):
        return ""
    number = float(value)
    if number != 0 and abs(number) < 10.0 ** (1 - decimals):
        return f"{number:.3g}"
    return f"{number:.{decimals}f}"


def fmt_mean_ci(mean: Any, half: Any, decimals: int = 2) -> str:
    """Format ``mean ± half``, or just the mean when the half-width is undefined."""
    if _missing(mean):
        return ""
    if _missing(half):
        return f"{float(mean):.{decimals}f}"
    return f"{float(mean):.{decimals}f} ± {float(half):.{decimals}f}"


def fmt_delta(value: Any, decimals: int = 2) -> str:
    """Format a signed difference (``+0.12``/``-0.34``), empty when undefined."""
    return "" if _missing(value) else f"{float(value):+.{decimals}f}"


def fmt_pvalue(value: Any) -> str:
    """Format a p-value to 3 decimals (``<0.001`` below that, ``–`` when undefined)."""
    if _missing(value):
        return "–"
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def fmt_planning(record: Mapping[str, Any]) -> str:
    """Mean planning cost per run: trial prunes, LLM calls and seconds; a dash for fixed recipes
    (no trials, no calls), so the table shows what multi-agent planning spends that the
    baselines do not."""
    trials = record.get("planning_trials_mean")
    calls = record.get("planning_llm_calls_mean")
    seconds = record.get("seconds_plan_mean")
    if (_missing(trials) or not trials) and (_missing(calls) or not calls):
        return "–"
    parts = [f"{float(trials):.3g} trials" if not _missing(trials) else ""]
    parts.append(f"{float(calls):.3g} calls" if not _missing(calls) else "")
    parts.append(f"{float(seconds):.3g} s" if not _missing(seconds) else "")
    return ", ".join(p for p in parts if p)


def fmt_influence(record: Mapping[str, Any]) -> str:
    """What the LLM contributed, as means over seeds: LLM decisions of its own (differing from
    the default policy's in the same state) out of all decisions, trials that ran an
    LLM-originated strategy out of all trials, and in how many seeds the selected trial was one
    of them. A dash for methods without agent decisions."""
    decisions = record.get("planning_influence_decisions_mean")
    if _missing(decisions):
        return "–"
    own = float(record.get("planning_influence_llm_differs_mean", 0.0))
    trials = float(record.get("planning_influence_trials_mean", 0.0))
    llm_trials = float(record.get("planning_influence_llm_trials_mean", 0.0))
    n = record.get("n")
    seeds = 1 if _missing(n) else int(n)
    selected = float(record.get("planning_influence_selected_llm_mean", 0.0)) * seeds
    text = (
        f"own {own:.3g}/{float(decisions):.3g} decisions, LLM trials {llm_trials:.3g}/"
        f"{trials:.3g}, selected {selected:.0f}/{seeds}"
    )
    share = record.get("planning_influence_fallback_share_mean")
    if not _missing(share) and float(share) > 0:
        text += f", failed {float(share):.0%}"
    return text


def fmt_ratio(value: Any) -> str:
    """Format a pruning ratio compactly (``0.5``), empty when undefined."""
    return "" if _missing(value) else f"{float(value):g}"


def macs_unit(base_macs: Iterable[Any]) -> tuple[str, float]:
    """Pick one MACs unit for a table or figure from the base models' MACs.

    Giga-MACs when the smallest base model has at least 0.01 G, otherwise mega-MACs.

    Args:
        base_macs: MACs counts of the base models (NaN and non-positive values ignored).

    Returns:
        ``("G", 1e9)`` or ``("M", 1e6)``.
    """
    values = [float(v) for v in base_macs if not _missing(v) and float(v) > 0]
    if not values or min(values) >= 1e7:
        return "G", 1e9
    return "M", 1e6


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as floats, or an all-NaN series when the column is missing."""
    if name in frame.columns:
        return pd.to_numeric(frame[name], errors="coerce")
    return pd.Series(float("nan"), index=frame.index, dtype=float)


def _first_valid(frame: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` that is present with any non-NaN value (else all NaN)."""
    for name in names:
        series = _column(frame, name)
        if series.notna().any():
            return series
    return _column(frame, names[-1])


def _mean(frame: pd.DataFrame, name: str) -> float:
    """Mean of a (possibly missing) column, NaN when empty."""
    return float(_column(frame, name).mean())


def _summary_macs_unit(summary: pd.DataFrame) -> tuple[str, float]:
    """MACs unit of a summary table, from ``macs_base_mean`` (falling back to ``macs_mean``)."""
    return macs_unit(_first_valid(summary, "macs_base_mean", "macs_mean"))


# --------------------------------------------------------------------------- table rows


def _blank_row(**values: Any) -> dict[str, Any]:
    """A row with every key of :data:`ROW_KEYS` (strings empty, flags false) updated."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS, "")
    row.update(reference=False, new_model=False, new_ratio=False)
    row.update(top1_mean=float("nan"), delta_base_value=float("nan"))
    row.update(delta_ref_value=float("nan"), fallback=False)
    row.update(values)
    return row


def _prepare_summary(summary: pd.DataFrame, reference_method: str) -> pd.DataFrame:
    """Summary with a ``delta_ref`` column (top-1 difference to the reference method)."""
    frame = summary.copy()
    if "dataset" not in frame.columns:
        frame["dataset"] = ""
    frame["top1_mean"] = _column(frame, "top1_mean")
    keys = ["dataset", "model", "ratio"]
    ref = frame.loc[frame["method"] == reference_method, keys + ["top1_mean"]]
    ref = ref.drop_duplicates(keys).rename(columns={"top1_mean": "_top1_ref"})
    frame = frame.merge(ref, on=keys, how="left")
    frame["delta_ref"] = frame["top1_mean"] - frame["_top1_ref"]
    frame.loc[frame["method"] == reference_method, "delta_ref"] = float("nan")
    return frame.drop(columns="_top1_ref")


def _base_row(dataset: str, model: str, block: pd.DataFrame, scale: float) -> dict[str, Any]:
    """The *Base* row of one model, from the ``*_base`` columns."""
    top1 = _mean(block, "top1_base_mean")
    return _blank_row(
        kind="base",
        dataset=dataset,
        model=model,
        method=BASE_METHOD,
        label="Base",
        macs=fmt_number(_mean(block, "macs_base_mean") / scale),
        params=fmt_number(_mean(block, "params_base_mean") / 1e6),
        top1=fmt_mean_ci(top1, None),
        top1_mean=top1,
        new_model=True,
        new_ratio=True,
    )


def _ablation_delta(
    record: Mapping[str, Any], ablations: Mapping[str, str], comparisons: pd.DataFrame
) -> str:
    """Top-1 of a method minus its ablation's, paired over seeds, with the Holm-adjusted paired
    t-test p-value: ``+1.23 (p 0.042)``; empty for methods without an ablation in the study."""
    ablation = ablations.get(str(record["method"]))
    if not ablation or comparisons.empty:
        return ""
    pair = {str(record["method"]), ablation}
    keys = (comparisons["metric"] == "top1") & (comparisons["model"] == record["model"])
    keys &= pd.to_numeric(comparisons["ratio"]) == float(record["ratio"])
    if "dataset" in comparisons.columns:
        keys &= comparisons["dataset"] == record["dataset"]
    for row in comparisons[keys].to_dict("records"):
        if {row["method_a"], row["method_b"]} == pair:
            sign = 1.0 if row["method_a"] == record["method"] else -1.0
            return f"{fmt_delta(sign * float(row['mean_diff']))} (p {fmt_pvalue(row['t_p_holm'])})"
    return ""


def _method_row(
    record: Mapping[str, Any],
    scale: float,
    ablations: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """One (ratio, method) row from a summary record."""
    top1 = record.get("top1_mean", float("nan"))
    delta_base = float(top1) - float(record.get("top1_base_mean", float("nan")))
    n = record.get("n")
    return _blank_row(
        kind="method",
        dataset=record["dataset"],
        model=record["model"],
        method=record["method"],
        label=record["method"],
        family="" if _missing(record.get("family")) else str(record["family"]),
        ratio=fmt_ratio(record["ratio"]),
        macs=fmt_number(float(record.get("macs_mean", float("nan"))) / scale),
        params=fmt_number(float(record.get("params_mean", float("nan"))) / 1e6),
        top1=fmt_mean_ci(top1, record.get("top1_ci_half")),
        delta_base=fmt_delta(delta_base),
        delta_ref=fmt_delta(record["delta_ref"]),
        n="" if _missing(n) else str(int(n)),
        top1_pruned=fmt_mean_ci(record.get("top1_pruned_mean"), record.get("top1_pruned_ci_half")),
        planning=fmt_planning(record),
        influence=fmt_influence(record),
        fallback=_fell_back(record),
        delta_ablation=_ablation_delta(
            record, ablations or {}, pd.DataFrame() if comparisons is None else comparisons
        ),
        top1_mean=float(top1),
        delta_base_value=delta_base,
        delta_ref_value=float(record["delta_ref"]),
    )


def _fell_back(record: Mapping[str, Any]) -> bool:
    """Whether some of the runs' LLM decisions fell back to the default policy (only possible
    with ``agents.allow_fallback``; such rows are marked)."""
    share = record.get("planning_influence_fallback_share_mean")
    return not _missing(share) and float(share) > 0


def _method_rows(
    block: pd.DataFrame,
    scale: float,
    ablations: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
) -> list[dict[str, Any]]:
    """Rows of one model: ratios ascending, methods in order of appearance."""
    rows: list[dict[str, Any]] = []
    previous: Any = None
    for record in block.sort_values("ratio", kind="stable").to_dict("records"):
        row = _method_row(record, scale, ablations, comparisons)
        row["new_ratio"] = record["ratio"] != previous
        previous = record["ratio"]
        rows.append(row)
    return rows


def _reference_row(ref: Mapping[str, Any], dataset: str, scale: float) -> dict[str, Any]:
    """A published reference row (``macs_g`` in G, ``params_m`` in M, ``top1`` in %)."""
    macs_g = ref.get("macs_g")
    params_m = ref.get("params_m")
    return _blank_row(
        kind="reference",
        reference=True,
        dataset=dataset,
        model=str(ref.get("model", "")),
        method=str(ref.get("label", "")),
        label=str(ref.get("label", "")),
        macs="" if _missing(macs_g) else fmt_number(float(macs_g) * 1e9 / scale),
        params="" if _missing(params_m) else fmt_number(float(params_m)),
        top1=fmt_mean_ci(ref.get("top1"), None),
        source=str(ref.get("source", "") or ""),
        top1_mean=float("nan") if _missing(ref.get("top1")) else float(ref["top1"]),
    )


def _reference_rows(
    refs: Sequence[Mapping[str, Any]], dataset: str, scale: float
) -> list[dict[str, Any]]:
    """Reference rows for one model block (the first flagged as a new group)."""
    rows = [_reference_row(ref, dataset, scale) for ref in refs]
    if rows:
        rows[0]["new_ratio"] = True
    return rows


def _matches(ref: Mapping[str, Any], dataset: str, model: str) -> bool:
    """Whether a reference belongs to a (dataset, model) block (dataset optional)."""
    return ref.get("model") == model and ref.get("dataset", dataset) == dataset


def table_rows(
    summary: pd.DataFrame,
    reference_method: str = "isomorphic",
    references: list[dict] | None = None,
    ablations: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
) -> list[dict]:
    """Rows of the results table, styled after Isomorphic Pruning Tables 1-2.

    Per (dataset, model), in order of appearance: a *Base* row (method ``"base"``; MACs, params
    and top-1 from the ``*_base_mean`` columns), then per ratio (ascending) one row per method,
    then the published references of that model. References whose model is not in ``summary``
    come last. MACs use one unit for the whole table (see :func:`macs_unit`), params are in M.

    Args:
        summary: ``summary.csv`` of :mod:`agentprune.stats`.
        reference_method: Method that ``delta_ref`` compares against (same model and ratio).
        references: Published rows: dicts with ``model``, ``label``, ``macs_g``, ``params_m``,
            ``top1``, ``source`` (optionally ``dataset``).
        ablations: method -> its ablation (``multi_agent`` -> ``agents_heuristic``): the
            ``delta_ablation`` column pairs the two over seeds.
        comparisons: ``comparisons.csv`` (the paired tests behind ``delta_ablation``).

    Returns:
        Dicts with the keys :data:`ROW_KEYS`: formatted strings (``macs``, ``params``,
        ``top1`` as ``"mean ± ci_half"``, ``delta_base``, ``delta_ref``, ``n``,
        ``top1_pruned``), raw values (``top1_mean``, ``delta_base_value``, ``delta_ref_value``),
        ``kind`` (``base``/``method``/``reference``), ``reference`` and the group flags
        ``new_model``/``new_ratio``.
    """
    refs = list(references or [])
    if summary.empty:
        blocks: list[tuple[tuple[str, str], pd.DataFrame]] = []
        scale = 1e9
    else:
        frame = _prepare_summary(summary, reference_method)
        blocks = list(frame.groupby(["dataset", "model"], sort=False))
        scale = _summary_macs_unit(frame)[1]
    rows: list[dict[str, Any]] = []
    used: set[int] = set()
    for (dataset, model), block in blocks:
        mine = [i for i, ref in enumerate(refs) if i not in used and _matches(ref, dataset, model)]
        used.update(mine)
        rows.append(_base_row(dataset, model, block, scale))
        rows.extend(_method_rows(block, scale, ablations, comparisons))
        rows.extend(_reference_rows([refs[i] for i in mine], dataset, scale))
    rest = [ref for i, ref in enumerate(refs) if i not in used]
    for model in dict.fromkeys(str(ref.get("model", "")) for ref in rest):
        block_refs = [ref for ref in rest if str(ref.get("model", "")) == model]
        block_rows = _reference_rows(block_refs, str(block_refs[0].get("dataset", "")), scale)
        block_rows[0]["new_model"] = True
        rows.extend(block_rows)
    return rows


def comparison_rows(comparisons: pd.DataFrame) -> list[dict[str, str]]:
    """Formatted rows of ``comparisons.csv`` (3 decimals; p-values via :func:`fmt_pvalue`).

    Args:
        comparisons: ``comparisons.csv`` of :mod:`agentprune.stats`.

    Returns:
        Dicts with ``dataset``, ``model``, ``ratio``, ``metric``, ``method_a``, ``method_b``,
        ``n``, ``mean_diff``, ``t_p_holm``, ``wilcoxon_p_holm``, ``cohens_d``, ``significant``.
    """
    rows: list[dict[str, str]] = []
    for record in comparisons.to_dict("records"):
        n = record.get("n")
        significant = record.get("significant")
        rows.append(
            {
                "dataset": str(record.get("dataset", "")),
                "model": str(record.get("model", "")),
                "ratio": fmt_ratio(record.get("ratio")),
                "metric": str(record.get("metric", "")),
                "method_a": str(record.get("method_a", "")),
                "method_b": str(record.get("method_b", "")),
                "n": "" if _missing(n) else str(int(n)),
                "mean_diff": fmt_number(record.get("mean_diff")) or "–",
                "t_p_holm": fmt_pvalue(record.get("t_p_holm")),
                "wilcoxon_p_holm": fmt_pvalue(record.get("wilcoxon_p_holm")),
                "cohens_d": fmt_number(record.get("cohens_d")) or "–",
                "significant": "yes" if _is_true(significant) else "",
            }
        )
    return rows


def _is_true(value: Any) -> bool:
    """Whether a CSV boolean cell (bool or ``"True"``) is true."""
    if _missing(value):
        return False
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- templates


def make_environment(templates_dir: str | Path) -> Environment:
    """Jinja2 environment for the paper templates, with ``tex`` and ``md`` filters.

    Autoescaping is on for ``*.html`` and ``*.html.j2`` templates; undefined variables raise.

    Args:
        templates_dir: Directory holding the ``*.j2`` templates.

    Returns:
        The configured environment.
    """
    env = Environment(
        loader=FileSystemLoader(str(templates_dir)),
        autoescape=select_autoescape(["html", "html.j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tex"] = tex_escape
    env.filters["md"] = md_escape
    return env


def _datasets(summary: pd.DataFrame) -> list[str]:
    """Distinct data sets of a table, in order of appearance."""
    if "dataset" not in summary.columns:
        return []
    return [str(d) for d in dict.fromkeys(summary["dataset"].dropna())]


def _table_caption(datasets: Sequence[str], unit: str, reference_method: str) -> str:
    """Plain-text caption of the results table (templates escape it)."""
    where = f" on {', '.join(datasets)}" if datasets else ""
    return (
        f"Top-1 accuracy (%){where} after pruning and fine-tuning: mean ± half-width of the "
        f"95% Student-t confidence interval over seeds (mean only with a single seed). "
        f"MACs in {unit}, parameters in M. Ratio: fraction of base MACs removed (structured) "
        f"or weight sparsity (unstructured). Δ base: top-1 change vs the unpruned model; "
        f"Δ {reference_method}: top-1 difference to {reference_method} at the same model and "
        f"ratio. Top-1 pruned: before fine-tuning. Planning: mean trial prunes, real LLM "
        f"calls and seconds a run spent choosing its plan (– for the fixed recipes, which "
        f"spend none). Δ ablation: top-1 difference to the same method without its LLM "
        f"(multi_agent vs agents_heuristic: the same loop with the default policies), paired "
        f"over seeds, with the Holm-adjusted paired t-test p-value. LLM influence: the LLM's "
        f"decisions that differ from the default policy's in the same state, out of all "
        f"decisions; trials that ran an LLM-originated strategy; seeds whose selected trial "
        f"is one of them (means over seeds). ‡ some LLM decisions fell back to the default "
        f"policy (agents.allow_fallback). † published reference."
    )


def _table_context(
    summary: pd.DataFrame, rows: list[dict[str, Any]], reference_method: str
) -> dict[str, Any]:
    """Variables of the ``table.*.j2`` templates."""
    datasets = _datasets(summary)
    unit = _summary_macs_unit(summary)[0] if not summary.empty else "G"
    return {
        "rows": rows,
        "show_ablation": any(row["delta_ablation"] for row in rows),
        "show_influence": any(row["influence"] not in ("", "–") for row in rows),
        "reference_rows": [row for row in rows if row["reference"]],
        "unit": unit,
        "reference_method": reference_method,
        "datasets": datasets,
        "show_dataset": len(datasets) > 1,
        "title": "Pruning results.",
        "caption": _table_caption(datasets, unit, reference_method),
    }


def _write(path: Path, text: str) -> Path:
    """Write UTF-8 text ending in exactly one newline (its folder created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return path


def table_paths(out_dir: str | Path, stem: str, formats: Sequence[str] = TABLE_FORMATS) -> dict:
    """``{fmt: out_dir/<stem>.<fmt>}``: where a table's files go when a caller (a test, the CLI)
    picks a folder instead of the workflow's named outputs."""
    return {fmt: Path(out_dir) / f"{stem}.{fmt}" for fmt in formats}


def render_tables(
    summary: pd.DataFrame,
    paths: Mapping[str, str | Path],
    templates_dir: str | Path,
    reference_method: str = "isomorphic",
    references: list[dict] | None = None,
    title: str = "Pruning results.",
    caption: str | None = None,
    ablations: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
) -> list[Path]:
    """Render the table as Markdown, LaTeX and HTML to ``paths``.

    Args:
        summary: ``summary.csv`` of :mod:`agentprune.stats`.
        paths: ``{"md": ..., "tex": ..., "html": ...}``: where each format goes.
        templates_dir: Directory with ``table.md.j2``, ``table.tex.j2``, ``table.html.j2``.
        reference_method: Method that the ``Δ`` column compares against.
        references: Published reference rows (see :func:`table_rows`).
        title: The table's title.
        caption: The caption (None: the structured results caption).
        ablations: method -> its ablation (see :func:`table_rows`).
        comparisons: ``comparisons.csv`` (see :func:`table_rows`).

    Returns:
        The written files, in the order md, tex, html.

    Raises:
        jinja2.UndefinedError: A template uses an undefined variable.
    """
    rows = table_rows(summary, reference_method, references, ablations, comparisons)
    context = _table_context(summary, rows, reference_method)
    context["title"] = title
    if caption is not None:
        context["caption"] = caption
    env = make_environment(templates_dir)
    return [
        _write(Path(paths[fmt]), env.get_template(f"table.{fmt}.j2").render(**context))
        for fmt in TABLE_FORMATS
    ]


def family_frame(frame: pd.DataFrame, family: str) -> pd.DataFrame:
    """Rows of one method family (all rows when the frame has no ``family`` column)."""
    if "family" not in frame.columns or frame.empty:
        return frame if family == "structured" else frame.iloc[0:0]
    return frame[frame["family"] == family]


def _sparsity_caption(datasets: Sequence[str]) -> str:
    where = f" on {', '.join(datasets)}" if datasets else ""
    return (
        f"Unstructured pruning{where}: top-1 accuracy (%) at each sparsity (Ratio: fraction of "
        f"the prunable weights set to zero; shapes and MACs unchanged), mean ± half-width of the "
        f"95% Student-t confidence interval over seeds. Top-1: after fine-tuning with the masks "
        f"held; Top-1 pruned: before fine-tuning. Δ base: change vs the unpruned model; Δ wanda: "
        f"difference to Wanda at the same model and sparsity."
    )


def render_comparisons(
    comparisons: pd.DataFrame, paths: Mapping[str, str | Path], templates_dir: str | Path
) -> tuple[Path, Path]:
    """Render the comparisons table as Markdown and HTML to ``paths``.

    Args:
        comparisons: ``comparisons.csv`` of :mod:`agentprune.stats` (may be empty).
        paths: ``{"md": ..., "html": ...}``.
        templates_dir: Directory with ``comparisons.md.j2`` and ``comparisons.html.j2``.

    Returns:
        The Markdown and the HTML file.
    """
    rows = comparison_rows(comparisons)
    datasets = _datasets(comparisons)
    env = make_environment(templates_dir)
    written = []
    for ext in ("md", "html"):
        template = env.get_template(f"comparisons.{ext}.j2")
        text = template.render(rows=rows, show_dataset=len(datasets) > 1)
        written.append(_write(Path(paths[ext]), text))
    return written[0], written[1]


# --------------------------------------------------------------------------- figures


def _theme() -> None:
    """Seaborn theme shared by all figures."""
    sns.set_theme(style="whitegrid")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Save a figure as PNG at :data:`DPI` and close it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def _placeholder(path: str | Path, message: str) -> Path:
    """A figure that only says why there is nothing to plot."""
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    return _save(fig, path)


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean at :data:`CONFIDENCE` (seaborn ``errorbar``).

    The same interval as ``summary.csv`` (``mean ± t · std / sqrt(n)``), so figures and tables
    agree; seaborn's ``("ci", 95)`` would bootstrap instead, which is unreliable for few seeds.

    Args:
        values: The observations (e.g. one value per seed).

    Returns:
        ``(low, high)``; NaN with fewer than two values (no error bar is drawn).
    """
    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if len(data) < 2:
        return float("nan"), float("nan")
    mean = float(data.mean())
    quantile = float(sps.t.ppf((1 + CONFIDENCE) / 2, len(data) - 1))
    half = quantile * float(data.std(ddof=1)) / np.sqrt(len(data))
    return mean - half, mean + half


def _plot_frame(runs: pd.DataFrame, required: Sequence[str]) -> pd.DataFrame:
    """Runs with a ``panel`` label (model, or dataset / model) and no NaN in ``required``."""
    if any(col not in runs.columns for col in required):
        return pd.DataFrame(columns=[*required, "panel"])
    frame = runs.dropna(subset=list(required)).copy()
    models = frame["model"].astype(str)
    if "dataset" in frame.columns and frame["dataset"].nunique() > 1:
        models = frame["dataset"].astype(str) + " / " + models
    frame["panel"] = models
    return frame


def _methods(frame: pd.DataFrame) -> list[str]:
    """Sorted method names (a fixed hue order shared by all figures)."""
    return sorted(str(m) for m in frame["method"].unique())


def _base_top1(frame: pd.DataFrame) -> dict[str, float]:
    """Base top-1 per panel (empty when ``top1_base`` is missing)."""
    base = _column(frame, "top1_base").groupby(frame["panel"]).mean().dropna()
    return {str(k): float(v) for k, v in base.items()}


def _base_line(ax: plt.Axes, value: float | None, x: float | None = None) -> None:
    """Dashed horizontal line at the base model's top-1 (plus a star at ``x`` if given)."""
    if value is None:
        return
    ax.axhline(value, linestyle="--", color="0.3", linewidth=1.2, zorder=0)
    if x is not None:
        ax.plot([x], [value], marker="*", markersize=11, color="0.2", linestyle="none")


def _line_panels(
    long: pd.DataFrame, data: pd.DataFrame, x: str, y: str, **kw: Any
) -> sns.FacetGrid:
    """One panel per model, one line per method with a 95 % Student-t band over seeds."""
    panels = list(dict.fromkeys(data["panel"]))
    return sns.relplot(
        data=long,
        kind="line",
        x=x,
        y=y,
        hue="method",
        hue_order=_methods(data),
        col="panel",
        col_order=panels,
        col_wrap=min(len(panels), 3),
        errorbar=t_interval,
        marker="o",
        height=3.5,
        aspect=1.2,
        facet_kws={"sharex": False, "sharey": False},
        **kw,
    )


def plot_accuracy_vs_macs(runs: pd.DataFrame, path: str | Path) -> Path:
    """Top-1 vs MACs, one panel per model, one line per method (95 % Student-t band over seeds),
    before (dotted: one-shot, where the methods differ most) and after fine-tuning (solid).

    Seeds of a (model, method, ratio) share the mean MACs as x so that the band is a CI over
    seeds; the dashed line and the star mark the base model (top-1 at its MACs).

    Args:
        runs: ``runs.csv`` of :mod:`agentprune.stats`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    data = _plot_frame(
        family_frame(runs, "structured"), ["model", "method", "ratio", "macs", "top1"]
    )
    if data.empty:
        return _placeholder(path, "no runs with MACs and top-1 yet")
    unit, scale = macs_unit(_first_valid(data, "macs_base", "macs"))
    x = f"MACs ({unit})"
    data[x] = data.groupby(["panel", "method", "ratio"])["macs"].transform("mean") / scale
    long = pd.concat(
        [
            data.assign(stage="fine-tuned", accuracy=data["top1"]),
            data.assign(stage="pruned", accuracy=_column(data, "top1_pruned")),
        ]
    ).dropna(subset=["accuracy"])
    grid = _line_panels(
        long, data, x, "accuracy", style="stage", style_order=["fine-tuned", "pruned"]
    )
    base = _base_top1(data)
    base_x = (_column(data, "macs_base") / scale).groupby(data["panel"]).mean().dropna()
    for panel, ax in grid.axes_dict.items():
        _base_line(ax, base.get(str(panel)), base_x.get(panel))
    grid.set_titles("{col_name}")
    grid.set_axis_labels(x, "Top-1 (%)")
    return _save(grid.figure, path)


def plot_accuracy_vs_sparsity(runs: pd.DataFrame, path: str | Path) -> Path:
    """Top-1 vs sparsity of the unstructured methods, before (dotted) and after fine-tuning
    (solid), one panel per model, 95 % Student-t band over seeds; dashed: base model.

    Args:
        runs: ``runs.csv`` of :mod:`agentprune.stats`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    data = _plot_frame(family_frame(runs, "unstructured"), ["model", "method", "ratio", "top1"])
    if data.empty:
        return _placeholder(path, "no unstructured runs")
    long = pd.concat(
        [
            data.assign(stage="fine-tuned", accuracy=data["top1"]),
            data.assign(stage="pruned", accuracy=_column(data, "top1_pruned")),
        ]
    ).dropna(subset=["accuracy"])
    grid = _line_panels(
        long, data, "ratio", "accuracy", style="stage", style_order=["fine-tuned", "pruned"]
    )
    base = _base_top1(data)
    for panel, ax in grid.axes_dict.items():
        _base_line(ax, base.get(str(panel)))
    grid.set_titles("{col_name}")
    grid.set_axis_labels("Sparsity of the prunable weights", "Top-1 (%)")
    return _save(grid.figure, path)


def plot_method_comparison(runs: pd.DataFrame, path: str | Path) -> Path:
    """Top-1 per method, one panel per (model, ratio), 95 % Student-t CI over seeds; dashed: base.

    Args:
        runs: ``runs.csv`` of :mod:`agentprune.stats`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    data = _plot_frame(runs, ["model", "method", "ratio", "top1"])
    if data.empty:
        return _placeholder(path, "no runs with top-1 yet")
    methods = _methods(data)
    grid = sns.catplot(
        data=data,
        kind="point",
        x="method",
        y="top1",
        hue="method",
        order=methods,
        hue_order=methods,
        col="ratio",
        row="panel",
        errorbar=t_interval,
        capsize=0.2,
        legend=False,
        sharey="row",
        height=3,
        aspect=max(1.0, 0.35 * len(methods)),
    )
    base = _base_top1(data)
    for (panel, _ratio), ax in grid.axes_dict.items():
        _base_line(ax, base.get(str(panel)))
        ax.tick_params(axis="x", labelrotation=30)
    grid.set_titles("{row_name} · ratio {col_name}")
    grid.set_axis_labels("", "Top-1 (%)")
    return _save(grid.figure, path)


def _timing_long(runs: pd.DataFrame) -> pd.DataFrame:
    """Long form (panel, method, step, seconds) of the ``seconds_*`` columns present."""
    columns = [f"seconds_{step}" for step in STEPS if f"seconds_{step}" in runs.columns]
    data = _plot_frame(runs, ["model", "method"])
    if not columns or data.empty:
        return pd.DataFrame(columns=["panel", "method", "step", "seconds"])
    data[columns] = data[columns].apply(pd.to_numeric, errors="coerce")
    long = data.melt(
        id_vars=["panel", "method"], value_vars=columns, var_name="step", value_name="seconds"
    )
    long["step"] = long["step"].str.removeprefix("seconds_")
    return long.dropna(subset=["seconds"])


def plot_time_per_step(runs: pd.DataFrame, path: str | Path) -> Path:
    """Mean wall seconds per pipeline step and method (grouped horizontal bars, 95 % t-CI).

    Averages over ratios and seeds; one panel per model; steps whose ``seconds_*`` column is
    missing are left out.

    Args:
        runs: ``runs.csv`` of :mod:`agentprune.stats`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    long = _timing_long(runs)
    if long.empty:
        return _placeholder(path, "no timing columns (seconds_*) in runs.csv")
    methods = _methods(long)
    panels = list(dict.fromkeys(long["panel"]))
    grid = sns.catplot(
        data=long,
        kind="bar",
        x="seconds",
        y="method",
        hue="step",
        order=methods,
        hue_order=[s for s in STEPS if s in set(long["step"])],
        col="panel",
        col_order=panels,
        col_wrap=min(len(panels), 3),
        orient="h",
        errorbar=t_interval,
        sharex=False,
        height=0.5 * len(methods) + 2,
        aspect=1.3,
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("wall seconds (mean over ratios and seeds)", "")
    # With few seeds the t-interval reaches below zero; time cannot.
    for ax in grid.axes.flat:
        ax.set_xlim(left=0)
    return _save(grid.figure, path)


def plot_time_memory_per_step(bench: pd.DataFrame, path: str | Path) -> Path:
    """Job wall seconds per run and peak memory per pipeline step and method, from the benchmark
    files.

    One row of panels per model: wall seconds per run (left; a job of several seeds counts its
    share, ``seconds / runs``) and peak resident memory in MB (right); bars are means over ratios
    and jobs, error bars one standard deviation.

    Args:
        bench: ``benchmarks.csv`` of :mod:`agentprune.benchmarks`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    needed = {"model", "method", "step", "seconds", "max_rss_mb"}
    if bench.empty or not needed <= set(bench.columns):
        return _placeholder(path, "no benchmark files (results/benchmarks/**.tsv)")
    metrics = {"seconds": "wall seconds per run", "max_rss_mb": "peak memory (MB)"}
    if "runs" in bench.columns:
        bench = bench.assign(seconds=bench["seconds"] / bench["runs"].clip(lower=1))
    long = bench.melt(
        id_vars=["model", "method", "step"],
        value_vars=list(metrics),
        var_name="metric",
        value_name="value",
    )
    long["metric"] = long["metric"].map(metrics)
    long = long.dropna(subset=["value"])
    steps = [s for s in STEPS if s in set(long["step"])]
    grid = sns.catplot(
        data=long,
        kind="bar",
        x="step",
        y="value",
        hue="method",
        order=steps,
        hue_order=_methods(long),
        col="metric",
        col_order=list(metrics.values()),
        row="model",
        errorbar="sd",
        sharey=False,
        height=3.2,
        aspect=1.4,
    )
    grid.set_titles("{row_name}: {col_name}")
    grid.set_axis_labels("", "")
    return _save(grid.figure, path)


# --------------------------------------------------------------------------- the lm family

LM_METHOD_ORDER = ("magnitude", "sparsegpt", "wanda", "icbs")
"""Row order of the lm table: the Wanda README's (magnitude, SparseGPT, Wanda), then iCBS, then
any other method alphabetically."""


def lm_frame(frame: pd.DataFrame, lm: bool = True) -> pd.DataFrame:
    """Rows of lm runs (``model_family == lm``), or (``lm=False``) every other row; a frame
    without the column has no lm rows. Works on ``runs.csv`` and, through its models, on
    ``summary.csv``/``comparisons.csv`` given ``models``."""
    if "model_family" not in frame.columns or frame.empty:
        return frame.iloc[0:0] if lm else frame
    mask = frame["model_family"].astype(str) == "lm"
    return frame[mask] if lm else frame[~mask]


def _without_models(frame: pd.DataFrame, models: set[str]) -> pd.DataFrame:
    """``frame`` without the rows of ``models`` (a frame without a model column as is)."""
    if "model" not in frame.columns or not models or frame.empty:
        return frame
    return frame[~frame["model"].astype(str).isin(models)]


def _sparsity_key(label: str) -> tuple[int, float, str]:
    """Columns in order: fractions ascending, then N:M patterns."""
    if ":" in label:
        n, m = label.split(":")
        return (1, int(n) / int(m), label)
    return (0, float(label), label)


def _lm_label(value: Any) -> str:
    """A sparsity label as the lm table spells it (``0.5``, ``2:4``)."""
    text = str(value)
    if ":" in text:
        return text
    return f"{float(text):g}"


def _lm_method_key(method: str) -> tuple[int, str]:
    order = {m: i for i, m in enumerate(LM_METHOD_ORDER)}
    return (order.get(method, len(order)), method)


def lm_table(runs: pd.DataFrame, references: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The lm table in the Wanda README's layout: per (dataset, model) block the dense model
    first, then one row per method, one column per sparsity; perplexity means over seeds.

    Args:
        runs: ``runs.csv`` (its lm rows are used: ``model_family == lm``).
        references: ``paper.references`` entries; those with a ``sparsity`` and a ``perplexity``
            become published rows of their model's block (rows with the same label merge).

    Returns:
        ``{"columns": [...], "blocks": [{"dataset", "model", "rows": [{"label", "kind",
        "cells", "n", "source"}]}], "sources": [...]}``; cells are formatted strings ("" where
        there is no value).
    """
    data = lm_frame(runs)
    refs = [
        r
        for r in references
        if not _missing(r.get("perplexity")) and not _missing(r.get("sparsity"))
    ]
    labels = set()
    if not data.empty:
        labels |= {_lm_label(v) for v in data["sparsity_label"].dropna()}
    labels |= {_lm_label(r["sparsity"]) for r in refs if r["sparsity"] != "dense"}
    columns = sorted(labels, key=_sparsity_key)
    blocks: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    if not data.empty:
        keys = list(dict.fromkeys(zip(data["dataset"].astype(str), data["model"].astype(str))))
    for ref in refs:
        if not any(model == ref["model"] for _, model in keys):
            keys.append((str(ref.get("dataset", "")), str(ref["model"])))
    for dataset, model in keys:
        block = (
            data[(data["dataset"].astype(str) == dataset) & (data["model"].astype(str) == model)]
            if not data.empty
            else data
        )
        rows: list[dict[str, Any]] = []
        if not block.empty:
            dense = _mean(block, "perplexity_base")
            rows.append(
                {
                    "label": "Dense",
                    "kind": "dense",
                    "cells": [fmt_number(dense, 2)] * len(columns),
                    "n": "",
                    "source": "",
                }
            )
            methods = sorted({str(m) for m in block["method"]}, key=_lm_method_key)
            for method in methods:
                runs_m = block[block["method"].astype(str) == method]
                cells = []
                for label in columns:
                    cell = runs_m[runs_m["sparsity_label"].map(_lm_label) == label]
                    cells.append(fmt_number(_mean(cell, "perplexity"), 2) if len(cell) else "")
                seeds = runs_m["seed"].nunique()
                rows.append(
                    {"label": method, "kind": "method", "cells": cells, "n": str(seeds)}
                    | {"source": ""}
                )
        published: dict[str, dict[str, Any]] = {}
        for ref in refs:
            if ref["model"] != model:
                continue
            row = published.setdefault(
                str(ref["label"]),
                {"label": str(ref["label"]), "kind": "reference", "values": {}, "n": ""}
                | {"source": str(ref.get("source", ""))},
            )
            row["values"][_lm_label(ref["sparsity"]) if ref["sparsity"] != "dense" else "dense"] = (
                float(ref["perplexity"])
            )
        for row in published.values():
            values = row.pop("values")
            if "dense" in values:
                row["cells"] = [fmt_number(values["dense"], 2)] * len(columns)
            else:
                row["cells"] = [
                    fmt_number(values.get(c), 2) if c in values else "" for c in columns
                ]
            rows.append(row)
        blocks.append({"dataset": dataset, "model": model, "rows": rows})
    sources = list(dict.fromkeys(r["source"] for b in blocks for r in b["rows"] if r["source"]))
    return {"columns": columns, "blocks": blocks, "sources": sources}


def _lm_caption(table: Mapping[str, Any], runs: pd.DataFrame) -> str:
    data = lm_frame(runs)
    if not table["blocks"]:
        return (
            "This study has no causal LM (models[].family: lm), so there are no perplexities "
            "here; see config/lm.yaml."
        )
    datasets = sorted({str(d) for d in data["dataset"]}) if not data.empty else []
    where = f" on {', '.join(datasets)}" if datasets else ""
    return (
        f"Causal LMs{where}: token-level perplexity (lower is better) on non-overlapping "
        f"evaluation windows, mean over calibration seeds (Seeds). Columns: sparsity of every "
        f"Linear weight of the decoder blocks (embeddings and lm_head dense), an exact share of "
        f"each output row, or N:M (n zeros in every m consecutive weights of a row). One-shot "
        f"pruning, no fine-tuning. † published, not measured here."
    )


def render_lm_table(
    runs: pd.DataFrame,
    paths: Mapping[str, str | Path],
    templates_dir: str | Path,
    references: Sequence[Mapping[str, Any]] = (),
) -> list[Path]:
    """Render :func:`lm_table` as Markdown, LaTeX and HTML to ``paths`` (a note when the study
    has no lm model).

    Returns:
        The written files, in the order md, tex, html.
    """
    table = lm_table(runs, references)
    context = {
        **table,
        "title": "Causal LMs: perplexity by sparsity.",
        "caption": _lm_caption(table, runs),
        "show_dataset": len({b["dataset"] for b in table["blocks"]}) > 1,
    }
    env = make_environment(templates_dir)
    return [
        _write(Path(paths[fmt]), env.get_template(f"lm.{fmt}.j2").render(**context))
        for fmt in TABLE_FORMATS
    ]


def plot_perplexity_vs_sparsity(runs: pd.DataFrame, path: str | Path) -> Path:
    """Perplexity (log scale) vs sparsity of the lm runs, one line per method, one panel per
    model (fractions, then N:M patterns, as categories); dashed: the dense model.

    Args:
        runs: ``runs.csv`` of :mod:`agentprune.stats`.
        path: Output PNG.

    Returns:
        ``path``.
    """
    _theme()
    data = lm_frame(runs)
    if data.empty or "perplexity" not in data.columns:
        return _placeholder(path, "no lm runs (models[].family: lm)")
    data = data.assign(label=data["sparsity_label"].map(_lm_label))
    columns = sorted(set(data["label"]), key=_sparsity_key)
    panels = list(dict.fromkeys(data["model"].astype(str)))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False, sharey=False
    )
    methods = sorted({str(m) for m in data["method"]}, key=_lm_method_key)
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    for ax, model in zip(axes[0], panels):
        block = data[data["model"].astype(str) == model]
        for method in methods:
            rows = block[block["method"].astype(str) == method]
            means = rows.groupby("label")["perplexity"].mean()
            xs = [i for i, c in enumerate(columns) if c in means.index]
            ys = [float(means[c]) for c in columns if c in means.index]
            ax.plot(xs, ys, marker="o", label=method, color=palette[method])
        dense = _mean(block, "perplexity_base")
        if not np.isnan(dense):
            ax.axhline(dense, linestyle="--", color="0.3", linewidth=1.2, label="dense")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("sparsity of the decoder Linear weights")
        ax.set_ylabel("perplexity (log scale)")
    axes[0][-1].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- entry point


def _read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV; an empty file gives an empty frame."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


PAPER_OUTPUTS = (
    "results_md",
    "results_tex",
    "results_html",
    "comparisons_md",
    "comparisons_html",
    "unstructured_md",
    "unstructured_tex",
    "unstructured_html",
    "accuracy_vs_sparsity",
    "accuracy_vs_macs",
    "method_comparison",
    "time_per_step",
    "time_memory_per_step",
    "lm_md",
    "lm_tex",
    "lm_html",
    "perplexity_vs_sparsity",
)
"""The paper's files by name: the paper rule's named outputs, and the keys of
:func:`render_paper`'s ``outputs``."""


def paper_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`render_paper` writes under one folder when no workflow names the outputs:
    ``tables/<name>.<fmt>`` and ``figures/<name>.png`` (the workflow's own layout)."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name in PAPER_OUTPUTS:
        stem, _, fmt = name.rpartition("_")
        if fmt in TABLE_FORMATS:
            paths[name] = out / "tables" / f"{stem}.{fmt}"
        else:
            paths[name] = out / "figures" / f"{name}.png"
    return paths


def render_paper(
    runs_csv: str | Path,
    summary_csv: str | Path,
    comparisons_csv: str | Path,
    outputs: Mapping[str, str | Path],
    templates_dir: str | Path,
    settings: PaperSettings,
    benchmarks_csv: str | Path | None = None,
) -> dict[str, Path]:
    """Write the paper's tables and figures to the paths ``outputs`` names.

    Tables: ``results_*`` (structured methods), ``unstructured_*``, ``comparisons_*``, ``lm_*``
    (causal LMs: perplexity by sparsity, a note when there are none); figures:
    ``accuracy_vs_macs``, ``accuracy_vs_sparsity``, ``method_comparison``, ``time_per_step``,
    ``time_memory_per_step``, ``perplexity_vs_sparsity`` (see :data:`PAPER_OUTPUTS`).

    Args:
        runs_csv: ``runs.csv`` of :mod:`agentprune.stats`.
        summary_csv: ``summary.csv``.
        comparisons_csv: ``comparisons.csv``.
        outputs: Every name of :data:`PAPER_OUTPUTS` -> its path (the paper rule's outputs, or
            :func:`paper_paths`).
        templates_dir: Directory with the ``*.j2`` templates.
        settings: The Δ reference method, the published reference rows, method -> ablation.
        benchmarks_csv: ``benchmarks.csv`` of :mod:`agentprune.benchmarks` (job wall time and
            peak memory); without it the time and memory figure says so.

    Returns:
        The written paths, keyed like ``outputs``.
    """
    paths = {name: Path(outputs[name]) for name in PAPER_OUTPUTS}

    def formats(stem: str, fmts: Sequence[str] = TABLE_FORMATS) -> dict[str, Path]:
        return {fmt: paths[f"{stem}_{fmt}"] for fmt in fmts}

    all_runs = _read_csv(runs_csv)
    # The lm runs have their own table and figure; every other table and figure is the vision
    # family's (top-1, MACs).
    lm_models = {str(m) for m in lm_frame(all_runs)["model"]} if "model" in all_runs else set()
    runs = lm_frame(all_runs, lm=False)
    summary = _without_models(_read_csv(summary_csv), lm_models)
    comparisons = _read_csv(comparisons_csv)
    render_lm_table(all_runs, formats("lm"), templates_dir, settings.references)
    plot_perplexity_vs_sparsity(all_runs, paths["perplexity_vs_sparsity"])
    render_tables(
        family_frame(summary, "structured"),
        formats("results"),
        templates_dir,
        settings.reference_method,
        settings.references,
        ablations=settings.ablations,
        comparisons=comparisons,
    )
    sparse = family_frame(summary, "unstructured")
    render_tables(
        sparse,
        formats("unstructured"),
        templates_dir,
        "wanda",
        [],
        title="Unstructured pruning (iCBS, Wanda, magnitude).",
        caption=_sparsity_caption(_datasets(sparse)),
    )
    render_comparisons(comparisons, formats("comparisons", ("md", "html")), templates_dir)
    plot_accuracy_vs_sparsity(runs, paths["accuracy_vs_sparsity"])
    plot_accuracy_vs_macs(runs, paths["accuracy_vs_macs"])
    plot_method_comparison(runs, paths["method_comparison"])
    plot_time_per_step(all_runs, paths["time_per_step"])
    plot_time_memory_per_step(
        _read_csv(benchmarks_csv) if benchmarks_csv else pd.DataFrame(),
        paths["time_memory_per_step"],
    )
    return paths
