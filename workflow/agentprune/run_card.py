"""One run's results as a standalone HTML card (category Runs of the Snakemake report).

Every number on the card comes from the run's ``metrics.json``; the plan's pruner settings are shown
verbatim so that a reader can see what was pruned without opening the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parents[1] / "templates"


def _fmt(value: Any, decimals: int = 2) -> str:
    from agentprune.paper import fmt_number

    return fmt_number(value, decimals)


def render_run_card(
    metrics: dict[str, Any], plan: dict[str, Any], templates_dir: str | Path = TEMPLATES
) -> str:
    """The HTML card of one run.

    Args:
        metrics: The run's ``metrics.json``.
        plan: The run's ``plan.json`` (its ``pruner`` settings and provenance summary are shown).
        templates_dir: Directory holding ``run.html.j2``.
    """
    from agentprune.paper import make_environment

    env = make_environment(templates_dir)
    env.filters["num"] = _fmt
    settings = plan.get("pruner") or plan.get("settings") or {}
    return env.get_template("run.html.j2").render(
        m=metrics,
        planning=metrics.get("planning") or {},
        seconds=metrics.get("seconds") or {},
        settings=json.dumps(settings, indent=1, sort_keys=True, default=str),
    )


def write_run_card(metrics_json: str | Path, plan_json: str | Path, out_html: str | Path) -> Path:
    """Render the card of the run whose ``metrics.json`` and ``plan.json`` are given."""
    metrics = json.loads(Path(metrics_json).read_text())
    plan = json.loads(Path(plan_json).read_text())
    out = Path(out_html)
    out.write_text(render_run_card(metrics, plan))
    return out
