"""iCBS on the embedded default's two trained base models: old settings and code against new.

Usage:
    python benchmarks/bench_icbs.py [--workdir /tmp/agentprune-bench-icbs] [--models vit convnext]
        [--sparsities 0.5 0.7 0.9] [--seeds 0] [--no-old-code] [--old-commit e9b3660]

Per model, sparsity and seed it prints, for every contender, the in-process prune seconds (one
torch thread; wall and CPU, as the machine may be shared), the calibration loss before (the
initial magnitude mask) and after, and the loss on the whole validation split:

* ``magnitude``, ``wanda``: the plain one-shot masks at the same sparsity, through the registry
  with the default's settings, for reference;
* ``old code``: iCBS as it was at ``--old-commit`` (``git archive`` of ``workflow/agentprune``
  into the work directory), with the default's settings of then, in a child process;
* ``old settings``: today's code with those same settings (schedule ``layers``, one batch and one
  block per step): the same masks as the old code, computed with one pass per step;
* ``new settings``: today's code with ``config/config.yaml``'s ``icbs`` section.

Calibration batches are built as the prune step builds them (``icbs.calibration_batches`` of
``prune.batch_size`` training images, drawn with the run's seed); the calibration loss of every
contender is measured on them. Before timing, each process runs the annealer once, so the
seconds exclude the numba kernels' one-off load (reported with the start-up figures).

Job level: the start-up of a prune job (interpreter and the prune step's imports, from
``python -X importtime`` in a fresh process) and the first annealer call in a fresh process, next
to the in-process prune seconds.

The base models are read from ``<workdir>/results/digits/<model>/base``; missing ones are trained
by Snakemake into the work directory (about a minute or two each). Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "e9b3660"  # the last commit before the taps, schedules and per-step batches
# The embedded default's icbs section at OLD_COMMIT (the rest are ICBSConfig defaults of then).
OLD_SETTINGS = {"block_size": 64, "hessian": "fisher", "steps": 16, "restarts": 4}
# The keys that did not exist at OLD_COMMIT, at the values that reproduce its behaviour.
OLD_BEHAVIOUR = {"schedule": "layers", "blocks_per_step": 1, "batches_per_step": 1}
PRUNE_IMPORTS = (
    "import agentprune.steps; from agentprune import data, models, train; "
    "from agentprune.pruning import methods; from agentprune.pruning.icbs import pruner"
)

# Runs in a child process whose PYTHONPATH puts the archived package first.
OLD_CHILD = r"""
import copy, hashlib, json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
import agentprune
assert agentprune.__file__.startswith(args["root"]), agentprune.__file__
from agentprune import data, models
from agentprune.pruning.icbs import pruner, solver
from agentprune.pruning.icbs.settings import ICBSConfig
solver.anneal(np.eye(8), 4, restarts=2)
base, desc = models.load(args["base"])
splits = data.load_splits(args["dataset"], data_config=models.data_config_of(desc))
xs, ys = zip(*(splits.val[i] for i in range(len(splits.val))))
cfg = ICBSConfig.from_dict(args["settings"])
for seed in args["seeds"]:
    batches = data.calibration_batches(splits.train, cfg.calibration_batches, args["batch"], seed)
    for sparsity in args["sparsities"]:
        model = copy.deepcopy(base).eval()
        wall, cpu = time.perf_counter(), time.process_time()
        report = pruner.icbs_prune(model, sparsity, batches, cfg, seed)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with torch.no_grad():
            val = float(torch.nn.functional.cross_entropy(model(torch.stack(xs)), torch.tensor(ys)))
        zeros = sorted((k, (v == 0).numpy().tobytes()) for k, v in model.state_dict().items())
        digest = hashlib.sha256(b"".join(b for _, b in zeros)).hexdigest()
        print(json.dumps({"seed": seed, "sparsity": sparsity, "wall": wall, "cpu": cpu,
                          "init": report["calibration_loss_init"],
                          "loss": report["calibration_loss"], "val": val, "mask": digest}),
              flush=True)
"""


def ensure_base_models(workdir: Path, names: list[str]) -> dict[str, Path]:
    """The base model stems, trained by Snakemake into ``workdir`` when missing."""
    results = workdir / "results"
    stems = {n: results / "digits" / n / "base" / "model" for n in names}
    missing = [str(s.with_suffix(".safetensors")) for s in stems.values()]
    missing = [m for m in missing if not Path(m).is_file()]
    if missing:
        print(f"training {len(missing)} base model(s) into {workdir} ...", flush=True)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
        cmd += ["--directory", str(workdir), "--cores", "1", "--config", f"results={results}"]
        subprocess.run([*cmd, "--", *missing], check=True, stdout=subprocess.DEVNULL)
    return stems


def old_package(workdir: Path, commit: str) -> Path | None:
    """``workflow/agentprune`` at ``commit``, extracted once under ``workdir`` (its numba cache
    then survives between runs); None when git or the commit is unavailable."""
    dest = workdir / f"old-{commit}"
    if (dest / "workflow" / "agentprune" / "__init__.py").is_file():
        return dest / "workflow"
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "workflow/agentprune"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"old code unavailable ({err}); skipping it")
        return None
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, **safe)
    return dest / "workflow"


def run_old_code(
    package: Path, stem: Path, dataset: dict, batch: int, seeds: list, sparsities: list
) -> dict[tuple[int, float], dict[str, float]]:
    """Old iCBS in a child process; ``(seed, sparsity) -> figures``."""
    args = {
        "root": str(package),
        "base": str(stem),
        "dataset": dataset,
        "batch": batch,
        "seeds": seeds,
        "sparsities": sparsities,
        "settings": OLD_SETTINGS,
    }
    env = {**os.environ, "PYTHONPATH": str(package)}
    done = subprocess.run(
        [sys.executable, "-c", OLD_CHILD, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        print(f"old code failed: {done.stderr.strip().splitlines()[-1:]}")
        return {}
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {(r["seed"], r["sparsity"]): r for r in rows}


def mask_digest(model: torch.nn.Module) -> str:
    """sha256 of every weight's zero pattern (equal digests: equal masks)."""
    zeros = sorted((k, (v == 0).numpy().tobytes()) for k, v in model.state_dict().items())
    return hashlib.sha256(b"".join(b for _, b in zeros)).hexdigest()


def validation_loss(model: torch.nn.Module, dataset: Any) -> float:
    """Mean cross-entropy over the whole split."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        logits = model.eval()(torch.stack(xs))
        return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(ys)))


def reference_masks(config: dict, base, splits, batches, sparsity: float, seed: int) -> dict:
    """Calibration and validation loss of the magnitude and Wanda masks: the registry's methods
    with the default's settings, on their own calibration batches as the prune step draws them."""
    from agentprune import data, resolve
    from agentprune.pruning import catalog
    from agentprune.pruning.icbs import pruner

    out = {}
    batch = resolve.prune_step(config).calibration_batch_size
    for name in ("magnitude", "wanda"):
        settings = resolve.method_settings(config, name)
        plan = {"method": name, "target": {"value": sparsity}, "pruner": settings}
        own = data.calibration_batches(splits.train, settings["calibration_batches"], batch, seed)
        inputs = data.example_inputs(splits.img_size)
        model, _ = catalog.get(name).prune(base, plan, inputs, own, seed)
        out[name] = {
            "loss": pruner.calibration_loss(model, batches),
            "val": validation_loss(model, splits.val),
        }
    return out


def old_default_settings(new_settings: dict) -> dict:
    """The default's iCBS settings at ``OLD_COMMIT`` as today's code takes them.

    ``ICBSConfig`` needs every key (in a study the schema fills them); the keys the old default
    did not set stay at today's values, and the old-code row checks that the masks agree.
    """
    return {**new_settings, **OLD_SETTINGS, **OLD_BEHAVIOUR}


def run_new_code(base, splits, batches, sparsity: float, seed: int, settings: dict) -> dict:
    """Today's iCBS in this process."""
    from agentprune.pruning.icbs import pruner
    from agentprune.pruning.icbs.settings import ICBSConfig

    model = copy.deepcopy(base).eval()
    wall, cpu = time.perf_counter(), time.process_time()
    report = pruner.icbs_prune(model, sparsity, batches, ICBSConfig.from_dict(settings), seed)
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "init": report["calibration_loss_init"],
        "loss": report["calibration_loss"],
        "val": validation_loss(model, splits.val),
        "mask": mask_digest(model),
    }


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup_figures() -> dict[str, float]:
    """Seconds of a fresh prune process: interpreter + imports, and the first annealer call."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PRUNE_IMPORTS],
        capture_output=True,
        text=True,
        check=True,
    )
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    top: list[tuple[float, str]] = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            top.append((int(parts[1]) / 1e6, parts[2].strip()))
    code = (
        "import time, numpy as np; from agentprune.pruning.icbs import solver; "
        "t = time.perf_counter(); solver.anneal(np.eye(8), 4, restarts=2); "
        "print(time.perf_counter() - t)"
    )
    kernel = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    figures = {"interpreter_and_imports_s": round(wall, 2), "their_cpu_s": round(cpu, 2)}
    figures.update({f"import {name}": round(s, 2) for s, name in sorted(top, reverse=True)[:6]})
    figures["first_anneal_call_s"] = round(float(kernel.strip().splitlines()[-1]), 2)
    return figures


def fmt(row: dict | None, key: str, digits: int = 4) -> str:
    if not row or key not in row or row[key] is None:
        return "-"
    return f"{row[key]:.{digits}f}"


def print_table(model: str, sparsity: float, seed: int, rows: dict[str, dict | None]) -> None:
    print(f"\n{model}  sparsity {sparsity}  seed {seed}")
    print(
        f"  {'':14s} {'cpu s':>7s} {'wall s':>7s} {'loss before':>11s} {'loss after':>10s}"
        f" {'val loss':>8s}"
    )
    for name, row in rows.items():
        print(
            f"  {name:14s} {fmt(row, 'cpu', 2):>7s} {fmt(row, 'wall', 2):>7s}"
            f" {fmt(row, 'init'):>11s} {fmt(row, 'loss'):>10s} {fmt(row, 'val'):>8s}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agentprune-bench-icbs"))
    parser.add_argument("--models", nargs="+", default=["vit", "convnext"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-old-code", action="store_true", help="skip the archived old code")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from agentprune import data, models, resolve
    from agentprune.pruning.icbs import solver

    config = resolve.load_config(ROOT / "config" / "config.yaml")
    new_settings = resolve.method_settings(config, "icbs")
    old_settings = old_default_settings(new_settings)
    batch = resolve.prune_step(config).calibration_batch_size
    args.workdir.mkdir(parents=True, exist_ok=True)
    stems = ensure_base_models(args.workdir, args.models)
    package = None if args.no_old_code else old_package(args.workdir, args.old_commit)
    solver.anneal(torch.eye(8).numpy(), 4, restarts=2)  # the kernels' load, outside the timing

    summary = []
    for name in args.models:
        base, desc = models.load(stems[name])
        splits = data.load_splits(resolve.data(config), data_config=models.data_config_of(desc))
        old = (
            run_old_code(
                package, stems[name], config["dataset"], batch, args.seeds, args.sparsities
            )
            if package
            else {}
        )
        for seed in args.seeds:
            n = int(new_settings["calibration_batches"])
            batches = data.calibration_batches(splits.train, n, batch, seed)
            for sparsity in args.sparsities:
                ref = reference_masks(config, base, splits, batches, sparsity, seed)
                rows = {
                    "magnitude": ref["magnitude"],
                    "wanda": ref["wanda"],
                    "old code": old.get((seed, sparsity)),
                    "old settings": run_new_code(
                        base, splits, batches, sparsity, seed, old_settings
                    ),
                    "new settings": run_new_code(
                        base, splits, batches, sparsity, seed, new_settings
                    ),
                }
                print_table(name, sparsity, seed, rows)
                if rows["old code"]:
                    same = rows["old code"]["mask"] == rows["old settings"]["mask"]
                    print(
                        f"  old code and old settings give {'the same' if same else 'OTHER'} masks"
                    )
                summary.append({"model": name, "sparsity": sparsity, "seed": seed, **rows})
    print("\nnew settings:", json.dumps(new_settings))
    print("old settings:", json.dumps(OLD_SETTINGS), f"(code at {args.old_commit})")
    print("\njob level (fresh processes):", json.dumps(startup_figures(), indent=1))
    print("\nmean over seeds, calibration loss after / cpu s:")
    for name in args.models:
        for sparsity in args.sparsities:
            cells = [r for r in summary if r["model"] == name and r["sparsity"] == sparsity]
            line = []
            for key in ("old code", "old settings", "new settings"):
                got = [c[key] for c in cells if c[key]]
                if got:
                    loss = sum(g["loss"] for g in got) / len(got)
                    cpu = sum(g["cpu"] for g in got) / len(got)
                    line.append(f"{key} {loss:.4f} / {cpu:.1f}")
            print(f"  {name:9s} {sparsity}: " + "   ".join(line))


if __name__ == "__main__":
    main()
