"""The smoke workflow run that several test modules share, and the helpers that drive it.

The run goes through the Snakemake Python API on ``config/smoke.yaml``; counts per rule are
derived from the files each run reports as updated: jobs, except for the per-run steps (plan,
prune, finetune, evaluate, run card, transcript), whose batched jobs (``batch_seeds``) write one
such file per run, so they count runs.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "config" / "smoke.yaml"

# The output file that identifies each rule's job (one per job; one per run for the per-run steps).
RULE_OF_OUTPUT = {
    "dataset.json": "download_data",
    "model.safetensors": "download_model",
    "profile.json": "profile",
    "plan.json": "plan",
    "pruned.safetensors": "prune",
    "finetuned.safetensors": "finetune",
    "metrics.json": "evaluate",
    "runs.csv": "stats",
    "results.md": "paper",
    "transcript.html": "transcript",
    "run.html": "run_card",
}


def run_snakemake(
    workdir: Path,
    forcerun: list[str] | None = None,
    overrides: dict | None = None,
    until: list[str] | None = None,
    targets: list[str] | None = None,
) -> Counter:
    """Run the workflow with the Snakemake API; return the number of jobs (runs, for the batched
    rules) per rule.

    Args:
        workdir: The run's working directory (results/ goes there).
        forcerun: Rules to rerun with their descendants (``-R``).
        overrides: Config values merged over config/smoke.yaml (``--config``).
        until: Rules after which to stop (``--until``).
        targets: Files to build (default: the workflow's default target).
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        ResourceSettings,
    )

    updated: list[str] = []
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(configfiles=[SMOKE], config=overrides or {}),
            snakefile=ROOT / "Snakefile",
            workdir=workdir,
        )
        settings = DAGSettings(
            targets=frozenset(targets or ()), forcerun=forcerun or [], until=until or []
        )
        dag = workflow.dag(settings)
        dag.execute_workflow(executor="local", updated_files=updated)
    jobs: Counter = Counter()
    for path in updated:
        name = Path(path).name
        if name == "model.safetensors" and "/base/" not in path:
            continue
        if name == "metrics.json" and "/base/" in path:
            continue
        if name in RULE_OF_OUTPUT:
            jobs[RULE_OF_OUTPUT[name]] += 1
    return jobs


# What every run of the smoke grid's model starts from: the data set, the trained base model and
# its profile (relative to results/).
UPSTREAM = ("digits/dataset.json", "digits/vit/base", "digits/vit/profile.json")


def copy_upstream(source: Path, dest: Path) -> None:
    """Copy the smoke run's upstream files (with their mtimes) from workdir ``source`` into workdir
    ``dest``, so that a test about what happens downstream does not train the base model again:
    Snakemake finds them present and up to date."""
    for rel in UPSTREAM:
        src, dst = source / "results" / rel, dest / "results" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def smoke_grid() -> dict[str, int]:
    """Jobs (runs, for the batched rules) per rule the smoke grid implies."""
    cfg = yaml.safe_load(SMOKE.read_text())
    from agentprune.pruning import catalog

    per_ratio = len(cfg["models"]) * len(cfg["seeds"])
    families = [catalog.get(m).family for m in cfg["methods"]]
    runs = per_ratio * sum(
        len(cfg["ratios"]) if f == "structured" else len(cfg["sparsities"]) for f in families
    )
    agent_runs = (
        per_ratio * len(cfg["ratios"]) * sum(catalog.get(m).uses_agents for m in cfg["methods"])
    )
    return {
        "download_data": 1,
        "download_model": len(cfg["models"]),
        "profile": len(cfg["models"]),
        "plan": runs,
        "prune": runs,
        "finetune": runs,
        "evaluate": runs,
        "transcript": agent_runs,
        "run_card": runs,
        "stats": 1,
        "paper": 1,
    }
