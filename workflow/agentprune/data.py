"""Data sets, deterministic splits, calibration subsets and loaders.

Every data set is exposed as three splits (train / val / test). The split itself is a property of
the data set (seeded by ``dataset.split_seed``) so that every run of a study is evaluated on the
same test images; run-level randomness (shuffling, calibration subsets) is seeded from the run's
seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from agentprune.settings import DataSettings

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet")
# Fixed class counts; imagenet is absent on purpose: an ImageFolder's classes are its folders.
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
# Channel statistics used to normalise inputs (ImageNet values, as timm uses for its pretrained
# models).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data set is missing, malformed or misconfigured."""


@dataclass
class Splits:
    """The three splits of a data set plus what models need to know about it."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    img_size: int

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def num_classes(cfg: DataSettings) -> int:
    """Number of classes of the configured data set.

    An ImageFolder's classes are its folders (a subset of ImageNet is as valid as the full 1000),
    so imagenet counts them instead of trusting ``NUM_CLASSES``.
    """
    if cfg.name == "synthetic":
        return int(cfg.synthetic_classes)
    if cfg.name == "imagenet":
        return len(check_image_folder(cfg))
    return NUM_CLASSES[cfg.name]


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test indices: each class is split in the same proportions.

    Per class, a permutation seeded from ``seed`` assigns ``round(n * test_fraction)`` examples to
    test, ``round(n * val_fraction)`` to val and the rest to train.
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits as (images [n, 8, 8] in 0..16, labels [n]).

    Reads the CSV that scikit-learn ships (what ``sklearn.datasets.load_digits`` reads) without
    importing ``sklearn.datasets``, whose imports cost about a second in every pipeline job.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(cfg: DataSettings) -> Splits:
    """sklearn's bundled 8x8 digits, upsampled bilinearly to ``img_size`` and replicated to RGB."""
    pixels, labels = digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    size = int(cfg.img_size)
    images = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False
    )
    images = images.repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (images - mean) / std
    train, val, test = stratified_split(
        labels, cfg.val_fraction, cfg.test_fraction, int(cfg.split_seed)
    )
    full = TensorDataset(images, torch.as_tensor(labels))
    return Splits(Subset(full, train), Subset(full, val), Subset(full, test), 10, size)


def _synthetic(cfg: DataSettings) -> Splits:
    """Seeded random tensors: for structural runs (MACs targets) without any data."""
    size = int(cfg.img_size)
    classes = num_classes(cfg)
    n = int(cfg.synthetic_samples)
    gen = torch.Generator().manual_seed(int(cfg.split_seed))
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    full = TensorDataset(x, y)
    n_test = max(1, int(n * cfg.test_fraction))
    n_val = max(1, int(n * cfg.val_fraction))
    idx = np.arange(n)
    return Splits(
        Subset(full, idx[n_test + n_val :]),
        Subset(full, idx[n_test : n_test + n_val]),
        Subset(full, idx[:n_test]),
        classes,
        size,
    )


def _torchvision_transforms(size: int, train: bool):
    """CIFAR's transforms: the 32 px images are resized (not cropped away) to ``size``."""
    import torchvision.transforms as T

    ops = (
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if train
        else [
            T.Resize(int(size / 0.875)),
            T.CenterCrop(size),
        ]
    )
    return T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _cifar(cfg: DataSettings, download: bool) -> Splits:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(cfg.root or "data")
    size = int(cfg.img_size)
    where = f"dataset.root={str(root)!r}"
    try:
        train_full = cls(
            root, train=True, download=download, transform=_torchvision_transforms(size, True)
        )
        eval_full = cls(
            root, train=True, download=False, transform=_torchvision_transforms(size, False)
        )
        test = cls(
            root, train=False, download=download, transform=_torchvision_transforms(size, False)
        )
    except RuntimeError as err:
        # torchvision's "Dataset not found or corrupted": compute jobs never download, so the
        # hint points at the rule that does.
        raise DataError(
            f"{where}: {cfg.name} not found or corrupt; the download_data rule fetches it "
            f"(needs internet) ({_first_line(err)})"
        ) from err
    except OSError as err:  # no network, disk full, permission denied while downloading
        raise DataError(f"{where}: cannot download {cfg.name} ({_first_line(err)})") from err
    labels = np.asarray(train_full.targets)
    rng = np.random.default_rng(int(cfg.split_seed))
    perm = rng.permutation(len(labels))
    n_val = int(len(labels) * cfg.val_fraction)
    return Splits(
        Subset(train_full, np.sort(perm[n_val:])),
        Subset(eval_full, np.sort(perm[:n_val])),
        test,
        NUM_CLASSES[cfg.name],
        size,
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# What torchvision's ImageFolder accepts as an image (its IMG_EXTENSIONS), repeated here so that
# the structure check needs no torchvision import.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(root: Path, sub: str) -> list[str]:
    """Sorted class folder names of ``root/sub``; a one-line DataError if there are none."""
    classes = sorted(e.name for e in os.scandir(root / sub) if e.is_dir())
    if not classes:
        raise DataError(
            f"dataset.root={str(root)!r}: {sub}/ has no class folders "
            f"(expected {sub}/<class>/<image>)"
        )
    return classes


def _has_image(folder: Path) -> bool:
    # scandir is lazy, so this stops at the first image instead of listing the ~1300 files of each
    # of ImageNet's 1000 classes (the loaders list them once, later).
    with os.scandir(folder) as entries:
        subfolders = []
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                return True
    return any(_has_image(Path(sub)) for sub in subfolders)


def _imagenet_root(cfg: DataSettings) -> Path:
    from agentprune.config import IMAGENET_ENV

    # The entry point resolved dataset.root (else $AGENTPRUNE_IMAGENET) before any step.
    root = cfg.root
    if not root:
        raise DataError(
            f"dataset.root is not set (nor ${IMAGENET_ENV}): imagenet needs an ImageFolder with "
            "train/ and val/ inside"
        )
    return Path(root).expanduser()


def check_image_folder(cfg: DataSettings) -> list[str]:
    """Check that ``dataset.root`` is an ImageNet-style ImageFolder and return its class names.

    Checks, each failing with a one-line :class:`DataError` naming ``dataset.root``: the root is
    set and holds ``train/`` and ``val/``; both have the same class folders; every class folder
    holds at least one image. Image files are not decoded (that is the loaders' job).

    Args:
        cfg: the ``dataset`` section of the config.

    Returns:
        The class names (folder names, sorted as ImageFolder sorts them).

    Raises:
        DataError: if the tree is missing or malformed.
    """
    root = _imagenet_root(cfg)
    missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
    if missing:
        absent = " and no ".join(f"{sub}/" for sub in missing)
        what = "does not exist" if not root.exists() else f"has no {absent}"
        raise DataError(
            f"dataset.root={str(root)!r}: expected an ImageFolder with train/ and val/ inside "
            f"({what})"
        )
    train, val = _class_dirs(root, "train"), _class_dirs(root, "val")
    if len(train) != len(val):
        raise DataError(
            f"dataset.root={str(root)!r}: val/ has {len(val)} classes but train/ has {len(train)}"
        )
    if train != val:
        only = sorted(set(val) ^ set(train))[0]
        side = "val/" if only in val else "train/"
        raise DataError(
            f"dataset.root={str(root)!r}: train/ and val/ have different class folders "
            f"({only!r} only in {side})"
        )
    for sub in ("train", "val"):
        for name in train:
            if not _has_image(root / sub / name):
                raise DataError(f"dataset.root={str(root)!r}: no images in {sub}/{name}")
    return train


def default_data_config(img_size: int) -> dict[str, Any]:
    """timm's default data config (interpolation, mean/std, crop) at ``img_size``.

    Used for models without a pretrained data config of their own (models trained from scratch).
    """
    from timm.data import resolve_data_config

    return dict(resolve_data_config({"input_size": (3, img_size, img_size)}))


def _timm_transform(data_config: dict[str, Any], train: bool):
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    kwargs = {k: data_config[k] for k in keys if data_config.get(k) is not None}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    return create_transform(**kwargs, is_training=train)


class _Transformed(Dataset):
    """``(transform(image), label)`` of a dataset of ``(PIL image, label)`` pairs."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def _imagenet(cfg: DataSettings, data_config: dict[str, Any] | None) -> Splits:
    import torchvision

    classes = check_image_folder(cfg)
    root = _imagenet_root(cfg)
    size = int(cfg.img_size)
    # The model's own config decides interpolation, mean/std and crop, but the size is the data
    # set's: every model of a study sees the same pixels count (overrides set img_size to match).
    dc = {**(data_config or default_data_config(size)), "input_size": (3, size, size)}
    # train/ is listed once (1.28M files on ImageNet) and shared by the train and val splits, which
    # differ only in their transform.
    images = torchvision.datasets.ImageFolder(root / "train")
    train_full = _Transformed(images, _timm_transform(dc, True))
    eval_full = _Transformed(images, _timm_transform(dc, False))
    test = torchvision.datasets.ImageFolder(root / "val", _timm_transform(dc, False))
    rng = np.random.default_rng(int(cfg.split_seed))
    perm = rng.permutation(len(train_full))
    n_val = min(int(len(perm) * cfg.val_fraction), int(cfg.max_val_images))
    return Splits(
        Subset(train_full, np.sort(perm[n_val:])),
        Subset(eval_full, np.sort(perm[:n_val])),
        test,
        len(classes),
        size,
    )


def load_splits(
    cfg: DataSettings, download: bool = False, data_config: dict[str, Any] | None = None
) -> Splits:
    """Build the configured data set's train/val/test splits.

    Args:
        cfg: the ``dataset`` section of the config.
        download: whether data sets that can be downloaded (CIFAR) may be fetched. Only the
            ``download_data`` rule (a local rule, on the login node) passes True; compute jobs
            never download.
        data_config: timm data config of the model the splits feed (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, as returned by
            ``timm.data.resolve_data_config`` and recorded by ``models.data_config``). Used by
            imagenet only, whose transforms are timm's; None means timm's defaults.

    Returns:
        The splits.

    Raises:
        DataError: if the data set is unknown, missing or malformed.
    """
    name = cfg.name
    if name == "digits":
        return _digits(cfg)
    if name == "synthetic":
        return _synthetic(cfg)
    if name in ("cifar10", "cifar100"):
        return _cifar(cfg, download)
    if name == "imagenet":
        return _imagenet(cfg, data_config)
    raise DataError(f"dataset.name={name!r} is not one of {', '.join(DATASETS)}")


def describe(cfg: DataSettings, splits: Splits) -> dict[str, Any]:
    """A JSON-able description of a data set, written by the download rule."""
    out: dict[str, Any] = {
        "name": cfg.name,
        "img_size": splits.img_size,
        "num_classes": splits.num_classes,
        "splits": splits.sizes(),
        "split_seed": int(cfg.split_seed),
    }
    if cfg.name == "imagenet":
        out["root"] = str(_imagenet_root(cfg).resolve())
    test = splits.test
    if isinstance(test, Subset):
        digest = np.asarray(test.indices, dtype=np.int64)
        out["test_indices_sha1"] = hashlib.sha1(digest.tobytes()).hexdigest()
    return out


def loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling order is a pure function of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=workers,
        drop_last=False,
    )


def calibration_batches(
    dataset: Dataset, n_batches: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random subset of ``dataset`` as a list of ``n_batches`` batches (drawn without
    replacement
    while the data set lasts)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(dataset), generator=gen).tolist()
    need = n_batches * batch_size
    idx = (perm * (need // max(1, len(perm)) + 1))[:need]
    batches = []
    for b in range(n_batches):
        xs, ys = zip(*(dataset[i] for i in idx[b * batch_size : (b + 1) * batch_size]))
        batches.append((torch.stack(xs), torch.as_tensor(ys)))
    return batches


def example_inputs(img_size: int, batch: int = 1) -> torch.Tensor:
    """A deterministic dummy input for graph tracing and MACs counting."""
    return torch.zeros(batch, 3, img_size, img_size)
