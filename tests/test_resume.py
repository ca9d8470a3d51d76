"""A study killed mid-run (SIGKILL of the whole Snakemake process group while a finetune job is
running) resumes as the README says: the rerun is refused until ``snakemake --unlock``, then the
same command finishes the study, rewriting nothing that was complete, resuming the killed
fine-tuning from its last epoch checkpoint, and ending with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from smoke import ROOT, SMOKE, copy_upstream

pytestmark = pytest.mark.workflow

# One run of the smoke grid, fine-tuned for three epochs so that it can be killed between two.
STUDY = {
    "methods": ["isomorphic"],
    "seeds": [0],
    "paper": {"reference_method": "isomorphic"},
    "finetune": {"epochs": 3},
}
RUN = "results/digits/vit/isomorphic/r0.3/s0"
# What changes between two identical runs by nature: wall-clock measurements.
TIMINGS = ("seconds", "latency_ms", "throughput")


def command(workdir: Path, *extra: str) -> list[str]:
    study = workdir / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1"]
    return [*cmd, "--configfile", str(SMOKE), str(study), *extra]


def run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(workdir, *extra), cwd=workdir, capture_output=True, text=True, timeout=900
    )


def kill_during_finetune(workdir: Path) -> None:
    """Start the study and SIGKILL its process group once the finetune job has checkpointed its
    first epoch (the job is then still running: it has two epochs to go)."""
    checkpoint = workdir / RUN / "finetuned.ckpt" / "last.pt"
    proc = subprocess.Popen(
        command(workdir),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the jobs with it
    )
    deadline = time.monotonic() + 900
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the study ended before its finetune job checkpointed"
            assert time.monotonic() < deadline, "no finetune checkpoint within 15 minutes"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def files(workdir: Path) -> dict[str, float]:
    """Every file under results/ (not the logs, which each run rewrites) and its mtime."""
    results = workdir / "results"
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for p in results.rglob("*")
        if p.is_file() and "logs" not in p.parts
    }


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS and k != "planning"}


def test_a_killed_study_resumes_after_unlock(
    smoke_run: tuple[Path, Counter], tmp_path: Path
) -> None:
    """Both studies start from the smoke run's base model: the kill is about fine-tuning."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for workdir in (killed, clean):
        workdir.mkdir()
        copy_upstream(smoke_run[0], workdir)
    kill_during_finetune(killed)
    before = files(killed)
    assert f"{RUN}/pruned.safetensors" in before and f"{RUN}/metrics.json" not in before

    refused = run(killed)
    assert refused.returncode != 0 and "--unlock" in refused.stderr
    assert files(killed) == before, "a refused rerun touched the results"
    assert run(killed, "--unlock").returncode == 0

    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = files(killed)
    for path, mtime in before.items():
        if "finetuned.ckpt" in path:
            continue  # the checkpoint is the killed job's scratch: removed once it finishes
        assert after[path] == mtime, f"{path} was rewritten"
    log = (killed / "results/logs/digits/vit/isomorphic/r0.3/s0/finetune.log").read_text()
    assert "resumed from epoch 1" in log
    assert not (killed / RUN / "finetuned.ckpt").exists()

    uninterrupted = run(clean)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    for name in ("metrics.json", "finetune_report.json"):
        a = json.loads((killed / RUN / name).read_text())
        b = json.loads((clean / RUN / name).read_text())
        if name == "finetune_report.json":
            assert a.pop("resumed_from_epoch") == 1 and b.pop("resumed_from_epoch") is None
        assert untimed(a) == untimed(b), name
    assert (killed / RUN / "finetuned.safetensors").read_bytes() == (
        clean / RUN / "finetuned.safetensors"
    ).read_bytes()
