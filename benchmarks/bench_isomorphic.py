"""The isomorphic baseline against Isomorphic-Pruning's published rows: MACs and params of every
``paper.references`` row of config/paper.yaml, in both modes, on random-init timm models at 224 px.

Usage:
    python benchmarks/bench_isomorphic.py [--models deit_tiny deit_small ...]
        [--modes as_published macs_targeted] [--seeds 0] [--calibration-batches 1]
        [--batch-size 4]

Each row goes the workflow's road: config/paper.yaml loaded over config/config.yaml (on the
synthetic data set, so no ImageNet is needed), ``resolve.plan_step`` for the row's model and
``{ratio}`` (which recovers its GMACs target and the ``method_settings.isomorphic.published``
rows), ``steps.plan``, then the method's own prune, as ``agentprune prune --method isomorphic
--target-gmacs G`` does. ``as_published`` prunes once at the
script's ratios; ``macs_targeted`` searches the knob that scales them into +/-0.5 % of the
published GMACs. The Taylor scores come from seeded synthetic batches (``--seeds`` gives several
calibration draws: rows whose structure depends on the importance values move with them). It
prints one table line per (row, mode, seed) with the published and our MACs and params, and the
seconds spent creating the model (``setup``) and calibrating + pruning (``prune``); it asserts
nothing. One thread, as on the shared CI machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from agentprune import data, models, resolve, steps
from agentprune.pruning import catalog
from agentprune.settings import fmt_ratio, target_ratio

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "config.yaml"
PAPER = ROOT / "config" / "paper.yaml"
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


def study_config(mode: str, calibration_batches: int) -> dict[str, Any]:
    """config/paper.yaml over config/config.yaml, prepared, on the synthetic data set (no
    ImageNet), with the isomorphic ``mode`` and ``prune.calibration_batches`` set."""
    overrides = {
        "dataset": {"name": "synthetic"},
        "prune": {"calibration_batches": calibration_batches},
        "method_settings": {"isomorphic": {"mode": mode}},
    }
    return resolve.load_config(CONFIG, PAPER, overrides=overrides)


def plan_row(config: dict[str, Any], ref: dict[str, Any], seed: int) -> dict[str, Any]:
    """The plan step of one published row, as the workflow runs it: the ``{ratio}`` wildcard of
    the row's GMACs target -> ``resolve.plan_step`` -> ``steps.plan``; the plan."""
    entry = resolve.model_entry(config, ref["model"])
    ratio = float(fmt_ratio(target_ratio(ref["macs_g"], entry["base_gmacs"])))
    step = resolve.plan_step(config, "isomorphic", ref["model"], ratio)
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "profile.json"
        profile.write_text("{}")  # the fixed recipes read no profile
        return steps.plan(step, seed, profile, Path(tmp) / "plan.json")


def prune_row(
    base: torch.nn.Module, plan: dict[str, Any], args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Prune one planned row with the isomorphic method; the prune report."""
    batches = calibration(args.calibration_batches, args.batch_size, seed)
    example = data.example_inputs(IMG_SIZE)
    _, report = catalog.get("isomorphic").prune(base, plan, example, batches, seed)
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
    configs = {mode: study_config(mode, args.calibration_batches) for mode in args.modes}
    any_config = next(iter(configs.values()))
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    for ref in any_config["paper"]["references"]:
        if args.models and ref["model"] not in args.models:
            continue
        entry = resolve.model_entry(any_config, ref["model"])
        start = time.perf_counter()
        torch.manual_seed(0)
        base = models.create(entry["timm"], NUM_CLASSES, {})
        setup = time.perf_counter() - start
        for mode, config in configs.items():
            for seed in args.seeds:
                plan = plan_row(config, ref, seed)
                report = prune_row(base, plan, args, seed)
                print(line(ref, mode, seed, report, setup), flush=True)


if __name__ == "__main__":
    main()
