"""Training: base models from scratch and fine-tuning after pruning.

AdamW with a linear warm-up and cosine decay, label smoothing, optional knowledge distillation from
a teacher (the base model), optional weight masks that keep pruned weights at exactly zero, AMP on
GPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from agentprune import data


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels on CPU."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def device() -> torch.device:
    """The training device: CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (the ``finetune`` / ``base_training`` config
    sections)."""

    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.0
    min_lr_fraction: float = 0.01
    grad_clip: float | None = 1.0
    distill: dict[str, Any] = field(default_factory=dict)
    augment: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TrainConfig:
        """Build from a config section, ignoring keys that are not hyperparameters."""
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the image side (digits have no flip symmetry)."""
    size = x.shape[-1]
    pad = max(1, size // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[..., dy : dy + size, dx : dx + size]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up then cosine decay to
    ``min_lr_fraction``."""
    warm = int(total * cfg.warmup_fraction)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Zero the masked-out weights (masks: parameter name -> 0/1 tensor of the same shape)."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    seed: int,
    teacher: nn.Module | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place.

    Args:
        model: the model to train.
        train_set: training examples.
        cfg: hyperparameters.
        seed: seeds shuffling, augmentation and dropout.
        teacher: optional distillation teacher (used when ``cfg.distill['enabled']``).
        masks: optional unstructured masks that stay applied through training.
        progress: show a tqdm progress bar.
        log: optional callable receiving one line per epoch.

    Returns:
        A report: per-epoch mean loss, steps, seconds.
    """
    from tqdm import tqdm

    if cfg.epochs <= 0:
        return {
            "steps": 0,
            "epoch_loss": [],
            "final_loss": float("nan"),
            "seconds": 0.0,
            "distill": False,
        }
    seed_everything(seed)
    dev = device()
    model.to(dev).train()
    use_kd = bool(cfg.distill.get("enabled")) and teacher is not None
    if use_kd:
        teacher.to(dev).eval()
    alpha = float(cfg.distill.get("alpha", 0.5))
    temperature = float(cfg.distill.get("temperature", 2.0))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )
    batches_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * batches_per_epoch)))
    gen = torch.Generator().manual_seed(seed + 1)
    amp = dev.type == "cuda"
    losses: list[float] = []
    epoch_losses: list[float] = []
    step = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False)
    epoch = 0
    while step < total:
        for x, y in data.loader(train_set, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if step >= total:
                break
            x, y = x.to(dev), y.to(dev)
            if cfg.augment:
                x = _augment(x, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if use_kd:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    kd = F.kl_div(
                        F.log_softmax(logits / temperature, -1),
                        F.softmax(t_logits / temperature, -1),
                        reduction="batchmean",
                    ) * (temperature**2)
                    loss = (1 - alpha) * loss + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            apply_masks(model, masks)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
        epoch_losses.append(float(np.mean(losses[-batches_per_epoch:])))
        if log:
            log(f"epoch {epoch}: loss {epoch_losses[-1]:.4f} ({step}/{total} steps)")
        epoch += 1
    bar.close()
    model.eval()
    return {
        "steps": total,
        "epoch_loss": epoch_losses,
        "final_loss": epoch_losses[-1] if epoch_losses else float("nan"),
        "seconds": time.perf_counter() - start,
        "distill": use_kd,
    }
