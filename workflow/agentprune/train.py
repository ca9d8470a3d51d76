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
  ``torch.load(weights_only=True)`` (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
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

# Test hook: a run with this variable set to k kills itself (SIGKILL) right after writing the
# checkpoint of its k-th completed epoch, to test resuming. Never set it outside tests.
KILL_AFTER_EPOCH_ENV = "AGENTPRUNE_TEST_KILL_AFTER_EPOCH"
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


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (the ``finetune`` / ``base_training`` config
    sections).

    The defaults reproduce the plain recipe: no mixup, RandAugment, erasing, drop path or EMA;
    AMP and channels_last only on GPU (``auto``). ``mixup``/``cutmix`` are the Beta alphas,
    ``ema`` the EMA decay (None: no EMA), ``drop_path`` the deepest block's stochastic-depth rate
    (0: the model as built), ``distill`` holds ``enabled``, ``alpha``, ``temperature``, ``kind``
    (soft|hard) and ``teacher`` (a timm name; None: the base model).
    """

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
    # Recipe features (DeiT / the pruning papers' fine-tuning recipe); the names are the
    # ``finetune`` config keys.
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug: str | None = None
    random_erase: float = 0.0
    drop_path: float = 0.0
    ema: float | None = None
    # Systems features.
    amp: str | bool = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    workers: int = 0
    resume: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TrainConfig:
        """Build from a config section, ignoring keys that are not hyperparameters."""
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def mixup_enabled(self) -> bool:
        """Whether mixup or cutmix mixes the batches."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    @property
    def ema_enabled(self) -> bool:
        """Whether an EMA of the weights is kept (and becomes the result)."""
        return self.ema is not None and 0 < self.ema < 1


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
        self.mode = str(cfg.distill.get("kind", "soft"))
        if self.mode not in ("soft", "hard"):
            raise ValueError(f"finetune.distill.kind={self.mode!r} is not one of soft, hard")
        self.alpha = float(cfg.distill.get("alpha", 0.5))
        self.temperature = float(cfg.distill.get("temperature", 2.0))
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

    Returns:
        A report: per-epoch mean loss, steps, seconds, and which features were on.
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
    info = distributed.init_from_env()
    if not info.is_main:
        log, progress = None, False
    # Rank 0 keeps the plain seed, so a one-process run is the same with or without this code;
    # the other ranks get their own dropout, augmentation and mixup draws.
    seed_everything(seed + 1_000_003 * info.rank)
    dev = distributed.device(info) if info.enabled else device()
    if cfg.randaug:
        train_set = RandAugmentDataset(train_set, cfg.randaug, _image_size(train_set))
    use_kd = bool(cfg.distill.get("enabled")) and teacher is not None
    batch_size = cfg.batch_size
    if info.enabled:
        batch_size = max(1, cfg.batch_size // info.world_size)
    shard = math.ceil(len(train_set) / info.world_size)  # type: ignore[arg-type]
    batches_per_epoch = math.ceil(shard / batch_size)
    total = max(1, int(round(cfg.epochs * batches_per_epoch)))

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    print_fn = log or (lambda _msg: None)
    resumed: dict[str, Any] | None = None
    fp = ""
    if ckpt_dir is not None:
        fp = fingerprint(
            model, cfg, seed, len(train_set), info.world_size, masks, fingerprint_extra
        )
        if cfg.resume:
            # Every rank reads the file rank 0 wrote (one node, one file system).
            resumed = load_checkpoint(ckpt_dir, fp, log)
    if resumed is not None:
        model.load_state_dict(resumed["model"])

    # 0 leaves the model as built (the pruned models are rebuilt without drop path).
    drop_path_saved = set_drop_path(model, cfg.drop_path) if cfg.drop_path > 0 else []
    if cfg.drop_path > 0 and not drop_path_saved:
        print_fn("drop_path: the model has no drop-path slots; the setting has no effect")
    model.to(dev).train()
    channels_last = use_channels_last(cfg.channels_last, model, dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if use_kd:
        teacher.to(dev).eval()  # type: ignore[union-attr]
    net: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    forward = torch.compile(net) if cfg.compile else net

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
    dtype = amp_dtype(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    ema = make_ema(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    recipe = Recipe(cfg, model, dev, gen, teacher if use_kd else None)

    epoch_losses: list[float] = []
    # An epoch's loss is the mean of the last batches_per_epoch step losses, as before
    # checkpoints existed (a fractional last epoch reaches back into the previous one): the
    # agents' recovery reports, and so their prompts and LLM cache keys, stay the same.
    recent: deque[float] = deque(maxlen=batches_per_epoch)
    step = 0
    epoch = 0
    seconds_before = 0.0
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resumed["ema"])
        set_rng_state(resumed["rng"][info.rank], gen)
        epoch_losses = list(resumed["epoch_losses"])
        recent.extend(float(v) for v in resumed["recent_losses"])
        step, epoch = int(resumed["step"]), int(resumed["epoch"])
        seconds_before = float(resumed.get("seconds", 0.0))
        print_fn(f"resumed from epoch {epoch} (step {step}/{total}) of checkpoint {ckpt_dir}")
    kill_after = int(os.environ.get(KILL_AFTER_EPOCH_ENV, "0") or 0)

    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, leave=False)
    while step < total:
        loader = _epoch_loader(
            train_set, batch_size, seed, epoch, info, cfg.workers, dev.type == "cuda"
        )
        for x, y in loader:
            if step >= total:
                break
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            x, y = recipe.inputs(x, y)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = forward(x)
                loss = recipe.loss(logits, x, y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # clip the true gradients
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            apply_masks(model, masks)
            if ema is not None:
                ema.update(model, step=step)
                apply_masks(ema.module, masks)
            recent.append(float(loss.detach()))
            step += 1
            bar.update(1)
        epoch_losses.append(distributed.mean_over_ranks(float(np.mean(recent)), info, dev))
        print_fn(f"epoch {epoch}: loss {epoch_losses[-1]:.4f} ({step}/{total} steps)")
        epoch += 1
        if ckpt_dir is not None:
            _checkpoint(
                ckpt_dir,
                fp,
                model,
                opt,
                scaler,
                ema,
                gen,
                info,
                epoch,
                step,
                epoch_losses,
                list(recent),
                seconds_before + time.perf_counter() - start,
                print_fn,
            )
            if kill_after and epoch == kill_after and info.is_main:
                print_fn(f"{KILL_AFTER_EPOCH_ENV}={kill_after}: killing this process (test hook)")
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    restore_modules(drop_path_saved)
    if ema is not None:
        # The EMA is the result: it is what gets saved and evaluated.
        model.load_state_dict(ema.module.state_dict())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return {
        "steps": total,
        "epoch_loss": epoch_losses,
        "final_loss": epoch_losses[-1] if epoch_losses else float("nan"),
        "seconds": seconds_before + time.perf_counter() - start,
        "distill": use_kd,
        "distill_kind": recipe.mode if use_kd else None,
        "ema": ema is not None,
        "mixup": cfg.mixup_enabled,
        "amp": str(dtype).removeprefix("torch.") if dtype else "off",
        "channels_last": channels_last,
        "world_size": info.world_size,
        "resumed_from_epoch": int(resumed["epoch"]) if resumed is not None else None,
    }


def _checkpoint(
    directory: Path,
    fp: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    ema: Any,
    gen: torch.Generator,
    info: distributed.DistInfo,
    epoch: int,
    step: int,
    epoch_losses: list[float],
    recent_losses: list[float],
    seconds: float,
    log: Callable[[str], None],
) -> None:
    """Save the state after ``epoch`` completed epochs (rank 0 writes; every rank's RNG in it)."""
    rngs = distributed.gather_objects(rng_state(gen), info)
    if info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fp,
            "epoch": epoch,
            "step": step,
            "epoch_losses": list(epoch_losses),
            "recent_losses": recent_losses,
            "seconds": seconds,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "ema": (
                {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
                if ema is not None
                else {}
            ),
            "rng": rngs,
        }
        path = save_checkpoint(directory, state)
        log(f"checkpoint of epoch {epoch} (step {step}) written to {path}")
    distributed.barrier(info)
