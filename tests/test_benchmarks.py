"""Benchmark files -> benchmarks.csv -> the time and memory figure; the per-run HTML card."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from agentprune import benchmarks, paper, run_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_tsv(root: Path, method: str, ratio: str, seed: int, step: str, s: float, rss: float):
    path = root / "digits" / "vit" / method / f"r{ratio}" / f"s{seed}" / f"{step}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:01\t{rss}\t900\t100\t110\t0\t1\t80\t{s * 0.9}\n")
    return path


@pytest.fixture
def tsvs(tmp_path: Path) -> list[Path]:
    paths = []
    for method in ("isomorphic", "multi_agent"):
        for seed in (0, 1):
            for i, step in enumerate(reversed(benchmarks.STEPS)):
                paths.append(
                    write_tsv(tmp_path, method, "0.3", seed, step, 1.0 + i + seed, 500 + 10 * i)
                )
    return paths


def test_collect_parses_identity_and_values_in_step_order(tsvs: list[Path]) -> None:
    frame = benchmarks.collect(tsvs)
    assert list(frame.columns) == benchmarks.COLUMNS
    assert len(frame) == 16
    first = frame[(frame.method == "isomorphic") & (frame.seed == 0)]
    assert list(first.step) == list(benchmarks.STEPS)
    row = first[first.step == "evaluate"].iloc[0]
    # evaluate was written first (i = 0): 1.0 s, 500 MB, 0.9 CPU s
    assert (row.seconds, row.max_rss_mb, row.cpu_seconds) == (1.0, 500.0, 0.9)
    assert row.ratio == 0.3 and row.dataset == "digits" and row.model == "vit"


def test_repeated_benchmark_rows_are_averaged(tmp_path: Path) -> None:
    path = write_tsv(tmp_path, "random", "0.5", 2, "prune", 2.0, 100)
    path.write_text(path.read_text() + "4.0\t0:00:04\t300\t0\t0\t0\t0\t0\t0\t1.0\n")
    record = benchmarks.read_benchmark(path)
    assert record["seconds"] == 3.0 and record["max_rss_mb"] == 200.0
    assert record["ratio"] == 0.5 and record["seed"] == 2


def test_a_batched_job_counts_its_runs_and_each_run_gets_its_share(tmp_path: Path) -> None:
    """A batch_seeds job's file sits under s0+1+2: no single seed, three runs; run_seconds gives
    each of its seeds a third, and a per-run file its own seconds."""
    path = write_tsv(tmp_path, "isomorphic", "0.5", 0, "prune", 6.0, 100)
    batched = path.parents[1] / "s0+1+2" / "prune.tsv"
    batched.parent.mkdir()
    path.rename(batched)
    record = benchmarks.read_benchmark(batched)
    assert record["runs"] == 3 and record["seed"] is None and record["seconds"] == 6.0
    cell = batched.parents[1]
    assert [benchmarks.run_seconds(cell, seed, "prune") for seed in (0, 1, 2, 3)] == [
        2.0,
        2.0,
        2.0,
        None,
    ]
    own = write_tsv(tmp_path, "random", "0.5", 4, "prune", 5.0, 100)
    assert benchmarks.read_benchmark(own)["runs"] == 1
    assert benchmarks.run_seconds(own.parents[1], 4, "prune") == 5.0


def test_a_job_the_worker_ran_takes_cpu_and_memory_from_its_log(tmp_path: Path) -> None:
    """The benchmark file measured the waiting client (3.6 CPU s, 60 MB here); the job's log ends
    with the forked child's figures, which the record adds (CPU) and takes (peak memory)."""
    tsv = write_tsv(tmp_path, "isomorphic", "0.3", 0, "prune", 4.0, 60)
    log = tmp_path / "prune.log"
    log.write_text(
        "pruning...\rdone\nworker: job ran in forked process 42: 4.0 s wall, 2.5 s user, "
        "0.5 s system, max RSS 1000 MiB, exit status 0\n"
    )
    plain_log = tmp_path / "plain.log"
    plain_log.write_text("pruning... done\n")
    frame = benchmarks.collect([tsv, tsv, tsv], [log, plain_log, tmp_path / "absent.log"])
    assert list(frame.cpu_seconds) == pytest.approx([3.6 + 3.0, 3.6, 3.6])
    assert list(frame.max_rss_mb) == pytest.approx([1000.0, 60.0, 60.0])
    assert list(frame.seconds) == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="3 benchmark files but 1 job logs"):
        benchmarks.collect([tsv, tsv, tsv], [log])


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("digits/vit/isomorphic/0.3/s0/prune.tsv", "is not .../dataset"),
        ("digits/vit/isomorphic/r0.3/s0/download.tsv", "step 'download'"),
        ("digits/vit/isomorphic/r0.3/s0+x/prune.tsv", "is not .../dataset"),
    ],
)
def test_bad_paths_are_named(tmp_path: Path, relative: str, message: str) -> None:
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_text(HEADER + "1\t0\t1\t1\t1\t1\t1\t1\t1\t1\n")
    with pytest.raises(ValueError, match=message):
        benchmarks.read_benchmark(path)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_tsv(tmp_path, "random", "0.5", 0, "plan", 1.0, 1)
    path.write_text("s\tmax_rss\n1.0\t2.0\n")
    with pytest.raises(ValueError, match="cpu_time"):
        benchmarks.read_benchmark(path)


def test_time_memory_figure_renders_and_placeholder(tsvs: list[Path], tmp_path: Path) -> None:
    csv = benchmarks.write_benchmarks(tsvs, tmp_path / "stats" / "benchmarks.csv")
    figure = paper.plot_time_memory_per_step(pd.read_csv(csv), tmp_path / "tm.png")
    data = figure.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    empty = paper.plot_time_memory_per_step(pd.DataFrame(), tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG_MAGIC)


METRICS = {
    "dataset": "digits",
    "model": "vit",
    "method": "multi_agent",
    "family": "structured",
    "ratio": 0.3,
    "seed": 1,
    "target": 0.3,
    "achieved": 0.3012,
    "macs_base": 1953994,
    "macs": 1364922,
    "params_base": 592834,
    "params": 407352,
    "sparsity": 0.0,
    "sparsity_overall": 0.0,
    "top1": 98.8889,
    "top5": 100.0,
    "loss": 0.139,
    "top1_pruned": 97.7778,
    "top5_pruned": 100.0,
    "loss_pruned": 0.2147,
    "top1_base": 97.5,
    "top5_base": 100.0,
    "loss_base": 0.145,
    "latency_ms": 1.064,
    "throughput": 12309.7,
    "seconds": {"plan": 35.48, "prune": 1.62, "finetune": 2.43, "evaluate": 1.99},
    "planning": {"backend": "llamacpp", "llm_calls": 4, "trials": 3, "fallbacks": 1},
}


def test_run_card_shows_the_metrics_and_escapes(tmp_path: Path) -> None:
    plan = {"pruner": {"importance": "<script>taylor</script>", "round_to": 8}}
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = run_card.write_run_card(
        tmp_path / "metrics.json", tmp_path / "plan.json", tmp_path / "run.html"
    )
    html = out.read_text()
    expected = ("1,953,994", "1,364,922", "98.89", "97.78", "97.50", "0.3012", "35.48")
    for text in (*expected, "llamacpp"):
        assert text in html, text
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "multi_agent (structured): digits / vit, ratio 0.3, seed 1" in html
