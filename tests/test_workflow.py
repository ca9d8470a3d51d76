"""End-to-end workflow tests through the Snakemake Python API on config/smoke.yaml.

One module-scoped temp workdir carries the three runs in order: a full run, a no-op rerun, and a
``-R finetune`` rerun. Job counts per rule are derived from the files each run reports as updated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from smoke import ROOT, SMOKE, run_snakemake, smoke_grid

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def workdir(smoke_run: tuple[Path, Counter]) -> Path:
    return smoke_run[0]


@pytest.fixture(scope="module")
def first_run(smoke_run: tuple[Path, Counter]) -> Counter:
    return smoke_run[1]


def test_full_run_builds_every_job_and_the_report(workdir: Path, first_run: Counter) -> None:
    assert dict(first_run) == smoke_grid()
    results = workdir / "results"
    report = results / "report.html"
    assert report.is_file() and report.stat().st_size > 100_000
    figures = ("accuracy_vs_macs", "accuracy_vs_sparsity", "method_comparison", "time_per_step")
    for fig in (*figures, "time_memory_per_step"):
        assert (results / "paper" / "figures" / f"{fig}.png").stat().st_size > 5_000
    table = (results / "paper" / "tables" / "results.md").read_text()
    assert "isomorphic" in table and "magnitude_l2" in table and "icbs" not in table
    sparse = (results / "paper" / "tables" / "unstructured.md").read_text()
    assert "| icbs |" in sparse and "| magnitude |" in sparse
    metrics = [json.loads(p.read_text()) for p in results.glob("digits/*/*/r*/s*/metrics.json")]
    assert len(metrics) == smoke_grid()["evaluate"]
    assert {m["family"] for m in metrics} == {"structured", "unstructured"}
    for m in metrics:
        if m["family"] == "structured":
            # Every structured run lands within +-0.5 % of base MACs of its target.
            assert abs(m["achieved"] - m["ratio"]) <= 0.005 + 1e-9, m
            assert abs((1 - m["macs"] / m["macs_base"]) - m["ratio"]) <= 0.005 + 1e-9
        else:
            # Unstructured: exact density after pruning, and the masks held through fine-tuning.
            assert abs(m["sparsity"] - m["ratio"]) < 1e-3, m
            assert m["macs"] == m["macs_base"]
        assert set(m["seconds"]) == {"plan", "prune", "finetune", "evaluate"}
        assert m["top1"] > 10.0 * 1.5, "fine-tuned smoke runs must beat chance (10 %)"


def test_second_run_is_a_noop(workdir: Path, first_run: Counter) -> None:
    assert sum(first_run.values()) > 0
    report = workdir / "results" / "report.html"
    before = report.stat().st_mtime
    assert run_snakemake(workdir) == Counter()
    assert report.stat().st_mtime == before


def test_forcerun_finetune_reruns_only_descendants(workdir: Path, first_run: Counter) -> None:
    assert sum(first_run.values()) > 0
    grid = smoke_grid()
    jobs = run_snakemake(workdir, forcerun=["finetune"])
    assert dict(jobs) == {
        "finetune": grid["finetune"],
        "evaluate": grid["evaluate"],
        "run_card": grid["run_card"],
        "stats": 1,
        "paper": 1,
    }


def test_bad_config_fails_before_any_job_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  epochs: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n"]
        + ["--configfile", str(SMOKE), str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert errors == ["config error at 'finetune.epochs': -1 is less than the minimum of 0"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_no_api_key_reaches_any_artifact_or_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi_agent run against an OpenAI-compatible server (scripted, answering every agent
    with a schema-valid decision) leaves no trace of the API key in results/ or .snakemake/."""
    import secrets

    from fault_server import FaultServer, Step

    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    answers = {
        "profiling": {"risks": [], "protect": []},
        "master": {
            "action": "continue",
            "strategy": {
                "importance": "taylor",
                "grouping": "global",
                "heads": 0.0,
                "allocation": None,
                "round_to": 1,
                "calibration_batches": 2,
            },
            "rationale": "global taylor",
        },
        "fine-tuning": {"lr": 0.001, "steps": 5, "rationale": "short"},
        "evaluation": {"acceptable": True, "assessment": "ok"},
    }

    def answer(body: dict, headers: dict) -> Step:
        system = body["messages"][0]["content"]
        agent = next(a for a in answers if f"the {a} agent" in system)
        return Step(json.dumps(answers[agent]))

    server = FaultServer(default=answer)
    try:
        jobs = run_snakemake(
            tmp_path,
            overrides={
                "methods": ["multi_agent"],
                "seeds": [0],
                "agents": {
                    "backend": "openai",
                    "model": "scripted",
                    "base_url": server.url,
                    "max_iterations": 1,
                },
            },
        )
    finally:
        server.close()
    assert jobs["plan"] == 1 and jobs["transcript"] == 1
    # The key did travel to the server: the check below can fail.
    assert any(h.get("authorization") == f"Bearer {key}" for h in server.headers)
    plan = json.loads(next(tmp_path.glob("results/digits/*/multi_agent/*/*/plan.json")).read_text())
    assert plan["provenance"]["exchanges"] and plan["provenance"]["fallbacks"] == []
    files = [p for d in ("results", ".snakemake") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaks == []
