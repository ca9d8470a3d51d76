"""Pickle-free save/load of pruned models; one-line CheckpointErrors for broken checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from agentprune import models
from agentprune.pruning import structured
from conftest import ARCHS, NUM_CLASSES, TINY_MODELS, make_model


@pytest.fixture(scope="module")
def saved(prune_run, tmp_path_factory):
    """arch -> (pruned model, stem) for models pruned with magnitude_l2 to 0.4 and saved."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for arch in ARCHS:
        run = prune_run(arch, "magnitude_l2", 0.4)
        name, overrides = TINY_MODELS[arch]
        stem = root / arch
        models.save(run.model, stem, name, NUM_CLASSES, overrides, extra={"arch": arch})
        out[arch] = (run.model, stem)
    return out


def copy_checkpoint(stem: Path, dest: Path) -> Path:
    """Copy ``<stem>.safetensors`` and ``<stem>.json`` to ``<dest>.*``; return ``dest``."""
    for suffix in (".safetensors", ".json"):
        shutil.copy(stem.with_suffix(suffix), dest.with_suffix(suffix))
    return dest


def load_error(path) -> str:
    """Load ``path``, expecting a CheckpointError; return its (one-line) message."""
    with pytest.raises(models.CheckpointError) as info:
        models.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def fixed_input() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every pickle entry point raise while the test runs."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_round_trip(saved, no_pickle, arch):
    model, stem = saved[arch]
    assert models.count_params(model) < models.count_params(make_model(arch)), (
        "the model was not pruned"
    )

    loaded, desc = models.load(stem)
    assert not loaded.training
    assert desc["format"] == models.FORMAT
    assert desc["extra"] == {"arch": arch}
    assert desc["sha256"] == models.sha256(stem.with_suffix(".safetensors"))

    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].shape == actual[name].shape, name
        assert torch.equal(expected[name], actual[name]), name
    assert models.module_attributes(loaded) == models.module_attributes(model)

    model.eval()
    x = fixed_input()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_load_accepts_either_path(saved, suffix):
    _, stem = saved["vit"]
    loaded, _ = models.load(str(stem) + suffix)
    heads = [a.num_heads for a in structured.attention_modules(loaded)]
    assert len(heads) == 2


def test_saved_weights_are_plain_safetensors(saved):
    from safetensors import safe_open

    model, stem = saved["convnext"]
    with safe_open(str(stem.with_suffix(".safetensors")), framework="pt") as fh:
        assert fh.metadata() == {"format": models.FORMAT}
        assert set(fh.keys()) == set(model.state_dict())


def test_flipped_bytes_fail_checksum(saved, tmp_path):
    stem = copy_checkpoint(saved["vit"][1], tmp_path / "flipped")
    weights = stem.with_suffix(".safetensors")
    raw = bytearray(weights.read_bytes())
    for i in range(len(raw) - 16, len(raw)):  # tensor data: still a valid safetensors file
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    message = load_error(stem)
    assert str(weights) in message
    assert "checksum" in message


def test_flipped_header_bytes(saved, tmp_path):
    stem = copy_checkpoint(saved["vit"][1], tmp_path / "header")
    weights = stem.with_suffix(".safetensors")
    raw = bytearray(weights.read_bytes())
    for i in range(12, 20):  # inside the JSON header: no longer UTF-8
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert str(weights) in load_error(stem)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 7, b"not a safetensors file at all" * 10, "truncate"],
    ids=["empty", "short", "garbage", "truncated"],
)
def test_unreadable_weights(saved, tmp_path, content):
    stem = copy_checkpoint(saved["convnext"][1], tmp_path / "bad")
    weights = stem.with_suffix(".safetensors")
    if content == "truncate":
        content = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.write_bytes(content)
    message = load_error(stem)
    assert str(weights) in message


@pytest.mark.parametrize(
    "text",
    ['{"hello": 1}', "[1, 2, 3]", '{"format": "someone.else/v3"}', "not json {"],
    ids=["foreign-dict", "list", "other-format", "not-json"],
)
def test_foreign_structure_file(saved, tmp_path, text):
    stem = copy_checkpoint(saved["convnext"][1], tmp_path / "foreign")
    meta = stem.with_suffix(".json")
    meta.write_text(text)
    message = load_error(stem)
    assert str(meta) in message
    if text.startswith("not json"):
        assert "JSON" in message
    else:
        assert "format" in message


@pytest.mark.parametrize("missing", [".safetensors", ".json"])
def test_missing_file(saved, tmp_path, missing):
    stem = copy_checkpoint(saved["vit"][1], tmp_path / "half")
    stem.with_suffix(missing).unlink()
    message = load_error(stem)
    assert str(stem.with_suffix(missing)) in message
    assert "missing" in message


def test_missing_checkpoint(tmp_path):
    assert "missing" in load_error(tmp_path / "nowhere")


def test_weights_of_another_architecture_fail_checksum(saved, tmp_path):
    """ConvNeXt weights next to the ViT's structure file: caught by the checksum."""
    stem = tmp_path / "mixed"
    shutil.copy(saved["convnext"][1].with_suffix(".safetensors"), stem.with_suffix(".safetensors"))
    shutil.copy(saved["vit"][1].with_suffix(".json"), stem.with_suffix(".json"))
    assert "checksum" in load_error(stem)


@pytest.mark.parametrize("sha", ["fixed", "absent"])
def test_weights_of_another_architecture_fail_tensor_match(saved, tmp_path, sha):
    """The same pair with the checksum made to agree (or removed): the tensor names do not match."""
    stem = tmp_path / "mixed"
    weights = stem.with_suffix(".safetensors")
    shutil.copy(saved["convnext"][1].with_suffix(".safetensors"), weights)
    desc = json.loads(saved["vit"][1].with_suffix(".json").read_text())
    if sha == "fixed":
        desc["sha256"] = models.sha256(weights)
    else:
        del desc["sha256"]
    stem.with_suffix(".json").write_text(json.dumps(desc))
    message = load_error(stem)
    assert "deit_tiny_patch16_224" in message
    assert "do not match" in message


def test_unknown_timm_name(saved, tmp_path):
    stem = copy_checkpoint(saved["convnext"][1], tmp_path / "renamed")
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    desc["timm_name"] = "no_such_model_xyz"
    meta.write_text(json.dumps(desc))
    assert "no_such_model_xyz" in load_error(stem)


@pytest.mark.parametrize("edit", ["other-timm-name", "no-timm-name"])
def test_inconsistent_structure_file(saved, tmp_path, edit):
    """A ConvNeXt structure file claiming to be a ViT (ConvNeXt overrides), or lacking the name."""
    stem = copy_checkpoint(saved["convnext"][1], tmp_path / "edited")
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    if edit == "other-timm-name":
        desc["timm_name"] = TINY_MODELS["vit"][0]
    else:
        del desc["timm_name"]
    meta.write_text(json.dumps(desc))
    assert "cannot rebuild" in load_error(stem)
