"""The smoke grid (one seed) through profiles/slurm, on a real single-node Slurm the test starts.

One seed: every rule, method and resource request of the grid is there once; a second seed would
repeat each Slurm job (and the paired statistics are the local workflow tests' business).

Needs root on Debian (slurm-wlm and munge are installed with apt when missing); anywhere else the
tests are skipped with the reason. The node has partitions ``main`` (the default, which no job
should land in), ``debug`` (the CPU rules') and ``gpu`` (the GPU rules'), the machine's real CPUs
and two stand-in GPUs, so the run checks what the profile asks of Slurm without needing a GPU:
which partition each rule lands in, which jobs request a GPU, and that every job the workflow does
not keep local completes through Slurm.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from slurm_cluster import SlurmCluster, SlurmJob, SlurmStartError
from smoke import ROOT, SMOKE
from system_packages import ensure_debian_packages

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

PROFILE = ROOT / "profiles" / "slurm"
# Command -> Debian package (slurm-wlm is only the meta package over these).
PACKAGES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "munged": "munge",
}
# A default partition that the profile must never fall back to: the partitions come from the
# environment variables, so landing in the default would mean they were ignored.
DEFAULT_PARTITION = "main"
CPU_PARTITION = "debug"
GPU_PARTITION = "gpu"
# The rules the study needs a cluster for; the smoke grid runs each of them at least once.
HEAVY_RULES = {"profile", "plan", "plan_trials", "prune", "finetune", "evaluate"}
# 22.05 records `sbatch --gpus=1` as gres:gpu:1; later releases as gres/gpu:1.
ONE_GPU = {"gres:gpu:1", "gres/gpu:1"}
# The one seed of the smoke grid that runs through Slurm.
SEED = 0
# About 3 minutes on an idle 2-core machine; shared CI runners can be several times slower.
RUN_TIMEOUT_S = 25 * 60


@dataclass
class SlurmRun:
    """The outcome of the smoke grid's run through Slurm, collected before the cluster stops."""

    workdir: Path
    returncode: int
    wall_s: float
    expected: Counter[str]
    local_rules: set[str]
    cluster_rules: set[str]
    jobs: list[SlurmJob]
    diagnostics: str


def load_profile() -> dict[str, Any]:
    """The SLURM profile's settings."""
    return yaml.safe_load((PROFILE / "config.v8+.yaml").read_text())


def gpu_rules(profile: dict[str, Any]) -> set[str]:
    """Rules the profile gives a GPU."""
    return {rule for rule, res in profile.get("set-resources", {}).items() if res.get("gpu")}


def snakemake_command(workdir: Path, profile: dict[str, Any], *extra: str) -> list[str]:
    """The smoke grid's command line through the SLURM profile, as a user types it: the profile's
    own threads and resources, which follow the size of each job's model files."""
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--profile", str(PROFILE),
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        *extra,
        # Last: --configfile takes any number of values, so targets after it would be swallowed.
        "--configfile", str(SMOKE), str(one_seed(workdir)),
    ]  # fmt: skip


def one_seed(workdir: Path) -> Path:
    """A study file over the smoke grid that keeps one of its seeds."""
    path = workdir / "one_seed.yaml"
    path.write_text(yaml.safe_dump({"seeds": [SEED]}))
    return path


def job_stats(output: str) -> Counter[str]:
    """Jobs per rule from the "Job stats" table that Snakemake prints before running."""
    match = re.search(r"^Job stats:\n.*?\n-[- ]+\n(.*?)^total\s+(\d+)", output, re.M | re.S)
    if match is None:
        raise AssertionError(f"no Job stats table in:\n{output[-3000:]}")
    counts = Counter({name: int(n) for name, n in re.findall(r"^(\S+)\s+(\d+)$", match[1], re.M)})
    assert sum(counts.values()) == int(match[2]), match[0]
    return counts


def announced_rules(output: str) -> tuple[set[str], set[str]]:
    """(local, cluster) rules, from how Snakemake announced each job it started.

    Under a cluster executor Snakemake prints ``localrule X:`` for a job it runs on the submitting
    host (the workflow's ``localrules`` and the like) and ``rule X:`` for one it submits.
    """
    local = set(re.findall(r"^localrule (\S+):$", output, re.M))
    cluster = set(re.findall(r"^rule (\S+):$", output, re.M))
    return local, cluster


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; return its exit status and wall time in seconds.

    The command gets its own process group so that a timeout or an interrupted test can stop it
    with everything it started; SIGTERM first, on which Snakemake cancels its Slurm jobs.
    """
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            out.write(f"\n[test] killed after {timeout:.0f} s\n")
            returncode = -1
        except BaseException:
            _stop_group(proc)
            raise
    return returncode, time.monotonic() - start


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL if it is still there a minute later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def diagnostics(output: str, workdir: Path, cluster: SlurmCluster, jobs: list[SlurmJob]) -> str:
    """What a failure message shows: Snakemake's last lines, the jobs, the kept Slurm logs."""
    parts = ["=== snakemake (last 60 lines)", *output.splitlines()[-60:]]
    parts += ["=== slurm jobs"]
    parts += [
        f"{j.job_id} {j.partition} {j.state} {j.tres_per_job or '-'} {j.comment}" for j in jobs
    ]
    # The plugin deletes the logs of successful jobs, so what is left belongs to failed ones.
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    for path in logs[:5]:
        parts += [f"=== {path.relative_to(workdir)}", *path.read_text().splitlines()[-30:]]
    parts += ["=== daemons", cluster.log_tails()]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory: pytest.TempPathFactory) -> SlurmRun:
    """The smoke grid run once through Slurm; the cluster is gone when the tests look at it."""
    reason = ensure_debian_packages(PACKAGES)
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    profile = load_profile()
    workdir = tmp_path_factory.mktemp("slurm_workdir")
    cluster = SlurmCluster(
        tmp_path_factory.mktemp("slurm"),
        partitions=(DEFAULT_PARTITION, CPU_PARTITION, GPU_PARTITION),
        gpus=2,  # two GPU jobs side by side, one per CPU
        memory_mb=None,  # the machine's real memory, from slurmd -C
    )
    env = cluster.env()  # also drops SLURM_ACCOUNT: the test cluster has no accounts
    env |= {"AGENTPRUNE_CPU_PARTITION": CPU_PARTITION, "AGENTPRUNE_GPU_PARTITION": GPU_PARTITION}
    dry = subprocess.run(
        snakemake_command(workdir, profile, "--dry-run"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    dry_output = dry.stdout + dry.stderr
    assert dry.returncode == 0, dry_output[-3000:]
    expected = job_stats(dry_output)

    try:
        cluster.start()
    except SlurmStartError as err:
        pytest.skip(f"Slurm did not start: {err}")
    log = workdir / "snakemake.log"
    try:
        returncode, wall_s = run_logged(
            snakemake_command(workdir, profile), env, log, RUN_TIMEOUT_S
        )
        jobs = cluster.jobs()
    finally:
        cluster.stop()
    output = log.read_text()
    print(f"\nsmoke grid through Slurm: {wall_s:.0f} s, {len(jobs)} Slurm jobs")
    local_rules, cluster_rules = announced_rules(output)
    return SlurmRun(
        workdir=workdir,
        returncode=returncode,
        wall_s=wall_s,
        expected=expected,
        local_rules=local_rules,
        cluster_rules=cluster_rules,
        jobs=jobs,
        diagnostics=diagnostics(output, workdir, cluster, jobs),
    )


def test_smoke_grid_succeeds_through_slurm(
    slurm_run: SlurmRun, record_property: pytest.RecordProperty
) -> None:
    record_property("slurm_wall_s", round(slurm_run.wall_s, 1))
    assert slurm_run.returncode == 0, slurm_run.diagnostics
    results = slurm_run.workdir / "results"
    assert (results / "report.html").is_file(), slurm_run.diagnostics
    assert (results / "stats" / "runs.csv").is_file(), slurm_run.diagnostics


def test_every_cluster_job_completes_through_slurm(slurm_run: SlurmRun) -> None:
    run = slurm_run
    # Every rule of the DAG was started, each either on the host or through Slurm, never both.
    assert run.local_rules | run.cluster_rules == set(run.expected), run.diagnostics
    assert not run.local_rules & run.cluster_rules, run.diagnostics
    assert run.cluster_rules >= HEAVY_RULES, run.diagnostics
    expected = Counter({r: n for r, n in run.expected.items() if r not in run.local_rules})
    # One Slurm job per cluster job: a retried or duplicated job would show up here.
    assert Counter(job.rule for job in run.jobs) == expected, run.diagnostics
    unfinished = [job for job in run.jobs if job.state != "COMPLETED" or job.exit_code != 0]
    assert not unfinished, run.diagnostics


def test_gpu_rules_run_in_the_gpu_partition_with_one_gpu(slurm_run: SlurmRun) -> None:
    rules = gpu_rules(load_profile())
    jobs = [job for job in slurm_run.jobs if job.rule in rules]
    assert {job.rule for job in jobs} == rules, slurm_run.diagnostics
    wrong = [
        job for job in jobs if job.partition != GPU_PARTITION or job.tres_per_job not in ONE_GPU
    ]
    assert not wrong, slurm_run.diagnostics


def test_requests_fit_a_small_node(slurm_run: SlurmRun) -> None:
    """The smoke grid's jobs ask for what they use: one CPU and a few GB each, so that a 2-CPU
    node with its real memory runs them (the paper grid's models get 8 CPUs and 32-64 GB: see
    tests/test_profiles.py)."""
    jobs = slurm_run.jobs
    assert jobs and all(job.tres_req for job in jobs), slurm_run.diagnostics
    too_big = [job for job in jobs if job.cpus > 1 or job.mem_mb > 4000]
    assert not too_big, [(job.rule, job.tres_req) for job in too_big]


def test_cpu_rules_run_in_the_cpu_partition_without_a_gpu(slurm_run: SlurmRun) -> None:
    rules = gpu_rules(load_profile())
    jobs = [job for job in slurm_run.jobs if job.rule not in rules]
    assert {"profile", "plan"} <= {job.rule for job in jobs}, slurm_run.diagnostics
    wrong = [
        job
        for job in jobs
        if job.partition != CPU_PARTITION or "gpu" in job.tres_per_job + job.tres_per_node
    ]
    assert not wrong, slurm_run.diagnostics
