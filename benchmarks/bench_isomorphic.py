"""The isomorphic baseline against Isomorphic-Pruning's published rows: MACs and params of every
``paper.references`` row of config/paper.yaml, in both modes, on random-init timm models at 224 px.

Usage:
    python benchmarks/bench_isomorphic.py [--models deit_tiny deit_small ...]
        [--modes as_published macs_targeted] [--seeds 0] [--calibration-batches 1]
        [--batch-size 4]

Each row goes through the method's own plan and prune (``agentprune.pruning.methods.Isomorphic``
with the ``method_settings.isomorphic.published`` rows of config/paper.yaml), as the workflow and
``agentprune prune --method isomorphic --target-gmacs G`` do. ``as_published`` prunes once at the
script's ratios; ``macs_targeted`` searches the knob that scales them into +/-0.5 % of the
published GMACs. The Taylor scores come from seeded synthetic batches (``--seeds`` gives several
calibration draws: rows whose structure depends on the importance values move with them). It
prints one table line per (row, mode, seed) with the published and our MACs and params, and the
seconds spent creating the model (``setup``) and calibrating + pruning (``prune``); it asserts
nothing. One thread, as on the shared CI machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from agentprune import data, models
from agentprune.pruning import methods

PAPER = Path(__file__).resolve().parents[1] / "config" / "paper.yaml"
IMG_SIZE = 224
NUM_CLASSES = 1000
MODES = ("as_published", "macs_targeted")
HEADER = (
    "| row | mode | seed | published GMACs | ours GMACs | Δ MACs | published M params "
    "| ours M params | Δ params | in ±0.5 % | trials | top-up | setup s | prune s |"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="paper model names (default: all)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="calibration draws")
    parser.add_argument("--calibration-batches", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    return parser.parse_args()


def calibration(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded synthetic ImageNet-sized batches."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=gen),
            torch.randint(0, NUM_CLASSES, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


def prune_row(
    base: torch.nn.Module,
    entry: dict[str, Any],
    gmacs: float,
    mode: str,
    settings: dict[str, Any],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """Plan and prune one published row with the isomorphic method; the prune report."""
    strategy = methods.get("isomorphic")
    prune_cfg = {
        "tolerance": 0.005,
        "gmacs_tolerance": 0.005,
        "max_search_steps": 30,
        "calibration_batches": args.calibration_batches,
    }
    context = {
        "dataset": "synthetic",
        "model": entry["name"],
        "seed": seed,
        "target_gmacs": gmacs,
        "config": {"prune": prune_cfg, "models": [entry]},
    }
    plan = strategy.plan(0.5, {}, {**settings, "mode": mode}, context)
    batches = calibration(args.calibration_batches, args.batch_size, seed)
    example = data.example_inputs(IMG_SIZE)
    _, report = strategy.prune(base, plan, example, batches, seed, prune_cfg)
    return report


def line(ref: dict[str, Any], mode: str, seed: int, report: dict[str, Any], setup: float) -> str:
    macs, params = report["macs"] / 1e9, report["params"] / 1e6
    d_macs = 100 * (macs / ref["macs_g"] - 1)
    d_params = 100 * (params / ref["params_m"] - 1)
    inside = "yes" if abs(d_macs) <= 0.5 else "no"
    topup = "yes" if report["search"]["topup"] else "no"
    return (
        f"| {ref['label']} | {mode} | {seed} | {ref['macs_g']:.2f} | {macs:.3f} | {d_macs:+.2f} % "
        f"| {ref['params_m']:.2f} | {params:.2f} | {d_params:+.2f} % | {inside} "
        f"| {len(report['trials'])} | {topup} | {setup:.0f} | {report['seconds']:.0f} |"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    paper = yaml.safe_load(PAPER.read_text(encoding="utf-8"))
    settings = paper["method_settings"]["isomorphic"]
    entries = {m["name"]: m for m in paper["models"]}
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    for ref in paper["paper"]["references"]:
        if args.models and ref["model"] not in args.models:
            continue
        entry = entries[ref["model"]]
        start = time.perf_counter()
        torch.manual_seed(0)
        base = models.create(entry["timm"], NUM_CLASSES, {})
        setup = time.perf_counter() - start
        for mode in args.modes:
            for seed in args.seeds:
                report = prune_row(base, entry, ref["macs_g"], mode, settings, args, seed)
                print(line(ref, mode, seed, report, setup), flush=True)


if __name__ == "__main__":
    main()
