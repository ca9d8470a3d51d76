"""Paper-scale step timings: DeiT-B pruned to 4.16 GMACs with Taylor importance, then a short
fine-tune, on synthetic ImageNet-sized data.

Usage (the defaults are the published setting: 50 calibration batches x 64 images at 224 px):
    python benchmarks/bench_gpu.py [--model deit_base_distilled_patch16_224] [--target-gmacs 4.16]
        [--calibration-batches 50] [--batch-size 64] [--finetune-steps 50] [--amp bf16]
        [--threads 1]

It runs wherever it is started: on a GPU the Taylor calibration passes and the fine-tune run on
CUDA (the graph surgery of Torch-Pruning stays on the CPU, as in the pipeline), on a CPU-only
machine everything runs on the CPU (use small settings there, e.g. --model deit_tiny_patch16_224
--target-gmacs 0.6 --calibration-batches 2 --batch-size 8 --finetune-steps 2). It prints one
line per figure and asserts nothing about time. ``--threads`` sets torch's CPU threads (default 1,
as on a shared machine; give a GPU node's job its own core count).
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from agentprune import models, resolve, steps
from agentprune.pruning import catalog, structured


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_batches(
    n: int, batch: int, size: int, classes: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded random batches of images and labels (kept on the CPU like the pipeline's)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, size, size, generator=gen),
            torch.randint(0, classes, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


def plan_taylor(timm_name: str, ratio: float, calibration_batches: int) -> dict[str, Any]:
    """The taylor plan of one model at ``ratio`` as the workflow's plan step makes it: a study
    config (schema defaults, the synthetic data set) -> ``resolve.plan_step`` -> ``steps.plan``."""
    config = resolve.prepare(
        {
            "dataset": {"name": "synthetic"},
            "models": [{"name": timm_name, "timm": timm_name, "pretrained": False}],
            "methods": ["taylor"],
            "paper": {"reference_method": "taylor"},
            "prune": {"calibration_batches": calibration_batches},
        }
    )
    step = resolve.plan_step(config, "taylor", timm_name, ratio)
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "profile.json"
        profile.write_text("{}")  # the fixed recipes read no profile
        return steps.plan(step, 0, profile, Path(tmp) / "plan.json")


def prune(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Create the model and prune it with the taylor recipe to the GMACs target; print timings."""
    start = time.perf_counter()
    model = models.create(args.model, num_classes=1000, pretrained=False)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    print(f"create {args.model}: {time.perf_counter() - start:.1f} s ({size} px)")
    example = torch.randn(1, 3, size, size)
    base_macs, base_params = structured.count_macs(model, example)
    ratio = 1.0 - args.target_gmacs * 1e9 / base_macs
    if not 0.0 < ratio < 1.0:
        raise SystemExit(
            f"--target-gmacs {args.target_gmacs} must be below {base_macs / 1e9:.3f} GMACs"
        )
    plan = plan_taylor(args.model, ratio, args.calibration_batches)
    calibration = synthetic_batches(args.calibration_batches, args.batch_size, size, 1000, 0)
    synchronize()
    start = time.perf_counter()
    pruned, report = catalog.get("taylor").prune(model, plan, example, calibration, 0)
    synchronize()
    total = time.perf_counter() - start
    print(
        f"base {base_macs / 1e9:.3f} GMACs {base_params / 1e6:.2f} M -> "
        f"pruned {report['macs'] / 1e9:.3f} GMACs {report['params'] / 1e6:.2f} M "
        f"(target {args.target_gmacs} G, ratio {ratio:.4f}, achieved {report['achieved']:.4f})"
    )
    print(
        f"taylor calibration {args.calibration_batches} x {args.batch_size} images: "
        f"{report['calibration_seconds']:.1f} s"
    )
    print(f"prune to target (calibration + search + surgery): {total:.1f} s")
    return pruned, {"size": size}


def finetune(model: torch.nn.Module, args: argparse.Namespace, size: int) -> None:
    """Time ``--finetune-steps`` AdamW steps (AMP and channels_last on CUDA) on synthetic data."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(model).to(dev).train()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = args.amp if dev.type == "cuda" else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    batches = synthetic_batches(min(args.finetune_steps, 8), args.batch_size, size, 1000, 1)
    times = []
    for step in range(args.finetune_steps + 1):  # step 0 warms up (allocator, cuDNN autotune)
        x, y = batches[step % len(batches)]
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        synchronize()
        if step:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / max(1, len(times))
    print(
        f"fine-tune {args.finetune_steps} steps x {args.batch_size} images (amp {amp}): "
        f"{per_step * 1000:.0f} ms/step, {args.batch_size / per_step:.0f} images/s"
    )
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_distilled_patch16_224")
    parser.add_argument("--target-gmacs", type=float, default=4.16)
    parser.add_argument("--calibration-batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, GPU: {gpu}, CPU: {platform.processor() or 'unknown'}")
    print(f"CPU threads: {torch.get_num_threads()}")
    pruned, info = prune(args)
    finetune(pruned, args, info["size"])


if __name__ == "__main__":
    main()
