"""Pretrained weights: fetched into a cache, verified, checksummed, loaded bit for bit.

The hub is unreachable here, so the weights are a local file (``models[].pretrained_file``, which
timm loads through ``pretrained_cfg_overlay``): a seeded random tiny DeiT saved to disk. The
offline tests point the hub cache at an empty directory with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from agentprune import models, resolve, steps, train
from agentprune.resolve import load_config
from agentprune.settings import ConfigError
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TIMM = "deit_tiny_patch16_224"
OVERRIDES = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def weights_file(path: Path, num_classes: int = 10) -> Path:
    """A seeded random tiny DeiT's state dict, as safetensors or (``.pth``) a torch file."""
    torch.manual_seed(123)
    model = models.create(TIMM, num_classes, OVERRIDES)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def study(entry: dict[str, Any]) -> dict[str, Any]:
    """The embedded default on digits (10 classes) with one model, ``entry``."""
    model = {"name": "tiny", "timm": TIMM, "overrides": OVERRIDES, **entry}
    return load_config(ROOT / "config" / "config.yaml", overrides={"models": [model]})


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record calls of train.train instead of training (the list grows by one per call)."""
    calls: list[int] = []

    def fake_train(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        return {"seconds": 0.0}

    monkeypatch.setattr(train, "train", fake_train)
    return calls


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_same_class_count_is_loaded_bitwise_without_training(
    tmp_path: Path, no_training: list[int], suffix: str
) -> None:
    file = weights_file(tmp_path / f"weights{suffix}")
    config = study({"pretrained": True, "pretrained_file": str(file)})
    manifest = steps.download_weights(resolve.weights(config, "tiny"), tmp_path / "weights.json")
    assert manifest["sha256"] == models.sha256(file)
    assert manifest["num_classes"] == 10 and manifest["user_file"]

    stem = tmp_path / "base" / "model"
    metrics = steps.base_model(
        resolve.base_model_step(config, "tiny"),
        stem,
        tmp_path / "base" / "metrics.json",
        tmp_path / "weights.json",
    )

    assert no_training == [], "a pretrained model with the data set's class count was trained"
    assert metrics["head"] == "pretrained" and "train" not in metrics
    assert metrics["pretrained_sha256"] == models.sha256(file)
    expected = models.read_weights(file)
    saved = load_file(str(stem.with_suffix(".safetensors")))
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    loaded, desc = models.load(stem)
    assert desc["extra"]["pretrained_weights"]["sha256"] == models.sha256(file)
    assert models.data_config_of(desc)["input_size"] == [3, 32, 32]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_pretrained_other_class_count_resets_the_head_and_trains(
    tmp_path: Path, no_training: list[int]
) -> None:
    file = weights_file(tmp_path / "weights.safetensors", num_classes=5)
    config = study({"pretrained_file": str(file)})  # a file implies pretrained
    stem = tmp_path / "model"
    metrics = steps.base_model(
        resolve.base_model_step(config, "tiny"), stem, tmp_path / "metrics.json"
    )
    assert metrics["head"] == "reset" and no_training == [1]
    saved, source = load_file(str(stem.with_suffix(".safetensors"))), load_file(str(file))
    assert saved["head.weight"].shape == (10, 32)
    assert all(torch.equal(saved[k], v) for k, v in source.items() if not k.startswith("head."))


def test_configured_sha256_must_match(tmp_path: Path) -> None:
    file = weights_file(tmp_path / "weights.safetensors")
    config = study({"pretrained_file": str(file), "sha256": "ab" * 32})
    with pytest.raises(models.CheckpointError) as err:
        steps.download_weights(resolve.weights(config, "tiny"), tmp_path / "weights.json")
    message = one_line(err)
    assert "models[tiny]" in message and models.sha256(file) in message and "ab" * 32 in message
    assert not (tmp_path / "weights.json").exists()

    good = copy.deepcopy(config)
    good["models"][0]["sha256"] = models.sha256(file).upper()  # hex case does not matter
    assert steps.download_weights(resolve.weights(good, "tiny"), tmp_path / "weights.json")[
        "sha256"
    ]


def test_changed_file_after_download_is_refused(tmp_path: Path) -> None:
    file = weights_file(tmp_path / "weights.safetensors")
    config = study({"pretrained_file": str(file)})
    steps.download_weights(resolve.weights(config, "tiny"), tmp_path / "weights.json")
    weights_file(file, num_classes=7)  # replaced behind the manifest's back
    with pytest.raises(models.CheckpointError) as err:
        steps.base_model(
            resolve.base_model_step(config, "tiny"),
            tmp_path / "m",
            tmp_path / "m.json",
            tmp_path / "weights.json",
        )
    assert "changed since download_weights" in one_line(err)


def test_unreadable_weights_file_fails_clearly(tmp_path: Path) -> None:
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"not weights")
    with pytest.raises(models.CheckpointError) as err:
        models.pretrained_weights(resolve.weights(study({"pretrained_file": str(file)}), "tiny"))
    assert "not a readable weights file" in one_line(err)


def test_offline_without_the_file_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "nope.safetensors"
    # A file missing when the config is read is a config error before any job ...
    with pytest.raises(ConfigError) as err:
        study({"pretrained_file": str(path)})
    assert "models.0.pretrained_file" in one_line(err) and "is not a file" in str(err.value)
    # ... and one removed after it (between the check and the job) a CheckpointError in the job.
    path.write_bytes(b"")
    missing = resolve.weights(study({"pretrained_file": str(path)}), "tiny")
    path.unlink()
    with pytest.raises(models.CheckpointError) as err:
        models.pretrained_weights(missing)
    assert "models[tiny].pretrained_file=" in one_line(err) and "no such file" in str(err.value)

    cache = tmp_path / "empty-cache"
    hub = study({"pretrained": True, "weights_cache": str(cache)})
    with pytest.raises(models.CheckpointError) as err:
        steps.download_weights(resolve.weights(hub, "tiny"), tmp_path / "weights.json")
    message = one_line(err)
    assert "models[tiny]" in message and TIMM in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download timm/" in message  # how to fetch it where there is internet


def test_offline_reads_a_cached_hub_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in the hub cache's layout is found without any network access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = models._pretrained_cfg(TIMM)["hf_hub_id"]
    cache = tmp_path / "cache"
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    weights_file(snapshot / "model.safetensors", num_classes=1000)
    manifest = models.pretrained_weights(
        resolve.weights(study({"pretrained": True, "weights_cache": str(cache)}), "tiny")
    )
    assert manifest["source"] == f"hf-hub:{hub_id}" and manifest["num_classes"] == 1000
    assert manifest["sha256"] == models.sha256(snapshot / "model.safetensors")


def test_url_weights_use_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights timm knows only by URL: read from the cache folder, never fetched offline."""
    url = "https://example.invalid/weights/tiny-0123.pth"
    cfg = {"url": url, "hf_hub_id": None, "num_classes": 10, "classifier": "head"}
    monkeypatch.setattr(models, "_pretrained_cfg", lambda name: cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = resolve.weights(study({"pretrained": True, "weights_cache": str(tmp_path)}), "tiny")
    with pytest.raises(models.CheckpointError) as err:
        models.pretrained_weights(entry)
    assert f"download {url} into {tmp_path}" in one_line(err)

    file = weights_file(tmp_path / "tiny-0123.pth")
    manifest = models.pretrained_weights(entry)
    assert manifest["source"] == f"url:{url}" and manifest["file"] == str(file)
    assert manifest["sha256"] == models.sha256(file) and manifest["num_classes"] == 10
