"""End-to-end workflow tests through the Snakemake Python API on config/smoke.yaml.

The session-wide smoke run (conftest.smoke_run) is followed here by a no-op rerun and targeted
reruns (``-R finetune``, ``--until evaluate``, changed params); job counts per rule are derived from
the files each run reports as updated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from smoke import ROOT, SMOKE, copy_upstream, run_snakemake, smoke_grid

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
    assert "isomorphic" in table and "agents_heuristic" in table and "icbs" not in table
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


def per_run(*rules: str) -> dict[str, int]:
    """Every run of the smoke grid once per rule, plus the aggregate stats and paper jobs."""
    grid = smoke_grid()
    return {**{rule: grid[rule] for rule in rules}, "stats": 1, "paper": 1}


def test_forcerun_finetune_reruns_only_descendants(workdir: Path, first_run: Counter) -> None:
    """``-R finetune`` on one run's card: the finetune, evaluate and run-card jobs of its (model,
    method, ratio), which serve every seed (batch_seeds), rerun, and nothing upstream of finetune
    (one cell: the grid's others would repeat the check)."""
    assert sum(first_run.values()) > 0
    seeds = yaml.safe_load(SMOKE.read_text())["seeds"]
    target = f"results/digits/vit/isomorphic/r0.3/s{seeds[0]}/run.html"  # relative to the workdir
    runs = [(workdir / target).parents[1] / f"s{seed}" for seed in seeds]
    names = ("plan.json", "pruned.safetensors")
    before = [{name: (run / name).stat().st_mtime_ns for name in names} for run in runs]
    jobs = run_snakemake(workdir, forcerun=["finetune"], targets=[target])
    assert dict(jobs) == {"finetune": len(seeds), "evaluate": len(seeds), "run_card": len(seeds)}
    assert [{name: (run / name).stat().st_mtime_ns for name in names} for run in runs] == before


FINETUNE_CHANGE = {"finetune": {"lr": 0.002}}


def test_changed_finetune_params_rerun_finetune_and_downstream_only(
    workdir: Path, first_run: Counter
) -> None:
    """The params trigger, seen in two halves: ``--until evaluate`` stops the changed chain after
    evaluate, and the next plain run finishes exactly the rest of it (nothing upstream reruns)."""
    assert sum(first_run.values()) > 0
    grid = smoke_grid()
    reports = sorted(workdir.glob("results/digits/*/*/*/*/finetune_report.json"))
    before = [json.loads(p.read_text())["epoch_loss"] for p in reports]
    jobs = run_snakemake(workdir, overrides=FINETUNE_CHANGE, until=["evaluate"])
    assert dict(jobs) == {"finetune": grid["finetune"], "evaluate": grid["evaluate"]}
    assert dict(run_snakemake(workdir, overrides=FINETUNE_CHANGE)) == per_run("run_card")
    after = [json.loads(p.read_text())["epoch_loss"] for p in reports]
    # The new learning rate reached every fine-tuning run.
    assert len(reports) == grid["finetune"]
    assert all(a != b for a, b in zip(after, before))


def test_changed_method_settings_rerun_only_that_methods_chain(
    workdir: Path, first_run: Counter
) -> None:
    assert sum(first_run.values()) > 0
    cfg = yaml.safe_load(SMOKE.read_text())
    overrides = {**FINETUNE_CHANGE, "method_settings": {"isomorphic": {"round_to": 1}}}
    jobs = run_snakemake(workdir, overrides=overrides)
    one_chain = len(cfg["seeds"]) * len(cfg["ratios"]) * len(cfg["models"])
    chain = {rule: one_chain for rule in ("plan", "prune", "finetune", "evaluate", "run_card")}
    assert dict(jobs) == {**chain, "stats": 1, "paper": 1}
    plans = list(workdir.glob("results/digits/*/isomorphic/*/*/plan.json"))
    assert plans and all(json.loads(p.read_text())["pruner"]["round_to"] == 1 for p in plans)


def test_a_method_section_value_reruns_exactly_that_methods_chain(
    workdir: Path, first_run: Counter
) -> None:
    """icbs.block_size was a params trigger that the pruner never read from its params; now the
    plan rule's params are the icbs settings themselves: the change reruns the icbs chain only,
    and the new value is what the pruner used."""
    assert sum(first_run.values()) > 0
    cfg = yaml.safe_load(SMOKE.read_text())
    overrides = {**FINETUNE_CHANGE, "method_settings": {"isomorphic": {"round_to": 1}}}
    overrides["icbs"] = {"block_size": 8}
    jobs = run_snakemake(workdir, overrides=overrides)
    one_chain = len(cfg["seeds"]) * len(cfg["sparsities"]) * len(cfg["models"])
    chain = {rule: one_chain for rule in ("plan", "prune", "finetune", "evaluate", "run_card")}
    assert dict(jobs) == {**chain, "stats": 1, "paper": 1}
    plans = list(workdir.glob("results/digits/*/icbs/*/*/plan.json"))
    assert plans and all(json.loads(p.read_text())["pruner"]["block_size"] == 8 for p in plans)
    logs = list(workdir.glob("results/logs/digits/*/icbs/*/*/prune.log"))
    assert logs and all("'block_size': 8," in p.read_text() for p in logs)


def _dry_run_jobs(workdir: Path, *config: str) -> Counter:
    """Jobs per rule of ``snakemake -n`` on the smoke grid in ``workdir``, from its job stats."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n"]
    cmd += ["--cores", "1", "--configfile", str(SMOKE), "--config", *config]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    jobs: Counter = Counter()
    for line in lines[lines.index("Job stats:") + 3 :]:  # after the title, header and dashes
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.parametrize("batch", [True, False])
def test_batch_seeds_runs_one_job_per_model_method_and_ratio(tmp_path: Path, batch: bool) -> None:
    """With batch_seeds, every per-run step runs one job for all seeds of a (model, method,
    ratio); without it one per run."""
    seeds = len(yaml.safe_load(SMOKE.read_text())["seeds"])
    runs = smoke_grid()
    jobs = _dry_run_jobs(tmp_path, f"batch_seeds={batch}")
    jobs["plan"] += jobs.pop("plan_trials")
    for rule in ("plan", "prune", "finetune", "evaluate", "run_card", "transcript"):
        assert jobs[rule] == (runs[rule] // seeds if batch else runs[rule]), rule


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
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi_agent run against an OpenAI-compatible server (scripted, answering every agent
    with a schema-valid decision) leaves no trace of the API key in results/ or .snakemake/.
    It starts from the smoke run's base model: the key travels with the plan job only."""
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
            "recovery": {"lr": 0.001, "steps": 5},
        },
    }

    def answer(body: dict, headers: dict) -> Step:
        system = body["messages"][0]["content"]
        agent = next(a for a in answers if f"You are the {a} agent" in system)
        return Step(json.dumps(answers[agent]))

    copy_upstream(workdir, tmp_path)
    server = FaultServer(default=answer)
    try:
        jobs = run_snakemake(
            tmp_path,
            overrides={
                "methods": ["multi_agent"],
                "paper": {"reference_method": "multi_agent"},
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


def test_an_unreachable_llm_fails_the_plan_job_with_one_line(
    workdir: Path, first_run: Counter, tmp_path: Path
) -> None:
    """A study whose base_url is a closed port fails in its plan job with the coordinator's one
    line (backend, endpoint, last error), instead of running the default policy as multi_agent;
    with agents.allow_fallback the same job succeeds and says so in its plan."""
    import socket

    assert sum(first_run.values()) > 0
    copy_upstream(workdir, tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # closed once the block ends
    agents = {"backend": "openai", "model": "m", "base_url": url, "backoff_s": 0.01}
    study = tmp_path / "closed_port.yaml"
    study.write_text(yaml.safe_dump({"agents": agents}))
    target = "results/digits/vit/multi_agent/r0.3/s0/plan.json"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1"]
    cmd += ["--configfile", str(SMOKE), str(study), "--", target]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    seeds = yaml.safe_load(SMOKE.read_text())["seeds"]  # one plan job serves them (batch_seeds)
    job = "s" + "+".join(str(seed) for seed in seeds)
    log = (tmp_path / f"results/logs/digits/vit/multi_agent/r0.3/{job}/plan.log").read_text()
    (line,) = [x for x in log.splitlines() if x.startswith("agentprune.agents.coordinator.")]
    assert "LLMUnavailableError: multi_agent planning failed" in line
    assert f"backend openai at {url}" in line and "connection error" in line
    assert not (tmp_path / target).exists()
    study.write_text(yaml.safe_dump({"agents": {**agents, "allow_fallback": True}}))
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / target).read_text())
    assert plan["provenance"]["allow_fallback"] and plan["agents"]["influence"]["failed"] >= 2


def test_cache_reuses_base_model_and_profile_in_another_workdir(tmp_path: Path) -> None:
    """`snakemake --cache` with $SNAKEMAKE_OUTPUT_CACHE: a second study neither trains the base
    model nor profiles it again, and gets byte-identical files."""
    (tmp_path / "cache").mkdir()  # Snakemake does not create it
    env = {**os.environ, "SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "cache")}
    target = "results/digits/vit/profile.json"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2"]
    # Both --cache (no rule names: every rule with cache: True) and --configfile take a list.
    cmd += [target, "--cache", "--configfile", str(SMOKE)]
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        proc = subprocess.run(
            cmd, cwd=tmp_path / name, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    # The second run linked every cached file instead of running the jobs.
    for rel in ("base/model.safetensors", "base/model.json", "base/metrics.json", "profile.json"):
        assert f"output file results/digits/vit/{rel} from cache" in proc.stderr, rel
    first, second = tmp_path / "first", tmp_path / "second"
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 4, cached  # three base-model files and the profile
    # The jobs' scripts never ran in the second workdir: they would have written their logs.
    for log in ("download_model.log", "profile.log"):
        assert (first / "results/logs/digits/vit" / log).stat().st_size > 0
        second_log = second / "results/logs/digits/vit" / log
        assert not second_log.exists() or second_log.stat().st_size == 0
    base = "results/digits/vit/base"
    for rel in (f"{base}/model.safetensors", f"{base}/model.json", f"{base}/metrics.json", target):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


PER_RUN_STEPS = ("plan", "prune", "finetune", "evaluate", "run_card", "transcript", "profile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks on Linux")
def test_every_per_run_step_of_the_smoke_run_ran_in_the_warm_worker(workdir: Path) -> None:
    from agentprune import worker

    logs = [p for p in (workdir / "results" / "logs").rglob("*.log") if p.stem in PER_RUN_STEPS]
    assert len(logs) > 20
    assert [str(log) for log in logs if worker.logged_usage(log) is None] == []


def test_worker_off_prunes_to_the_same_bytes(workdir: Path, tmp_path: Path) -> None:
    """One cell pruned in its own interpreter (worker: off), then again by the warm worker
    (-R prune): the same bytes. (Not against the smoke run's files: other tests change its
    config.)"""
    cell = Path("results/digits/vit/isomorphic/r0.3")
    target = [str(cell / "s0/pruned.safetensors")]
    copy_upstream(workdir, tmp_path)
    assert run_snakemake(tmp_path, overrides={"worker": "off"}, targets=target)["prune"] > 0
    log = next((tmp_path / "results" / "logs" / "digits" / "vit" / "isomorphic").rglob("prune.log"))
    assert "worker:" not in log.read_text()  # it really ran in its own interpreter
    pruned = sorted((tmp_path / cell).glob("s*/pruned.safetensors"))
    assert len(pruned) == len(yaml.safe_load(SMOKE.read_text())["seeds"])
    before = [path.read_bytes() for path in pruned]
    assert run_snakemake(tmp_path, forcerun=["prune"], targets=target)["prune"] == len(pruned)
    assert "worker: job ran in forked process" in log.read_text()
    assert [path.read_bytes() for path in pruned] == before
