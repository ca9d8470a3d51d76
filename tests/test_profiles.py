"""The execution profiles: what the SLURM profile asks of the cluster, and that the workflow profile
(which Snakemake loads next to any --profile, winning key by key) never overrides it."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from snakemake.resources import Resource

ROOT = Path(__file__).resolve().parents[1]
SLURM = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.v8+.yaml").read_text())
DEFAULT = yaml.safe_load((ROOT / "profiles" / "default" / "config.v8+.yaml").read_text())
GPU_RULES = ("download_model", "plan_trials", "prune", "finetune", "evaluate")
CPU_RULES = ("profile", "plan")


def evaluate(value: object, attempt: int = 1, threads: int = 8, size_mb: float = 10.0) -> object:
    """A profile resource value as Snakemake evaluates it for one job whose inputs weigh
    ``size_mb`` (Snakemake's ``input.size_mb``)."""
    if not isinstance(value, str):
        return value
    inputs = SimpleNamespace(size_mb=size_mb)
    return Resource.cli_evaluator(
        "resource",
        value,
        wildcards={},
        input=inputs,
        attempt=attempt,
        threads=threads,
        async_run=None,
    )


def workflow_rules() -> tuple[set[str], set[str]]:
    """(every rule, the local rules) declared in Snakefile and rules/*.smk."""
    text = "\n".join(p.read_text() for p in [ROOT / "Snakefile", *ROOT.glob("rules/*.smk")])
    rules = set(re.findall(r"^rule (\w+):", text, re.M))
    rules |= set(re.findall(r"^use rule \w+ as (\w+)", text, re.M))
    block = re.search(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", text, re.M)
    assert block, "no localrules: block"
    return rules, set(re.findall(r"\w+", block.group(1)))


def test_workflow_profile_never_overrides_the_execution_profile() -> None:
    execution_keys = {"executor", "jobs", "cores", "set-threads", "set-resources"}
    execution_keys |= {"default-resources", "latency-wait", "retries", "local-cores"}
    assert not execution_keys & set(DEFAULT)
    for key, value in DEFAULT.items():
        assert SLURM.get(key, value) == value, f"workflow profile would override {key}"


def test_every_cluster_rule_has_resources_and_threads() -> None:
    rules, local = workflow_rules()
    assert {"download_data", "download_weights", "stats", "paper"} <= local
    assert set(SLURM["set-resources"]) == rules - local
    assert set(SLURM["set-threads"]) == rules - local
    assert SLURM["executor"] == "slurm"


@pytest.mark.parametrize("rule", GPU_RULES)
def test_gpu_rules_ask_for_a_gpu_on_the_gpu_partition(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = SLURM["set-resources"][rule]
    assert res["gpu"] == 1
    assert evaluate(res["cpus_per_gpu"], threads=6) == 6  # follows the rule's threads
    monkeypatch.setenv("AGENTPRUNE_GPU_PARTITION", "a100")
    assert evaluate(res["slurm_partition"]) == "a100"
    monkeypatch.delenv("AGENTPRUNE_GPU_PARTITION")
    assert evaluate(res["slurm_partition"]) == ""  # the cluster's default partition


@pytest.mark.parametrize("rule", GPU_RULES + CPU_RULES)
def test_memory_and_time_grow_with_attempt(rule: str) -> None:
    res = {**SLURM["default-resources"], **SLURM["set-resources"][rule]}
    for key in ("mem_mb", "runtime"):
        values = [evaluate(res[key], attempt=a) for a in (1, 2, 3)]
        assert all(isinstance(v, int) and v > 0 for v in values), (key, values)
        assert values[0] < values[1] < values[2], (key, values)


@pytest.mark.parametrize("rule", GPU_RULES + CPU_RULES)
def test_requests_follow_the_input_size_within_bounds(rule: str) -> None:
    """A tiny model asks for the floor (fits a small node); a 7B-sized one for more, capped."""
    res = {**SLURM["default-resources"], **SLURM["set-resources"][rule]}
    small, large = (evaluate(res["mem_mb"], size_mb=mb) for mb in (1.0, 30_000.0))
    assert 1000 <= small <= 4000 and small <= large <= 64_000
    # Snakemake's --set-threads takes integers only: one thread, which a 2-CPU node fits.
    assert SLURM["set-threads"][rule] == 1
    if rule != "plan":  # a fixed recipe reads no model: a constant request
        assert large > small


@pytest.mark.parametrize("rule", CPU_RULES)
def test_cpu_rules_use_the_cpu_partition_and_no_gpu(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = {**SLURM["default-resources"], **SLURM["set-resources"][rule]}
    assert "gpu" not in res
    monkeypatch.setenv("AGENTPRUNE_CPU_PARTITION", "cpu-long")
    assert evaluate(res["slurm_partition"]) == "cpu-long"


def test_account_comes_from_slurm_account(monkeypatch: pytest.MonkeyPatch) -> None:
    account = SLURM["default-resources"]["slurm_account"]
    monkeypatch.setenv("SLURM_ACCOUNT", "proj42")
    assert evaluate(account) == "proj42"
    monkeypatch.delenv("SLURM_ACCOUNT")
    assert evaluate(account) == ""  # the plugin then submits without -A
