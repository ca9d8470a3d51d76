"""Fine-tuning at scale: checkpoint/resume, DDP through torchrun, AMP, and the recipe features.

Everything runs on a shared 2-core CPU: tiny timm models on digits, DDP with gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from agentprune import data, evaluate, models, resolve, steps, train
from agentprune.config import defaults
from agentprune.settings import DataSettings, FinetuneStep, TrainConfig, plain
from conftest import TINY_MODELS, make_model, recipe
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflow"
DIGITS = DataSettings(
    name="digits",
    root=None,
    img_size=32,
    val_fraction=0.15,
    test_fraction=0.25,
    split_seed=0,
    synthetic_classes=10,
    synthetic_samples=256,
    max_val_images=10000,
)
# The full recipe: every random source of a step (translation, erasing, RandAugment, mixup and
# cutmix, drop path, EMA, hard distillation) must be restored on resume.
RECIPE = {
    "augment": True,
    "random_erase": 0.25,
    "randaug": "rand-m9-mstd0.5-inc1",
    "mixup": 0.8,
    "cutmix": 1.0,
    "drop_path": 0.1,
    "ema": 0.9,
    "distill": {"enabled": True, "kind": "hard"},
}
STEP = (
    "import json, sys, torch; torch.set_num_threads(1); from agentprune import steps; "
    "steps.finetune_worker(**json.load(open(sys.argv[1])))"
)


def tiny_set(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(WORKFLOW), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


@dataclass(frozen=True)
class StepInputs:
    """The finetune step's settings and files."""

    step: FinetuneStep
    plan_json: str
    pruned_stem: str
    base_stem: str
    out_stem: str
    report_json: str

    def paths(self) -> list[str]:
        """The files, in steps.finetune's argument order."""
        return [self.plan_json, self.pruned_stem, self.base_stem, self.out_stem, self.report_json]

    def worker_kwargs(self) -> dict[str, Any]:
        """steps.finetune_worker's (JSON-able) keyword arguments."""
        return {"step": plain(self.step), "paths": self.paths()}


def prepare_run(directory: Path, finetune: dict[str, Any]) -> StepInputs:
    """A pruned (some weights zeroed: the masks must hold) and a base tiny ConvNeXt, a plan and
    the step settings of the convnext of config.yaml with ``finetune`` over its recipe."""
    directory.mkdir(parents=True, exist_ok=True)
    name, overrides = TINY_MODELS["convnext"]
    base = make_model("convnext", seed=0)
    models.save(base, directory / "base", name, 10, overrides)
    pruned = make_model("convnext", seed=0)
    with torch.no_grad():
        weight = pruned.stages[1].blocks[0].mlp.fc1.weight
        weight[weight.abs() < weight.abs().median()] = 0
    models.save(pruned, directory / "pruned", name, 10, overrides)
    (directory / "plan.json").write_text(
        json.dumps({"seed": 0, "method": "magnitude", "model": "tiny", "target": {"value": 0.5}})
    )
    config = resolve.load_config(
        ROOT / "config" / "config.yaml",
        overrides={"finetune": {"epochs": 3, "lr": 0.003, "batch_size": 128, **finetune}},
    )
    return StepInputs(
        step=resolve.finetune_step(config, "convnext"),
        plan_json=str(directory / "plan.json"),
        pruned_stem=str(directory / "pruned"),
        base_stem=str(directory / "base"),
        out_stem=str(directory / "finetuned"),
        report_json=str(directory / "finetune_report.json"),
    )


def run_step(inputs: StepInputs, directory: Path, kill_after_epoch: int | None = None):
    """The finetune step in a fresh process; with ``kill_after_epoch``, one that SIGKILLs itself
    once that epoch's checkpoint is written (tests/finetune_killed.py)."""
    args = directory / "step_args.json"
    args.write_text(json.dumps(inputs.worker_kwargs()))
    command = [sys.executable, "-c", STEP, str(args)]
    if kill_after_epoch is not None:
        command = [sys.executable, str(ROOT / "tests" / "finetune_killed.py"), str(args)]
        command.append(str(kill_after_epoch))
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- checkpoint and resume


@pytest.mark.parametrize("features", [{}, RECIPE], ids=["plain", "recipe"])
def test_killed_finetune_resumes_bitwise(tmp_path: Path, features: dict[str, Any]) -> None:
    """A fine-tune killed (SIGKILL) after epoch 1 and rerun ends bitwise-equal to an uninterrupted
    one: weights, loss curve and test evaluation."""
    whole = prepare_run(tmp_path / "whole", features)
    done = run_step(whole, tmp_path / "whole")
    assert done.returncode == 0, done.stdout + done.stderr

    killed = prepare_run(tmp_path / "killed", features)
    ckpt = Path(killed.out_stem + ".ckpt")
    first = run_step(killed, tmp_path / "killed", kill_after_epoch=1)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert "epoch 1 done: killing this process" in first.stdout
    assert "epoch 0:" in first.stdout and "epoch 1:" not in first.stdout  # 0-based log lines
    assert (ckpt / train.CHECKPOINT_NAME).is_file()
    assert not Path(killed.report_json).exists()
    state = torch.load(ckpt / train.CHECKPOINT_NAME, weights_only=True)  # pickle-free
    assert state["epoch"] == 1

    second = run_step(killed, tmp_path / "killed")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from epoch 1" in second.stdout
    assert not ckpt.exists(), "the checkpoint directory outlived a successful step"

    a = Path(whole.out_stem + ".safetensors").read_bytes()
    b = Path(killed.out_stem + ".safetensors").read_bytes()
    assert a == b, "resumed weights differ from the uninterrupted run"
    ra = json.loads(Path(whole.report_json).read_text())
    rb = json.loads(Path(killed.report_json).read_text())
    assert ra["epoch_loss"] == rb["epoch_loss"] and len(ra["epoch_loss"]) == 3
    assert ra["resumed_from_epoch"] is None and rb["resumed_from_epoch"] == 1
    test = data.load_splits(DIGITS).test
    ea = evaluate.accuracy(models.load(whole.out_stem)[0], test)
    eb = evaluate.accuracy(models.load(killed.out_stem)[0], test)
    assert ea == eb
    # The masks held through the kill and the resume.
    pruned_w = models.load(killed.pruned_stem)[0].stages[1].blocks[0].mlp.fc1.weight
    tuned_w = models.load(killed.out_stem)[0].stages[1].blocks[0].mlp.fc1.weight
    assert torch.equal(tuned_w[pruned_w == 0], torch.zeros(int((pruned_w == 0).sum())))


def test_stale_checkpoint_is_ignored_and_matching_one_resumes(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = recipe(epochs=1, lr=1e-2, batch_size=16)

    def run(config: TrainConfig) -> nn.Module:
        model = make_model("vit")
        train.train(
            model,
            tiny_set(),
            config,
            seed=0,
            progress=False,
            log=lines.append,
            checkpoint_dir=tmp_path,
        )
        return model

    first = run(cfg)
    assert (tmp_path / train.CHECKPOINT_NAME).is_file()
    lines.clear()
    run(recipe(epochs=1, lr=2e-2, batch_size=16))
    assert any("ignoring stale checkpoint" in line for line in lines), lines
    assert not any("resumed" in line for line in lines)
    lines.clear()
    again = run(cfg)  # the lr-2e-2 run overwrote the checkpoint: stale again, trains afresh
    assert not any("resumed" in line for line in lines)
    lines.clear()
    resumed = run(cfg)  # now the checkpoint is this run's final state: nothing left to train
    assert any("resumed from epoch 1" in line for line in lines), lines
    assert state_equal(first, again) and state_equal(first, resumed)
    lines.clear()
    run(recipe(epochs=1, lr=1e-2, batch_size=16, resume=False))
    assert not any("resumed" in line for line in lines)


def test_on_epoch_end_follows_each_checkpoint(tmp_path: Path) -> None:
    """The callback gets the completed-epoch count once per epoch (a fractional last epoch
    included), each time with that epoch's checkpoint already on disk; without a checkpoint
    directory it is called all the same."""
    seen: list[tuple[int, int]] = []

    def on_epoch_end(epoch: int) -> None:
        state = torch.load(tmp_path / train.CHECKPOINT_NAME, weights_only=True)
        seen.append((epoch, state["epoch"]))

    cfg = recipe(epochs=2.5, lr=1e-2, batch_size=16)  # 4 batches of 16 per epoch
    report = train.train(
        make_model("vit"),
        tiny_set(),
        cfg,
        seed=0,
        progress=False,
        checkpoint_dir=tmp_path,
        on_epoch_end=on_epoch_end,
    )
    assert seen == [(1, 1), (2, 2), (3, 3)] and report["steps"] == 10
    calls: list[int] = []
    train.train(
        make_model("vit"), tiny_set(), cfg, seed=0, progress=False, on_epoch_end=calls.append
    )
    assert calls == [1, 2, 3]


def test_run_stopped_by_on_epoch_end_resumes_bitwise(tmp_path: Path) -> None:
    """An exception from the callback after epoch 1 stops the run; the rerun in this same process
    re-seeds, then restores every random state from the checkpoint (without that, epoch 2 would
    draw epoch 1's augmentation, erasing and drop path again) and ends bitwise-equal to an
    uninterrupted run."""
    cfg = recipe(
        epochs=2, lr=1e-2, batch_size=16, augment=True, random_erase=0.5, drop_path=0.1, ema=0.9
    )

    class Stop(Exception):
        pass

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Stop

    whole = make_model("vit")
    expected = train.train(whole, tiny_set(), cfg, seed=0, progress=False)
    stopped = make_model("vit")
    with pytest.raises(Stop):
        train.train(
            stopped,
            tiny_set(),
            cfg,
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path,
            on_epoch_end=stop,
        )
    resumed = make_model("vit")
    report = train.train(resumed, tiny_set(), cfg, seed=0, progress=False, checkpoint_dir=tmp_path)
    assert report["resumed_from_epoch"] == 1 and expected["resumed_from_epoch"] is None
    assert report["epoch_loss"] == expected["epoch_loss"] and len(report["epoch_loss"]) == 2
    assert state_equal(whole, resumed)


# ---------------------------------------------------------------- DDP


def test_ddp_two_cpu_processes_agree(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: both ranks end with the same, trained weights."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests" / "ddp_train.py"),
            str(out),
        ],
        env=env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the ranks ended with different weights"
    assert ranks[0]["sha256"] != (out / "initial.sha256").read_text(), "nothing trained"
    assert ranks[0]["report"]["world_size"] == 2
    assert ranks[0]["report"]["epoch_loss"] == ranks[1]["report"]["epoch_loss"]
    # 256 examples: 128 per rank, global batch 64 = 32 per rank: 4 steps per epoch, 2 epochs.
    assert ranks[0]["report"]["steps"] == 8
    assert proc.stdout.count("epoch 1:") == 1, "only rank 0 logs"
    assert ranks[0]["epochs_ended"] == [1, 2] and ranks[1]["epochs_ended"] == []


def test_finetune_step_launches_torchrun(tmp_path: Path, monkeypatch) -> None:
    """steps.finetune(processes=2), the Snakemake path for a job with 2 GPUs, on CPU (gloo)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    kwargs = prepare_run(tmp_path, {"epochs": 1})
    report = steps.finetune(kwargs.step, *kwargs.paths(), processes=2)
    assert report["world_size"] == 2 and len(report["epoch_loss"]) == 1
    assert Path(kwargs.out_stem + ".safetensors").is_file()
    assert not Path(kwargs.out_stem + ".ckpt").exists()


# ---------------------------------------------------------------- precision and layout


def test_amp_modes() -> None:
    cpu = torch.device("cpu")
    assert train.amp_dtype("auto", cpu) is None  # CPU runs stay fp32 by default
    assert train.amp_dtype("fp16", cpu) is None
    assert train.amp_dtype(False, cpu) is None
    assert train.amp_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        train.amp_dtype("fp8", cpu)
    assert not train.use_channels_last("auto", make_model("convnext"), cpu)
    assert train.use_channels_last(True, make_model("convnext"), cpu)


def test_bf16_autocast_on_cpu_trains() -> None:
    model = make_model("convnext")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = recipe(epochs=1, lr=3e-3, batch_size=32, amp="bf16", channels_last=True)
    report = train.train(model, tiny_set(), cfg, seed=0, progress=False)
    assert report["amp"] == "bfloat16" and report["channels_last"]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in report["epoch_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


# ---------------------------------------------------------------- recipe features


def test_ema_weights_are_the_result() -> None:
    def run(ema: float | None) -> nn.Module:
        model = make_model("vit")
        train.train(
            model,
            tiny_set(),
            recipe(epochs=2, lr=1e-2, batch_size=16, ema=ema),
            seed=0,
            progress=False,
        )
        return model

    raw, averaged = run(None), run(0.9)
    assert not state_equal(raw, averaged), "the EMA weights equal the raw weights"
    # The EMA lags behind the raw weights: it sits between the start and the raw end point.
    start = make_model("vit").state_dict()["head.weight"]
    d_raw = (raw.state_dict()["head.weight"] - start).norm()
    d_ema = (averaged.state_dict()["head.weight"] - start).norm()
    assert d_ema < d_raw


def test_mixup_makes_soft_targets() -> None:
    cfg = recipe(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    model = make_model("vit")
    per_batch = train.Recipe(
        cfg, model, torch.device("cpu"), torch.Generator().manual_seed(0), None
    )
    x, y = tiny_set(n=7).tensors
    mixed, targets = per_batch.inputs(x.clone(), y)
    assert mixed.shape == (6, 3, 32, 32) and targets.shape == (6, 10)  # odd example dropped
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert (targets.max(1).values < 1).all() and ((targets > 0.02).sum(1) >= 1).all()
    loss = per_batch.loss(model(mixed), mixed, targets)
    assert torch.isfinite(loss)


def test_drop_path_rates_follow_depth() -> None:
    from timm.layers import DropPath

    model = make_model("vit")  # 2 blocks, built without drop path (Identity slots)
    saved = train.set_drop_path(model, 0.2)
    assert len(saved) == 4  # drop_path1 and drop_path2 of each block
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)  # first block: rate 0
    assert isinstance(model.blocks[1].drop_path1, DropPath)
    assert model.blocks[1].drop_path2.drop_prob == pytest.approx(0.2)
    train.restore_modules(saved)
    assert isinstance(model.blocks[1].drop_path1, nn.Identity)
    # In training mode the rate acts: outputs become random.
    train.set_drop_path(model, 0.5)
    model.train()
    x = tiny_set(n=4).tensors[0]
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


def test_randaugment_and_random_erase_change_images() -> None:
    base = data.load_splits(DIGITS).train
    augmented = train.RandAugmentDataset(base, "rand-m9-mstd0.5-inc1", 32)
    train.seed_everything(0)
    x0, y0 = base[0]
    x1, y1 = augmented[0]
    assert x1.shape == x0.shape and y1 == y0 and not torch.equal(x0, x1)
    cfg = recipe(random_erase=1.0)
    per_batch = train.Recipe(cfg, make_model("vit"), torch.device("cpu"), torch.Generator(), None)
    x = torch.stack([base[i][0] for i in range(4)])
    erased, _ = per_batch.inputs(x.clone(), torch.zeros(4, dtype=torch.long))
    assert not torch.equal(erased, x)


def distill(**values: Any) -> dict[str, Any]:
    """The schema's ``finetune.distill`` with ``values`` over it (a recipe's distill is whole)."""
    return {**defaults("finetune")["distill"], **values}


def test_hard_distillation_uses_teacher_argmax() -> None:
    teacher = make_model("vit", seed=1)
    student = make_model("vit", seed=2)
    cfg = recipe(label_smoothing=0.0, distill=distill(enabled=True, kind="hard", alpha=0.5))
    per_batch = train.Recipe(cfg, student, torch.device("cpu"), torch.Generator(), teacher)
    x, y = tiny_set(n=8).tensors
    with torch.no_grad():
        logits = student(x)
        t_labels = teacher(x).argmax(-1)
        loss = per_batch.loss(logits, x, y)
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(logits, t_labels)
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="kind"):
        train.Recipe(
            recipe(distill=distill(kind="x")),
            student,
            torch.device("cpu"),
            torch.Generator(),
            teacher,
        )
