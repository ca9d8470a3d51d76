"""The lm family on the real SmolLM2-135M: perplexity, pruning seconds and peak memory per method.

Usage:
    python benchmarks/bench_lm.py [--workdir /tmp/bench_lm] [--threads 1 2]
        [--methods magnitude wanda sparsegpt icbs] [--sparsities 0.5 0.6 2:4]
        [--seq-len 512] [--calibration 8] [--evaluation 8] [--seed 0] [--batch-size 4]
        [--icbs-row-fraction 0.5] [--icbs-block-size 64] [--sparsegpt-selection row]
        [--two-pass] [--skip-prepare]

Steps (every run is its own child process, like a Snakemake job, so its wall time includes the
process start-up and the imports, and its peak RSS is its own):

1. ``prepare`` (once): load the bundled GGUF (dequantized from Q4_1), save the base artifact,
   tokenize the pydoc text into windows and save them; times each part and the artifact's size.
2. ``dense`` and one run per method x sparsity, for each thread count: load the base artifact,
   prune, measure perplexity on the evaluation windows, save the pruned artifact (then delete it).

With CUDA (not on the shared CPU machine), the 2:4 runs also time a forward pass dense vs. with
``torch.sparse.to_sparse_semi_structured`` weights in float16.

Prints figures and writes ``<workdir>/bench_lm.json``; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ICBS_DEFAULTS = {
    "blocks_per_row": 1,
    "restarts": 1,
    "beta_initial": 1e-3,
    "beta_final": 100.0,
    "beta_factor": 1.3,
    "sweeps": 1,
    "group_penalty": 2.0,
}


def _threads(count: int) -> None:
    """One knob for torch and numba (set before the heavy imports in a child)."""
    os.environ["OMP_NUM_THREADS"] = str(count)
    os.environ["NUMBA_NUM_THREADS"] = str(count)
    import torch

    torch.set_num_threads(count)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Load the GGUF once, save the base artifact and the token windows."""
    _threads(1)
    from agentprune.lm import models, text
    from agentprune.lm.settings import ModelSource, TextSettings

    source = ModelSource(name="bundled", gguf_file=None, dtype="float32")
    start, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = models.load_pretrained(source)
    gguf_seconds = time.perf_counter() - start
    gguf_cpu_seconds = time.process_time() - cpu
    work = Path(args.workdir)
    start = time.perf_counter()
    models.save(model, work / "base", source)
    save_seconds = time.perf_counter() - start
    settings = TextSettings(
        corpus="pydoc",
        root=None,
        seq_len=args.seq_len,
        calibration_sequences=args.calibration,
        evaluation_sequences=args.evaluation,
        seed=args.seed,
    )
    start = time.perf_counter()
    windows = text.build_windows(tokenizer, settings)
    text.save_windows(windows, work / "windows.safetensors")
    return {
        "gguf_load_seconds": gguf_seconds,
        "gguf_load_cpu_seconds": gguf_cpu_seconds,
        "save_seconds": save_seconds,
        "windows_seconds": time.perf_counter() - start,
        "artifact_bytes": models.artifact_bytes(work / "base"),
        "params": sum(p.numel() for p in model.parameters()),
        "windows": windows.meta,
    }


def _prune(model: Any, method: str, ratio: str, windows: Any, args: argparse.Namespace) -> dict:
    from agentprune.lm import pruning
    from agentprune.lm.settings import (
        EngineSettings,
        LayerICBSSettings,
        SparseGPTSettings,
        Sparsity,
    )

    sparsity = Sparsity.parse(ratio)
    engine = EngineSettings(sequential=not args.two_pass, batch_size=args.batch_size, device="cpu")
    calibration = windows.calibration
    if method == "magnitude":
        return pruning.prune_magnitude(model, sparsity)
    if method == "wanda":
        return pruning.prune_wanda(model, calibration, sparsity, engine)
    if method == "sparsegpt":
        settings = SparseGPTSettings(
            dampening=0.01, block_size=128, selection=args.sparsegpt_selection
        )
        return pruning.prune_sparsegpt(model, calibration, sparsity, settings, engine)
    icbs = LayerICBSSettings(
        block_size=args.icbs_block_size, row_fraction=args.icbs_row_fraction, **ICBS_DEFAULTS
    )
    return pruning.prune_icbs(model, calibration, sparsity, icbs, engine, seed=args.seed)


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """A child: load, prune (unless dense), evaluate, save; everything timed."""
    _threads(args.run_threads)
    import torch
    from agentprune.lm import evaluate, models, text
    from agentprune.lm.settings import ModelSource

    work = Path(args.workdir)
    record: dict[str, Any] = {"method": args.run_method, "ratio": args.run_ratio}
    # CPU seconds (all threads) do not depend on how loaded the shared machine is; wall seconds do.
    cpu = time.process_time()
    model, _, record["load_seconds"] = models.timed_load(work / "base")
    windows = text.load_windows(work / "windows.safetensors")
    record["load_cpu_seconds"] = time.process_time() - cpu
    if args.run_method != "dense":
        cpu = time.process_time()
        report = _prune(model, args.run_method, args.run_ratio, windows, args)
        record["prune_cpu_seconds"] = time.process_time() - cpu
        record["prune_seconds"] = report["seconds"]
        record["achieved"] = report["achieved"]
        record["icbs"] = report.get("icbs")
    record["prune_peak_rss_mb"] = evaluate.peak_rss_bytes() / 2**20
    cpu = time.process_time()
    ppl = evaluate.perplexity(model, windows.evaluation, batch_size=1)
    record["eval_cpu_seconds"] = time.process_time() - cpu
    record["perplexity"] = ppl.perplexity
    record["eval_seconds"] = ppl.seconds
    record["eval_tokens"] = ppl.tokens
    stem = work / f"pruned_{args.run_method}_{args.run_ratio.replace(':', 'of')}"
    start = time.perf_counter()
    source = ModelSource(name="bundled", gguf_file=None, dtype="float32")
    models.save(model, stem, source)
    record["save_seconds"] = time.perf_counter() - start
    record["artifact_bytes"] = models.artifact_bytes(stem)
    for path in (stem.with_suffix(".safetensors"), stem.with_suffix(".json")):
        path.unlink()
    if args.run_ratio == "2:4" and torch.cuda.is_available():
        half = model.to(torch.float16)
        record["semi_structured"] = evaluate.semi_structured_speed(half, windows.evaluation[:4])
    record["peak_rss_mb"] = evaluate.peak_rss_bytes() / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the whole child, imports included
    return record


def _child(args: argparse.Namespace, method: str, ratio: str, threads: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--workdir",
        args.workdir,
        "--run",
        method,
        ratio,
        str(threads),
        *_shared_flags(args),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"method": method, "ratio": ratio, "threads": threads, "error": tail[0]}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {**record, "threads": threads, "process_seconds": wall}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--icbs-row-fraction",
        str(args.icbs_row_fraction),
        "--icbs-block-size",
        str(args.icbs_block_size),
        "--sparsegpt-selection",
        args.sparsegpt_selection,
        *(["--two-pass"] if args.two_pass else []),
    ]


def _print_table(records: list[dict[str, Any]]) -> None:
    head = (
        f"{'thr':>3} {'method':<10} {'ratio':<5} {'ppl':>9} {'prune s':>8} {'eval s':>7} "
        f"{'process s':>9} {'cpu s':>6} {'peak MB':>8} {'load':>5}"
    )
    print(head)
    for r in records:
        if "error" in r:
            print(f"{r['threads']:>3} {r['method']:<10} {r['ratio']:<5} ERROR {r['error']}")
            continue
        print(
            f"{r['threads']:>3} {r['method']:<10} {r['ratio']:<5} {r['perplexity']:>9.3f} "
            f"{r.get('prune_seconds', 0.0):>8.1f} {r['eval_seconds']:>7.1f} "
            f"{r['process_seconds']:>9.1f} {r['cpu_seconds']:>6.1f} {r['peak_rss_mb']:>8.0f} "
            f"{r.get('load_average', [0.0])[0]:>5.1f}"
        )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_lm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "icbs"])
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.6", "2:4"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--evaluation", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--icbs-row-fraction", type=float, default=0.5)
    parser.add_argument("--icbs-block-size", type=int, default=64)
    parser.add_argument("--sparsegpt-selection", default="row")
    parser.add_argument("--two-pass", action="store_true", help="the engine's two-pass mode")
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--run", nargs=3, metavar=("METHOD", "RATIO", "THREADS"))
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.run:
        args.run_method, args.run_ratio, threads = args.run
        args.run_threads = int(threads)
        print(json.dumps(one_run(args)))
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(args)}
    if not args.skip_prepare:
        results["prepare"] = prepare(args)
        print(json.dumps(results["prepare"], indent=1))
    records: list[dict[str, Any]] = []
    results["runs"] = records
    runs = [("dense", "0")] + [(m, r) for m in args.methods for r in args.sparsities]
    for threads in args.threads:
        for method, ratio in runs:
            records.append({**_child(args, method, ratio, threads), "load_average": _load()})
            _print_table(records[-1:])
            # Written after every run, so a stopped sweep keeps what it measured.
            (Path(args.workdir) / "bench_lm.json").write_text(json.dumps(results, indent=1))
    print()
    _print_table(records)


def _load() -> list[float]:
    """The machine's 1/5/15-minute load averages (the timings depend on them)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return []


if __name__ == "__main__":
    main()
