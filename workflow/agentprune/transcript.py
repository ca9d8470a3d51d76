"""A multi-agent plan's transcript as a standalone HTML page (linked from the Snakemake report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parents[1] / "templates"


def _pretty(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, indent=1, default=str)


def _messages(messages: Any) -> str:
    if not messages:
        return ""
    return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in messages)


def render_transcript(plan: dict[str, Any], templates_dir: str | Path = TEMPLATES) -> str:
    """The HTML page of ``plan``: the plan, every decision next to the default policy's, the
    trials, clamps, fallbacks and every exchange."""
    from agentprune.paper import make_environment

    env = make_environment(templates_dir)
    env.filters["pretty"] = _pretty
    env.filters["chat"] = _messages
    provenance = plan.get("provenance", {})
    return env.get_template("transcript.html.j2").render(
        plan=plan,
        provenance=provenance,
        agents=plan.get("agents", {}),
        trials=provenance.get("trials", []),
        exchanges=provenance.get("exchanges", []),
        clamps=provenance.get("clamps", []),
        fallbacks=provenance.get("fallbacks", []),
        decisions=provenance.get("decisions", []),
    )


def write_transcript(plan_json: str | Path, out_html: str | Path) -> Path:
    """Render ``plan.json`` to ``out_html``."""
    from agentprune.steps import read_json

    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_transcript(read_json(plan_json)), encoding="utf-8")
    return out
