"""Training: base models from scratch and fine-tuning after pruning.

AdamW with a linear warm-up and cosine decay, label smoothing, optional knowledge distillation from
a teacher (soft KL or DeiT-style hard labels), optional weight masks that keep pruned weights at
exactly zero, and the fine-tuning recipe of the pruning papers: mixup/cutmix, RandAugment, random
erasing, stochastic depth (drop path) and an EMA of the weights.

Systems features:

- AMP (bf16 where the GPU supports it, else fp16 with a gradient scaler), channels_last and an
  optional ``torch.compile`` on GPU; CPU runs stay in fp32 unless ``amp`` asks for bf16.
- DDP when the process was started by torchrun (see :mod:`agentprune.distributed`).
- Per-epoch checkpoints (model, optimizer, gradient scaler, EMA, every RNG state, the loss curve)
  written atomically to ``checkpoint_dir``; a killed run resumes from its last completed epoch
  and ends bitwise-identical to an uninterrupted run on CPU. Checkpoints are read with
  ``torch.load(weights_only=True)`` (no pickle). An ``on_epoch_end`` callback runs on rank 0
  after each epoch's checkpoint (tests use it to kill a run between epochs).

:func:`train` only orchestrates: :func:`_set_up` builds a :class:`_Run` (model, optimizer,
scaler, EMA, recipe, step counts), :func:`_resume` restores it from a checkpoint,
:func:`_train_epoch` advances it one epoch and :func:`_finish` hands the model back and reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from agentprune import data, distributed
from agentprune.settings import TrainConfig  # the recipe, with every step's settings (no torch)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
# Keys of TrainConfig that do not change the trajectory of a run: they stay out of the checkpoint
# fingerprint so that toggling them does not invalidate a checkpoint.
_NOT_FINGERPRINTED = ("resume",)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels on CPU."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def device() -> torch.device:
    """The training device: CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


# ---------------------------------------------------------------- precision and layout


def amp_dtype(mode: str | bool, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` mode on ``dev``, or None for fp32.

    ``auto``: bf16 on GPUs that support it, else fp16; fp32 on CPU (CPU bf16 autocast is slower
    than fp32 for these models). ``bf16``: bf16 on GPU and CPU. ``fp16``: fp16 on GPU only (fp16
    on CPU has no fast kernels; it falls back to fp32). ``off``: fp32.
    """
    if mode is False:  # YAML reads an unquoted `off` as false
        mode = "off"
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"finetune.amp={mode!r} is not one of auto, bf16, fp16, off")
    cuda = dev.type == "cuda"
    if mode == "off" or (mode in ("auto", "fp16") and not cuda):
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_channels_last(setting: bool | str, model: nn.Module, dev: torch.device) -> bool:
    """Whether to train in channels_last: ``auto`` = on GPU for models with convolutions."""
    if setting == "auto":
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        return dev.type == "cuda" and has_conv
    return bool(setting)


# ---------------------------------------------------------------- recipe features


def set_drop_path(model: nn.Module, rate: float) -> list[tuple[nn.Module, str, nn.Module]]:
    """Give the model's stochastic-depth slots a linear drop-path schedule up to ``rate``.

    timm blocks hold their drop path in attributes named ``drop_path*`` (``drop_path``,
    ``drop_path1``, ``drop_path2``), as ``DropPath`` or, when the model was built with rate 0, as
    ``nn.Identity``. Blocks, in order, get ``rate * i / (n - 1)`` like timm's
    ``drop_path_rate``; slots of one block share its rate.

    Returns:
        ``(parent, attribute, original module)`` triples for :func:`restore_modules`.
    """
    from timm.layers import DropPath

    slots = [
        (name, parent, attr, child)
        for name, parent in model.named_modules()
        for attr, child in parent.named_children()
        if attr.startswith("drop_path") and isinstance(child, DropPath | nn.Identity)
    ]
    blocks = list(dict.fromkeys(name for name, *_ in slots))
    rates = {b: rate * i / max(1, len(blocks) - 1) for i, b in enumerate(blocks)}
    saved = []
    for name, parent, attr, child in slots:
        saved.append((parent, attr, child))
        setattr(parent, attr, DropPath(rates[name]) if rates[name] > 0 else nn.Identity())
    return saved


def restore_modules(saved: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the modules that :func:`set_drop_path` replaced."""
    for parent, attr, child in saved:
        setattr(parent, attr, child)


class RandAugmentDataset(Dataset):
    """Applies a timm RandAugment policy (e.g. ``rand-m9-mstd0.5-inc1``) to a data set's images.

    The wrapped data set yields normalised tensors (every data set of :mod:`agentprune.data`
    does); RandAugment works on PIL images, so each image is de-normalised, augmented and
    normalised again. Its randomness comes from python's and numpy's global generators (in the
    loader's workers, from their seeded copies), which the run's seed and checkpoints cover.
    """

    def __init__(
        self,
        base: Dataset,
        policy: str,
        img_size: int,
        mean: tuple[float, ...] = data.IMAGENET_MEAN,
        std: tuple[float, ...] = data.IMAGENET_STD,
    ) -> None:
        from timm.data.auto_augment import rand_augment_transform

        self.base = base
        hparams = {
            "translate_const": int(img_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in mean),
        }
        if "-mmax" not in policy:
            # At magnitude 10 (reached by m10, or by mstd noise clipped at 10) timm's increasing
            # posterize asks for 0 bits, which recent Pillow (13) rejects: stop just below 10.
            hparams["magnitude_max"] = 10 - 1e-6
        self.transform = rand_augment_transform(policy, hparams)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        from torchvision.transforms.functional import pil_to_tensor, to_pil_image

        x, y = self.base[index]
        pixels = (x * self.std + self.mean).clamp(0, 1)
        image = to_pil_image((pixels * 255).round().to(torch.uint8))
        out = pil_to_tensor(self.transform(image)).float() / 255
        return (out - self.mean) / self.std, y


def _image_size(dataset: Dataset) -> int:
    x, _ = dataset[0]
    return int(x.shape[-1])


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ValueError("mixup needs the model's num_classes (a timm model attribute)")


class Recipe:
    """The per-batch parts of the recipe: translation, mixup/cutmix, random erasing, the loss."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        dev: torch.device,
        gen: torch.Generator,
        teacher: nn.Module | None,
    ) -> None:
        self.cfg = cfg
        self.gen = gen
        self.teacher = teacher
        self.mode = str(cfg.distill["kind"])
        if self.mode not in ("soft", "hard"):
            raise ValueError(f"finetune.distill.kind={self.mode!r} is not one of soft, hard")
        self.alpha = float(cfg.distill["alpha"])
        self.temperature = float(cfg.distill["temperature"])
        self.mixup = None
        if cfg.mixup_enabled:
            from timm.data import Mixup

            # Mixup folds label smoothing into its soft targets.
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.label_smoothing,
                num_classes=_num_classes(model),
            )
        self.erase = None
        if cfg.random_erase > 0:
            from timm.data.random_erasing import RandomErasing

            # After normalisation, like timm: 'pixel' fills with per-pixel normal noise.
            self.erase = RandomErasing(cfg.random_erase, mode="pixel", device=str(dev))

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch; targets become soft (``[batch, classes]``) under mixup."""
        if self.cfg.augment:
            x = _augment(x, self.gen)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None and len(x) > 1:  # a batch of one has nothing to mix with
            if len(x) % 2:  # timm pairs each example with its mirror: drop an odd one out
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        return x, y

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label loss, mixed with the distillation loss when a teacher is set."""
        if y.ndim == 2:
            loss = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            t_logits = self.teacher(x)
        if self.mode == "hard":
            # DeiT's hard distillation: cross-entropy on the teacher's top-1 decision.
            kd = F.cross_entropy(logits, t_logits.argmax(dim=-1))
        else:
            kd = F.kl_div(
                F.log_softmax(logits / self.temperature, -1),
                F.softmax(t_logits / self.temperature, -1),
                reduction="batchmean",
            ) * (self.temperature**2)
        return (1 - self.alpha) * loss + self.alpha * kd


def make_ema(model: nn.Module, cfg: TrainConfig) -> Any:
    """A timm ``ModelEmaV3`` of ``model`` with decay ``cfg.ema``, or None when ``ema`` is null."""
    if not cfg.ema_enabled:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=float(cfg.ema))  # type: ignore[arg-type]


# ---------------------------------------------------------------- checkpoints


def _tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    digest.update(t.view(torch.uint8).numpy().tobytes())


def fingerprint(
    model: nn.Module,
    cfg: TrainConfig,
    seed: int,
    n_train: int,
    world_size: int,
    masks: dict[str, torch.Tensor] | None,
    extra: Any = None,
) -> str:
    """A digest of everything that determines a run's trajectory: settings, seed, data size,
    process count, the starting weights, the masks and ``extra`` (e.g. the teacher's identity).

    A checkpoint whose fingerprint differs belongs to another run and is ignored.
    """
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    digest = hashlib.sha256()
    head = {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "seed": seed,
        "n_train": n_train,
        "world_size": world_size,
        "extra": extra,
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _tensor_digest(digest, tensor)
    for name in sorted(masks or {}):
        digest.update(name.encode())
        _tensor_digest(digest, masks[name])  # type: ignore[index]
    return digest.hexdigest()


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """This process's random states, in types ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "augment": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gaussian = state["python"]
    random.setstate((version, tuple(internal), gaussian))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically (a temp file, then ``os.replace``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:  # the rename must not overtake the data on a crash
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(
    directory: Path, expected: str, log: Callable[[str], None] | None
) -> dict[str, Any] | None:
    """The checkpoint in ``directory`` if it belongs to the run with fingerprint ``expected``.

    Unreadable or stale checkpoints (other settings, weights or data) are ignored with a log line.
    """
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: start over rather than fail
        if log:
            log(f"ignoring unreadable checkpoint {path} ({type(err).__name__}: {err})")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected:
        if log:
            log(f"ignoring stale checkpoint {path}: it was written by a run with other inputs")
        return None
    return state


# ---------------------------------------------------------------- the loop


def _epoch_loader(
    train_set: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    info: distributed.DistInfo,
    workers: int,
    pin: bool,
) -> DataLoader:
    if not info.enabled:
        return data.loader(
            train_set, batch_size, shuffle=True, seed=seed * 1000 + epoch, workers=workers
        )
    from torch.utils.data.distributed import DistributedSampler

    # Every rank draws the same permutation (seeded by the run's seed and the epoch) and takes
    # its own slice of it.
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=gen,
        pin_memory=pin,
    )


@dataclass
class _Run:
    """The moving parts of one training run.

    Built by :func:`_set_up`, restored by :func:`_resume`, advanced by :func:`_train_epoch` and
    closed by :func:`_finish`.
    """

    cfg: TrainConfig
    info: distributed.DistInfo
    dev: torch.device
    seed: int
    train_set: Dataset
    model: nn.Module
    forward: nn.Module  # what a step calls: the model, DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: Any  # a timm ModelEmaV3, or None
    gen: torch.Generator  # translation augmentation (also restored on resume)
    recipe: Recipe
    dtype: torch.dtype | None  # the autocast dtype; None: fp32
    channels_last: bool
    drop_path_saved: list[tuple[nn.Module, str, nn.Module]]
    masks: dict[str, torch.Tensor] | None
    use_kd: bool
    batch_size: int  # per rank
    total: int  # optimizer steps of the whole run
    # An epoch's loss is the mean of the last batches_per_epoch step losses, as before
    # checkpoints existed (a fractional last epoch reaches back into the previous one): the
    # agents' recovery reports, and so their prompts and LLM cache keys, stay the same.
    recent: deque[float]
    epoch_losses: list[float] = field(default_factory=list)
    step: int = 0
    epoch: int = 0  # completed epochs
    seconds_before: float = 0.0  # spent by the interrupted runs this one resumes
    started: float = field(default_factory=time.perf_counter)
    resumed_from_epoch: int | None = None

    def seconds(self) -> float:
        """Training seconds so far, the interrupted runs' included."""
        return self.seconds_before + time.perf_counter() - self.started


def _no_log(_message: str) -> None:
    """The log of a run without one (and of every rank but 0)."""


def _untrained_report() -> dict[str, Any]:
    """The report of a run with ``epochs <= 0``: nothing trained."""
    return {
        "steps": 0,
        "epoch_loss": [],
        "final_loss": float("nan"),
        "seconds": 0.0,
        "distill": False,
    }


def _step_counts(
    cfg: TrainConfig, n_train: int, info: distributed.DistInfo
) -> tuple[int, int, int]:
    """Per-rank batch size, batches per epoch and optimizer steps of the whole run.

    ``cfg.batch_size`` is the global batch: under DDP each rank takes its share of it, on its
    shard of the data.
    """
    batch_size = cfg.batch_size
    if info.enabled:
        batch_size = max(1, cfg.batch_size // info.world_size)
    shard = math.ceil(n_train / info.world_size)
    batches_per_epoch = math.ceil(shard / batch_size)
    return batch_size, batches_per_epoch, max(1, int(round(cfg.epochs * batches_per_epoch)))


def _open_checkpoint(
    directory: Path | None,
    model: nn.Module,
    cfg: TrainConfig,
    seed: int,
    n_train: int,
    info: distributed.DistInfo,
    masks: dict[str, torch.Tensor] | None,
    extra: Any,
    log: Callable[[str], None],
) -> tuple[str, dict[str, Any] | None]:
    """The run's fingerprint ("" without a checkpoint directory) and the checkpoint to resume
    from (None: start afresh). The fingerprint covers ``model``'s weights as passed in."""
    if directory is None:
        return "", None
    fp = fingerprint(model, cfg, seed, n_train, info.world_size, masks, extra)
    if not cfg.resume:
        return fp, None
    # Every rank reads the file rank 0 wrote (one node, one file system).
    return fp, load_checkpoint(directory, fp, log)


def _apply_drop_path(
    model: nn.Module, rate: float, log: Callable[[str], None]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Set the drop-path schedule for training; returns what :func:`restore_modules` puts back."""
    if rate <= 0:  # leave the model as built (the pruned models are rebuilt without drop path)
        return []
    saved = set_drop_path(model, rate)
    if not saved:
        log("drop_path: the model has no drop-path slots; the setting has no effect")
    return saved


def _wrap(
    model: nn.Module, cfg: TrainConfig, info: distributed.DistInfo, dev: torch.device
) -> nn.Module:
    """What a step calls: ``model`` in DDP under torchrun, compiled when ``cfg.compile``."""
    net: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return torch.compile(net) if cfg.compile else net  # type: ignore[return-value]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices, none on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )


def _set_up(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    seed: int,
    teacher: nn.Module | None,
    masks: dict[str, torch.Tensor] | None,
    info: distributed.DistInfo,
    log: Callable[[str], None],
) -> _Run:
    """Put ``model`` (and the teacher) on the device in training form and build the optimizer,
    gradient scaler, EMA, augmentation generator and recipe around it, at step 0."""
    dev = distributed.device(info) if info.enabled else device()
    use_kd = bool(cfg.distill.get("enabled")) and teacher is not None
    batch_size, batches_per_epoch, total = _step_counts(cfg, len(train_set), info)  # type: ignore[arg-type]
    drop_path_saved = _apply_drop_path(model, cfg.drop_path, log)
    model.to(dev).train()
    channels_last = use_channels_last(cfg.channels_last, model, dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if use_kd:
        teacher.to(dev).eval()  # type: ignore[union-attr]
    forward = _wrap(model, cfg, info, dev)
    opt = _optimizer(model, cfg)
    dtype = amp_dtype(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    ema = make_ema(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    recipe = Recipe(cfg, model, dev, gen, teacher if use_kd else None)
    return _Run(
        cfg=cfg,
        info=info,
        dev=dev,
        seed=seed,
        train_set=train_set,
        model=model,
        forward=forward,
        opt=opt,
        scaler=scaler,
        ema=ema,
        gen=gen,
        recipe=recipe,
        dtype=dtype,
        channels_last=channels_last,
        drop_path_saved=drop_path_saved,
        masks=masks,
        use_kd=use_kd,
        batch_size=batch_size,
        total=total,
        recent=deque(maxlen=batches_per_epoch),
    )


def _resume(
    run: _Run, state: dict[str, Any], directory: Path | None, log: Callable[[str], None]
) -> None:
    """Restore ``run`` to where the checkpoint ``state`` left it (the model's weights were loaded
    before set-up)."""
    run.opt.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.module.load_state_dict(state["ema"])
    set_rng_state(state["rng"][run.info.rank], run.gen)
    run.epoch_losses = list(state["epoch_losses"])
    run.recent.extend(float(v) for v in state["recent_losses"])
    run.step, run.epoch = int(state["step"]), int(state["epoch"])
    run.seconds_before = float(state.get("seconds", 0.0))
    run.resumed_from_epoch = run.epoch
    log(f"resumed from epoch {run.epoch} (step {run.step}/{run.total}) of checkpoint {directory}")


def _optimizer_step(run: _Run, loss: torch.Tensor) -> None:
    """Backward pass, gradient clipping and the update (through the fp16 scaler when there is
    one)."""
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)  # clip the true gradients
    else:
        loss.backward()
    if run.cfg.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on the batch ``(x, y)``; returns its loss."""
    x = x.to(run.dev, non_blocking=True)
    y = y.to(run.dev, non_blocking=True)
    x, y = run.recipe.inputs(x, y)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, run.total, run.cfg)
    dtype = run.dtype
    with torch.autocast(run.dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = run.forward(x)
        loss = run.recipe.loss(logits, x, y)
    _optimizer_step(run, loss)
    apply_masks(run.model, run.masks)
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
        apply_masks(run.ema.module, run.masks)
    return float(loss.detach())


def _train_epoch(run: _Run, bar: Any, log: Callable[[str], None]) -> None:
    """One pass over this rank's shard, cut short at the run's last step, and the epoch's loss
    (the same on every rank)."""
    loader = _epoch_loader(
        run.train_set,
        run.batch_size,
        run.seed,
        run.epoch,
        run.info,
        run.cfg.workers,
        run.dev.type == "cuda",
    )
    for x, y in loader:
        if run.step >= run.total:
            break
        run.recent.append(_train_step(run, x, y))
        run.step += 1
        bar.update(1)
    run.epoch_losses.append(
        distributed.mean_over_ranks(float(np.mean(run.recent)), run.info, run.dev)
    )
    log(f"epoch {run.epoch}: loss {run.epoch_losses[-1]:.4f} ({run.step}/{run.total} steps)")
    run.epoch += 1


def _train_epochs(
    run: _Run,
    directory: Path | None,
    fp: str,
    progress: bool,
    log: Callable[[str], None],
    on_epoch_end: Callable[[int], None] | None,
) -> None:
    """Epochs until the run's last step, each followed by its checkpoint (with a directory) and
    ``on_epoch_end`` (rank 0)."""
    from tqdm import tqdm

    run.started = time.perf_counter()
    bar = tqdm(total=run.total, initial=run.step, desc="train", disable=not progress, leave=False)
    while run.step < run.total:
        _train_epoch(run, bar, log)
        if directory is not None:
            _checkpoint(directory, fp, run, log)
        if on_epoch_end is not None and run.info.is_main:
            on_epoch_end(run.epoch)
    bar.close()


def _finish(run: _Run) -> dict[str, Any]:
    """Hand the model back as built, holding the result (the EMA when kept), in eval mode, and
    report the run."""
    restore_modules(run.drop_path_saved)
    if run.ema is not None:
        # The EMA is the result: it is what gets saved and evaluated.
        run.model.load_state_dict(run.ema.module.state_dict())
    if run.channels_last:
        run.model.to(memory_format=torch.contiguous_format)
    run.model.eval()
    return {
        "steps": run.total,
        "epoch_loss": run.epoch_losses,
        "final_loss": run.epoch_losses[-1] if run.epoch_losses else float("nan"),
        "seconds": run.seconds(),
        "distill": run.use_kd,
        "distill_kind": run.recipe.mode if run.use_kd else None,
        "ema": run.ema is not None,
        "mixup": run.cfg.mixup_enabled,
        "amp": str(run.dtype).removeprefix("torch.") if run.dtype else "off",
        "channels_last": run.channels_last,
        "world_size": run.info.world_size,
        "resumed_from_epoch": run.resumed_from_epoch,
    }


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    seed: int,
    teacher: nn.Module | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint_extra: Any = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: the model
    is wrapped in DDP, each rank trains on its shard of every epoch, ``cfg.batch_size`` is the
    global batch (split evenly over the ranks), and only rank 0 logs and writes checkpoints.

    Args:
        model: the model to train.
        train_set: training examples.
        cfg: hyperparameters.
        seed: seeds shuffling, augmentation and dropout.
        teacher: optional distillation teacher (used when ``cfg.distill['enabled']``).
        masks: optional unstructured masks that stay applied through training.
        progress: show a tqdm progress bar.
        log: optional callable receiving one line per epoch.
        checkpoint_dir: where to keep the per-epoch checkpoint; a checkpoint of this same run
            found there is resumed (when ``cfg.resume``). None: no checkpoints.
        fingerprint_extra: JSON-able identity of inputs that ``model`` and ``cfg`` do not show
            (e.g. the teacher), part of the checkpoint fingerprint.
        on_epoch_end: called on rank 0 with the number of completed epochs after each epoch,
            once that epoch's checkpoint (if any) is on disk; the other ranks wait for it at
            their next collective. Tests use it to kill a run between epochs.

    Returns:
        A report: per-epoch mean loss, steps, seconds, and which features were on.
    """
    if cfg.epochs <= 0:
        return _untrained_report()
    info = distributed.init_from_env()
    if not info.is_main:
        log, progress = None, False
    print_fn = log or _no_log
    # Rank 0 keeps the plain seed, so a one-process run is the same with or without this code;
    # the other ranks get their own dropout, augmentation and mixup draws.
    seed_everything(seed + 1_000_003 * info.rank)
    if cfg.randaug:
        train_set = RandAugmentDataset(train_set, cfg.randaug, _image_size(train_set))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    n_train = len(train_set)  # type: ignore[arg-type]
    fp, resumed = _open_checkpoint(
        ckpt_dir, model, cfg, seed, n_train, info, masks, fingerprint_extra, print_fn
    )
    if resumed is not None:
        # Before set-up, so that the EMA starts from and DDP broadcasts the resumed weights.
        model.load_state_dict(resumed["model"])
    run = _set_up(model, train_set, cfg, seed, teacher, masks, info, print_fn)
    if resumed is not None:
        _resume(run, resumed, ckpt_dir, print_fn)
    _train_epochs(run, ckpt_dir, fp, progress, print_fn, on_epoch_end)
    return _finish(run)


def _checkpoint(directory: Path, fp: str, run: _Run, log: Callable[[str], None]) -> None:
    """Save the state after ``run.epoch`` completed epochs (rank 0 writes; every rank's RNG in
    it)."""
    rngs = distributed.gather_objects(rng_state(run.gen), run.info)
    if run.info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fp,
            "epoch": run.epoch,
            "step": run.step,
            "epoch_losses": list(run.epoch_losses),
            "recent_losses": list(run.recent),
            "seconds": run.seconds(),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.opt.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "ema": (
                {k: v.detach().cpu() for k, v in run.ema.module.state_dict().items()}
                if run.ema is not None
                else {}
            ),
            "rng": rngs,
        }
        path = save_checkpoint(directory, state)
        log(f"checkpoint of epoch {run.epoch} (step {run.step}) written to {path}")
    distributed.barrier(run.info)
