"""ImageNet as an ImageFolder: timm's transforms, class count from the folders, one-line errors,
and the smoke workflow end to end on a tiny generated tree (3 classes of a few JPEGs)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from agentprune import data
from agentprune.config import apply_environment
from agentprune.settings import DataSettings
from conftest import data_settings
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 4


def make_image_folder(root: Path, classes: tuple[str, ...] = CLASSES) -> Path:
    """Write ``root/{train,val}/<class>/*.JPEG``: noisy images tinted by class, odd sizes."""
    rng = np.random.default_rng(0)
    for sub, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(classes):
            folder = root / sub / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 96, size=(36 + i, 44, 3))
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


def imagenet_section(root: Path | str | None, **extra: object) -> dict:
    return {
        "name": "imagenet",
        "root": None if root is None else str(root),
        "img_size": 32,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "split_seed": 0,
        "max_val_images": 10000,
        **extra,
    }


def imagenet_cfg(root: Path | str | None, **extra: object) -> DataSettings:
    return data_settings(**imagenet_section(root, **extra))


def test_splits_come_from_the_folder(fake_imagenet: Path) -> None:
    cfg = imagenet_cfg(fake_imagenet)
    splits = data.load_splits(cfg)
    assert splits.num_classes == data.num_classes(cfg) == 3  # folders, not NUM_CLASSES
    n_train = len(CLASSES) * TRAIN_PER_CLASS
    assert splits.sizes() == {"train": n_train - 6, "val": 6, "test": len(CLASSES) * VAL_PER_CLASS}
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and y == 0
    desc = data.describe(cfg, splits)
    assert desc["num_classes"] == 3 and desc["root"] == str(fake_imagenet.resolve())


def test_eval_transform_is_timms_resize_crop_normalise(fake_imagenet: Path) -> None:
    """val/ images go through resize(floor(size / crop_pct)), center crop, mean/std, as in timm."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    path = fake_imagenet / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG"
    image = Image.open(path).convert("RGB")
    # A pretrained model's own config (deit_tiny's crop_pct is 0.9, vit augreg's mean is 0.5).
    model_config = {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    for config, crop_pct, mean, std in (
        (None, 0.875, data.IMAGENET_MEAN, data.IMAGENET_STD),
        (model_config, 0.9, (0.5,) * 3, (0.5,) * 3),
    ):
        x, _ = data.load_splits(imagenet_cfg(fake_imagenet), data_config=config).test[0]
        resized = F.resize(
            F.pil_to_tensor(image), math.floor(32 / crop_pct), InterpolationMode.BICUBIC
        )
        expected = F.normalize(F.to_dtype(F.center_crop(resized, 32), scale=True), mean, std)
        assert x.shape == (3, 32, 32)  # the data set's size wins over the model config's 224
        assert torch.allclose(x, expected, atol=0.02), (x - expected).abs().max()


def error_of(cfg: DataSettings) -> str:
    with pytest.raises(data.DataError) as err:
        data.load_splits(cfg)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_missing_or_malformed_tree_gets_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTPRUNE_IMAGENET", raising=False)
    assert error_of(imagenet_cfg(None)).startswith("dataset.root is not set")
    missing = tmp_path / "x"
    assert error_of(imagenet_cfg(missing)) == (
        f"dataset.root={str(missing)!r}: expected an ImageFolder with train/ and val/ inside "
        "(does not exist)"
    )

    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    assert "(has no val/)" in error_of(imagenet_cfg(only_train))

    five = make_image_folder(tmp_path / "five", ("a", "b", "c", "d", "e"))
    for name in ("d", "e"):
        shutil.rmtree(five / "val" / name)
    assert error_of(imagenet_cfg(five)).endswith("val/ has 3 classes but train/ has 5")

    renamed = make_image_folder(tmp_path / "renamed", ("a", "b"))
    (renamed / "val" / "b").rename(renamed / "val" / "z")
    assert "different class folders ('b' only in train/)" in error_of(imagenet_cfg(renamed))

    empty = make_image_folder(tmp_path / "empty", ("a", "b"))
    for image in (empty / "train" / "b").iterdir():
        image.unlink()
    (empty / "train" / "b" / "notes.txt").write_text("not an image")
    assert error_of(imagenet_cfg(empty)).endswith("no images in train/b")

    flat = tmp_path / "flat"
    for sub in ("train", "val"):
        (flat / sub).mkdir(parents=True)
    assert "train/ has no class folders" in error_of(imagenet_cfg(flat))


def test_root_from_the_environment(fake_imagenet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPRUNE_IMAGENET", str(fake_imagenet))
    # The entry point reads the variable into dataset.root before any step runs.
    config = apply_environment({"dataset": imagenet_section(None)})
    assert data.num_classes(data_settings(**config["dataset"])) == 3


def test_cifar_is_never_downloaded_outside_the_download_rule(tmp_path: Path) -> None:
    cfg = imagenet_cfg(tmp_path, name="cifar10")
    message = error_of(cfg)  # load_splits' default: download=False, as in every compute job
    assert message.startswith(f"dataset.root={str(tmp_path)!r}: cifar10 not found or corrupt")
    assert "download_data rule" in message
    assert not any(tmp_path.iterdir()), "a compute job wrote into the data directory"


def test_smoke_workflow_on_imagenet_folder(fake_imagenet: Path, tmp_path: Path) -> None:
    """The smoke grid, reduced to one method and seed, through the imagenet code path, with a
    second model that starts from a local pretrained file (download_weights, no training)."""
    import yaml
    from agentprune import models
    from safetensors.torch import save_file
    from smoke import SMOKE, run_snakemake

    vit = yaml.safe_load(SMOKE.read_text())["models"][0]
    torch.manual_seed(1)
    pretrained = models.create(vit["timm"], len(CLASSES), vit["overrides"])
    file = tmp_path / "tiny_in3.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(file))
    workdir = tmp_path / "work"
    overrides = {
        "dataset": {"name": "imagenet", "root": str(fake_imagenet), "img_size": 32},
        "models": [vit, {**vit, "name": "vitp", "pretrained": True, "pretrained_file": str(file)}],
        "methods": ["isomorphic"],
        "seeds": [0],
    }
    jobs = run_snakemake(workdir, overrides=overrides)
    assert jobs["download_data"] == 1 and jobs["download_model"] == 2 and jobs["evaluate"] == 2

    results = workdir / "results"
    assert json.loads((results / "imagenet" / "dataset.json").read_text())["num_classes"] == 3
    weights = json.loads((results / "weights" / "vitp.json").read_text())
    assert weights["sha256"] == models.sha256(file)
    assert not (results / "weights" / "vit.json").exists()  # trained here: nothing to fetch
    for name in ("vit", "vitp"):
        base = json.loads((results / "imagenet" / name / "base" / "metrics.json").read_text())
        assert base["num_classes"] == 3
        run = results / "imagenet" / name / "isomorphic" / "r0.3" / "s0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["dataset"] == "imagenet" and 0 <= metrics["top1"] <= 100
        _, desc = models.load(run / "finetuned")
        assert desc["num_classes"] == 3
    base = json.loads((results / "imagenet" / "vitp" / "base" / "metrics.json").read_text())
    assert base["head"] == "pretrained" and "train" not in base
    assert base["pretrained_sha256"] == models.sha256(file)


def test_bad_root_fails_in_download_data_before_any_training(tmp_path: Path) -> None:
    from smoke import run_snakemake

    fake = make_image_folder(tmp_path / "bad", ("a", "b"))
    for image in (fake / "val" / "b").iterdir():
        image.unlink()
    workdir = tmp_path / "work"
    overrides = {
        "dataset": {"name": "imagenet", "root": str(fake), "img_size": 32},
        "methods": ["isomorphic"],
        "seeds": [0],
    }
    with pytest.raises(Exception):  # noqa: B017 - Snakemake's own error type varies by version
        run_snakemake(workdir, overrides=overrides)
    log = (workdir / "results" / "logs" / "imagenet" / "download_data.log").read_text()
    assert f"DataError: dataset.root={str(fake)!r}: no images in val/b" in log
    assert not list((workdir / "results").glob("imagenet/*/base/model.safetensors"))
