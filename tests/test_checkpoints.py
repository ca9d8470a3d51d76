"""Structure-JSON validation in ``models.load``: a whitelist of structural attributes per module
type, shape checks against the weights, and one-line ``<file>: <field>: <what>`` errors."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from agentprune import models
from agentprune.pruning import structured
from conftest import NUM_CLASSES, TINY_MODELS
from safetensors.torch import load_file, save_file

# name -> (arch, method, target) of the pruned checkpoints the cases edit.
PRUNED = {
    "vit_heads": ("vit", "isomorphic", 0.4),  # structured, with head and head-dim pruning
    "convnext": ("convnext", "magnitude_l2", 0.4),
    "vit_wanda": ("vit", "wanda", 0.5),  # unstructured: same shapes, zeroed weights
}


@pytest.fixture(scope="module")
def pruned(prune_run, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (pruned model, saved stem) for every entry of ``PRUNED``."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for key, (arch, method, target) in PRUNED.items():
        run = prune_run(arch, method, target)
        name, overrides = TINY_MODELS[arch]
        models.save(run.model, root / key, name, NUM_CLASSES, overrides)
        out[key] = (run.model, root / key)
    return out


@pytest.fixture(scope="module")
def facts(pruned) -> dict[str, int]:
    """The pruned widths the cases edit, read from the saved structure files (the pruner, not
    this file, decides them)."""
    vit = json.loads(pruned["vit_heads"][1].with_suffix(".json").read_text())["modules"]
    cnx = json.loads(pruned["convnext"][1].with_suffix(".json").read_text())["modules"]
    return {
        "h": vit["blocks.0.attn"]["num_heads"],
        "d": vit["blocks.0.attn"]["head_dim"],
        "qkv": vit["blocks.0.attn.qkv"]["out_features"],
        "qkv_in": vit["blocks.0.attn.qkv"]["in_features"],
        "qkv1": vit["blocks.1.attn.qkv"]["out_features"],
        "e": vit["norm"]["normalized_shape"][0],  # the pruned embedding width
        "fc1_in": vit["blocks.0.mlp.fc1"]["in_features"],
        "fc1_out": vit["blocks.0.mlp.fc1"]["out_features"],
        "stem": cnx["stem.0"]["out_channels"],
        "dw": cnx["stages.0.blocks.0.conv_dw"]["in_channels"],
        "ds_in": cnx["stages.1.downsample.1"]["in_channels"],
        "ds_out": cnx["stages.1.downsample.1"]["out_channels"],
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    """timm test model -> saved stem of a fresh seeded model (BatchNorm, GroupNorm types)."""
    root = tmp_path_factory.mktemp("fresh")
    out = {}
    for name in ("test_resnet", "test_efficientnet_gn"):
        torch.manual_seed(0)
        models.save(models.create(name, NUM_CLASSES), root / name, name, NUM_CLASSES, {})
        out[name] = root / name
    return out


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every pickle entry point raise while the test runs."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


def copy_checkpoint(stem: Path, dest: Path) -> Path:
    for suffix in (".safetensors", ".json"):
        shutil.copy(stem.with_suffix(suffix), dest.with_suffix(suffix))
    return dest


def refused(stem: Path, file: Path, field: str) -> str:
    """Load ``stem``, expecting one ``CheckpointError`` line ``<file>: <field>: ...``."""
    with pytest.raises(models.CheckpointError) as info:
        models.load(stem)
    message = str(info.value)
    assert type(info.value) is models.CheckpointError
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{file}: {field}: "), message
    return message[len(f"{file}: {field}: ") :]


DELETE = object()


def edited(desc: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with ``DELETE``, remove) the JSON value at ``path`` (keys separated by ``|``)."""
    *parents, leaf = path.split("|")
    for key in parents:
        desc = desc[key]
    if value is DELETE:
        del desc[leaf]
    else:
        desc[leaf] = value


def qkv_blame(outputs: int, head_dim: int) -> str:
    """The attribute a qkv mismatch is blamed on: the heads when head_dim divides the outputs."""
    return "num_heads" if outputs % (3 * head_dim) == 0 else "head_dim"


F = Callable[[dict[str, int]], Any]
# id -> (checkpoint, JSON path with "|" between keys, new value, field, words of the message).
# Values, fields and words may be functions of the pruned widths in ``facts``.
JSON_CASES: dict[str, tuple[str, str, Any | F, str | F, str | F]] = {
    "unknown-top-level-key": ("convnext", "overides", {}, "overides", "unknown key"),
    "no-timm-name": ("convnext", "timm_name", DELETE, "timm_name", "missing; cannot rebuild"),
    "timm-name-not-string": ("convnext", "timm_name", 42, "timm_name", "42 is not a string"),
    "unknown-timm-name": (
        "convnext",
        "timm_name",
        "no_such_model_xyz",
        "timm_name",
        '"no_such_model_xyz" is not a timm model name',
    ),
    "hub-timm-name": (  # would fetch a config from the hub
        "vit_heads",
        "timm_name",
        "hf-hub:timm/deit_tiny_patch16_224.fb_in1k",
        "timm_name",
        "is not a timm model name",
    ),
    "num-classes-string": ("convnext", "num_classes", "10", "num_classes", "not a non-negative"),
    "num-classes-bool": ("convnext", "num_classes", True, "num_classes", "true is not"),
    "num-classes-nan": ("convnext", "num_classes", math.nan, "num_classes", "NaN is not"),
    "num-classes-vs-head": (
        "vit_heads",
        "num_classes",
        12,
        "num_classes",
        "is 12, but the classifier head.weight has 10 outputs",
    ),
    "no-overrides": ("convnext", "overrides", DELETE, "overrides", "missing"),
    "overrides-list": ("convnext", "overrides", [1, 2], "overrides", "is not an object"),
    "overrides-checkpoint-path": (  # timm would torch.load this file
        "vit_heads",
        "overrides|checkpoint_path",
        "/etc/passwd",
        "overrides.checkpoint_path",
        "keyword of timm.create_model itself",
    ),
    "overrides-pretrained": (
        "vit_heads",
        "overrides|pretrained_cfg_overlay",
        {"file": "/etc/passwd"},
        "overrides.pretrained_cfg_overlay",
        "keyword of timm.create_model itself",
    ),
    "overrides-unknown-keyword": (
        "vit_heads",
        "overrides|dims",
        [24, 48],
        "overrides.dims",
        "cannot rebuild 'deit_tiny_patch16_224' (TypeError:",
    ),
    "overrides-bad-value": (
        "vit_heads",
        "overrides|num_heads",
        0,
        "overrides",
        "cannot rebuild 'deit_tiny_patch16_224' (ZeroDivisionError:",
    ),
    "overrides-other-architecture": (  # builds, but with other tensors
        "vit_heads",
        "overrides|depth",
        3,
        "tensors",
        "do not match deit_tiny_patch16_224 (missing ['blocks.2.attn.proj.bias'",
    ),
    "sha256-not-hex": ("convnext", "sha256", 1234, "sha256", "1234 is not a lowercase hex"),
    "extra-not-object": ("convnext", "extra", [], "extra", "is not an object"),
    "data-config-not-object": ("convnext", "extra", {"data_config": 3}, "extra.data_config", ""),
    "modules-not-object": ("vit_heads", "modules", [], "modules", "is not an object"),
    "module-entry-not-object": (
        "vit_heads",
        "modules|blocks.0.attn",
        3,
        "modules.blocks.0.attn",
        "is not an object",
    ),
    "unknown-module": (
        "vit_heads",
        "modules|blocks.9.attn",
        {"num_heads": 3},
        "modules.blocks.9.attn",
        "no such module",
    ),
    "dunder-module": (
        "vit_heads",
        "modules|__class__",
        {"num_heads": 3},
        "modules.__class__",
        "no such module",
    ),
    "forward": (
        "vit_heads",
        "modules|blocks.0.attn|forward",
        "print",
        "modules.blocks.0.attn.forward",
        "not a structural attribute of Attention (allowed: attn_dim, head_dim, num_heads, scale)",
    ),
    "dunder-attribute": (
        "vit_heads",
        "modules|blocks.0.attn|__class__",
        "Linear",
        "modules.blocks.0.attn.__class__",
        "not a structural attribute of Attention",
    ),
    "other-instance-attribute": (  # a real attribute, but not a structural one
        "vit_heads",
        "modules|blocks.0.attn|fused_attn",
        False,
        "modules.blocks.0.attn.fused_attn",
        "not a structural attribute",
    ),
    "training-flag": (
        "vit_heads",
        "modules|head|training",
        True,
        "modules.head.training",
        "not a structural attribute of Linear (allowed: in_features, out_features)",
    ),
    "attribute-of-another-type": (
        "vit_heads",
        "modules|blocks.0.attn.qkv|num_heads",
        3,
        "modules.blocks.0.attn.qkv.num_heads",
        "not a structural attribute of Linear",
    ),
    "heads-string": (
        "vit_heads",
        "modules|blocks.0.attn|num_heads",
        "3",
        "modules.blocks.0.attn.num_heads",
        '"3" is not a positive integer',
    ),
    "heads-float": (
        "vit_heads",
        "modules|blocks.0.attn|num_heads",
        3.0,
        "modules.blocks.0.attn.num_heads",
        "3.0 is not a positive integer",
    ),
    "heads-bool": (
        "vit_heads",
        "modules|blocks.0.attn|num_heads",
        True,
        "modules.blocks.0.attn.num_heads",
        "true is not a positive integer",
    ),
    "heads-vs-qkv": (
        "vit_heads",
        "modules|blocks.0.attn|num_heads",
        lambda f: f["h"] - 1,
        "modules.blocks.0.attn.num_heads",
        lambda f: (
            f"3 x {f['h'] - 1} heads x head_dim {f['d']} = {3 * (f['h'] - 1) * f['d']}, "
            f"but blocks.0.attn.qkv.weight has {f['qkv']} outputs"
        ),
    ),
    "head-dim-vs-qkv": (  # more dims than all heads have together: never a divisor
        "vit_heads",
        "modules|blocks.0.attn|head_dim",
        lambda f: f["qkv"] + 1,
        "modules.blocks.0.attn.head_dim",
        lambda f: (
            f"3 x {f['h']} heads x head_dim {f['qkv'] + 1} = {3 * f['h'] * (f['qkv'] + 1)}, "
            f"but blocks.0.attn.qkv.weight has {f['qkv']} outputs"
        ),
    ),
    "attention-entry-dropped": (  # the unpruned 4 x 16 heads stay: the qkv weight says no
        "vit_heads",
        "modules|blocks.1.attn",
        DELETE,
        lambda f: f"modules.blocks.1.attn.{qkv_blame(f['qkv1'], 16)}",
        lambda f: (
            f"3 x 4 heads x head_dim 16 = 192, but blocks.1.attn.qkv.weight has {f['qkv1']} outputs"
        ),
    ),
    "attn-dim": (
        "vit_heads",
        "modules|blocks.0.attn|attn_dim",
        lambda f: f["h"] * f["d"] + 1,
        "modules.blocks.0.attn.attn_dim",
        lambda f: f"is {f['h'] * f['d'] + 1}, not {f['h']} heads x head_dim {f['d']}",
    ),
    "scale-nan": (
        "vit_heads",
        "modules|blocks.0.attn|scale",
        math.nan,
        "modules.blocks.0.attn.scale",
        "NaN is not",
    ),
    "scale-inf": (
        "vit_heads",
        "modules|blocks.0.attn|scale",
        math.inf,
        "modules.blocks.0.attn.scale",
        "Infinity is not",
    ),
    "scale-negative": (
        "vit_heads",
        "modules|blocks.0.attn|scale",
        -0.25,
        "modules.blocks.0.attn.scale",
        "-0.25 is not",
    ),
    "scale-zero": (
        "vit_heads",
        "modules|blocks.0.attn|scale",
        0,
        "modules.blocks.0.attn.scale",
        "0 is not a finite",
    ),
    "linear-in": (
        "vit_heads",
        "modules|blocks.0.mlp.fc1|in_features",
        lambda f: f["fc1_in"] + 1,
        "modules.blocks.0.mlp.fc1.in_features",
        lambda f: (
            f"is {f['fc1_in'] + 1}, but blocks.0.mlp.fc1.weight has shape "
            f"[{f['fc1_out']}, {f['fc1_in']}]"
        ),
    ),
    "linear-out": (
        "vit_heads",
        "modules|blocks.0.mlp.fc1|out_features",
        lambda f: f["fc1_out"] + 1,
        "modules.blocks.0.mlp.fc1.out_features",
        lambda f: (
            f"is {f['fc1_out'] + 1}, but blocks.0.mlp.fc1.weight has shape "
            f"[{f['fc1_out']}, {f['fc1_in']}]"
        ),
    ),
    "linear-negative": (
        "vit_heads",
        "modules|blocks.0.mlp.fc1|out_features",
        -99,
        "modules.blocks.0.mlp.fc1.out_features",
        "-99 is not a positive integer",
    ),
    "classifier-in": (
        "vit_heads",
        "modules|head|in_features",
        lambda f: f["e"] + 1,
        "modules.head.in_features",
        lambda f: f"is {f['e'] + 1}, but head.weight has shape [10, {f['e']}]",
    ),
    "model-num-classes": (
        "vit_heads",
        "modules||num_classes",
        12,
        'modules[""].num_classes',
        "is 12, but the classifier head.weight has 10 outputs",
    ),
    "layer-norm-shape": (
        "vit_heads",
        "modules|norm|normalized_shape",
        lambda f: [f["e"] + 1],
        "modules.norm.normalized_shape",
        lambda f: f"is [{f['e'] + 1}], but norm.weight has shape [{f['e']}]",
    ),
    "layer-norm-not-list": (
        "vit_heads",
        "modules|norm|normalized_shape",
        lambda f: f["e"],
        "modules.norm.normalized_shape",
        lambda f: f"{f['e']} is not a non-empty list of positive integers",
    ),
    "layer-norm-float-list": (
        "vit_heads",
        "modules|norm|normalized_shape",
        lambda f: [float(f["e"])],
        "modules.norm.normalized_shape",
        lambda f: f"[{f['e']}.0] is not",
    ),
    "conv-out": (
        "convnext",
        "modules|stem.0|out_channels",
        lambda f: f["stem"] + 1,
        "modules.stem.0.out_channels",
        lambda f: f"is {f['stem'] + 1}, but stem.0.weight has shape [{f['stem']}, 3, 4, 4]",
    ),
    "conv-in": (
        "convnext",
        "modules|stages.1.downsample.1|in_channels",
        lambda f: f["ds_in"] + 1,
        "modules.stages.1.downsample.1.in_channels",
        lambda f: (
            f"in_channels {f['ds_in'] + 1} / groups 1 = {f['ds_in'] + 1} channels per group, "
            f"but stages.1.downsample.1.weight has shape [{f['ds_out']}, {f['ds_in']}, 2, 2]"
        ),
    ),
    "depthwise-groups": (
        "convnext",
        "modules|stages.0.blocks.0.conv_dw|groups",
        1,
        "modules.stages.0.blocks.0.conv_dw.groups",
        lambda f: (
            f"in_channels {f['dw']} / groups 1 = {f['dw']} channels per group, but "
            f"stages.0.blocks.0.conv_dw.weight has shape [{f['dw']}, 1, 7, 7]"
        ),
    ),
    "groups-do-not-divide": (
        "convnext",
        "modules|stages.0.blocks.0.conv_dw|groups",
        lambda f: f["dw"] + 1,
        "modules.stages.0.blocks.0.conv_dw.groups",
        lambda f: (
            f"is {f['dw'] + 1}, which does not divide in_channels {f['dw']} and "
            f"out_channels {f['dw']}"
        ),
    ),
    "convnext-norm": (
        "convnext",
        "modules|stages.0.blocks.0.norm|normalized_shape",
        lambda f: [f["dw"] + 1],
        "modules.stages.0.blocks.0.norm.normalized_shape",
        lambda f: f"is [{f['dw'] + 1}], but stages.0.blocks.0.norm.weight has shape [{f['dw']}]",
    ),
    "newline-in-name": (
        "convnext",
        "modules|stem\n0",
        {"out_channels": 24},
        "modules.stem\\n0",
        "no such module",
    ),
}


@pytest.mark.parametrize("case", JSON_CASES, ids=list(JSON_CASES))
def test_bad_structure_file(pruned, facts, tmp_path, no_pickle, case):
    key, path, value, field, words = (
        item(facts) if callable(item) else item for item in JSON_CASES[case]
    )
    stem = copy_checkpoint(pruned[key][1], tmp_path / "edited")
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    edited(desc, path, value)
    meta.write_text(json.dumps(desc))
    file = stem.with_suffix(".safetensors") if field == "tensors" else meta
    what = refused(stem, file, field)
    assert words in what, what


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("not json {", "JSON", "not a JSON structure description (Expecting value"),
        (b"\xff\xfe{}", "JSON", "'utf-8' codec can't decode"),
        ("[" * 100_000, "JSON", "recursion"),
        ('{"num_classes": 1' + "0" * 5000 + "}", "JSON", "digits"),
        ("[1, 2, 3]", "format", "the top level is a list"),
        ('{"hello": 1}', "format", "is null, not 'agentprune.model/v1'"),
        ('{"format": "someone.else/v3"}', "format", 'is "someone.else/v3", not'),
    ],
    ids=["not-json", "not-utf8", "too-deep", "huge-int", "list", "no-format", "other-format"],
)
def test_unreadable_or_foreign_structure_file(pruned, tmp_path, text, field, words):
    stem = copy_checkpoint(pruned["convnext"][1], tmp_path / "foreign")
    meta = stem.with_suffix(".json")
    if isinstance(text, bytes):
        meta.write_bytes(text)
    else:
        meta.write_text(text)
    assert words in refused(stem, meta, field)


@pytest.mark.parametrize("missing", [".safetensors", ".json"])
def test_missing_file(pruned, tmp_path, missing):
    stem = copy_checkpoint(pruned["vit_heads"][1], tmp_path / "half")
    stem.with_suffix(missing).unlink()
    assert refused(stem, stem.with_suffix(missing), "file") == "checkpoint file is missing"


def without_checksum(stem: Path) -> None:
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    del desc["sha256"]
    meta.write_text(json.dumps(desc))


@pytest.mark.parametrize(
    ("content", "checksum", "field", "words"),
    [
        ("flip-data", True, "sha256", "checksum differs from edited.json's; the file is corrupt"),
        ("truncate", True, "sha256", "checksum differs"),
        ("truncate", False, "safetensors", "not a readable safetensors file (Error while"),
        (b"", False, "safetensors", "header too small"),
        (b"not a safetensors file at all" * 10, False, "safetensors", "header too large"),
        ("flip-header", False, "safetensors", "invalid UTF-8 in header"),
    ],
    ids=["flipped-data", "truncated", "truncated-no-sha", "empty", "garbage", "flipped-header"],
)
def test_corrupt_weights(pruned, tmp_path, content, checksum, field, words):
    stem = copy_checkpoint(pruned["vit_heads"][1], tmp_path / "edited")
    weights = stem.with_suffix(".safetensors")
    raw = bytearray(weights.read_bytes())
    if content == "flip-data":  # the last tensor bytes: still a valid safetensors file
        raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])
    elif content == "flip-header":  # inside the JSON header: no longer UTF-8
        raw[12:20] = bytes(b ^ 0xFF for b in raw[12:20])
    elif content == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(content)
    weights.write_bytes(bytes(raw))
    if not checksum:
        without_checksum(stem)
    assert words in refused(stem, weights, field)


def rewrite_weights(
    stem: Path, edit: Callable[[dict[str, torch.Tensor]], None], meta: bool = True
) -> Path:
    """Rewrite ``<stem>.safetensors`` with ``edit`` applied, keeping the checksum valid."""
    weights = stem.with_suffix(".safetensors")
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights), metadata={"format": models.FORMAT} if meta else None)
    desc = json.loads(stem.with_suffix(".json").read_text())
    desc["sha256"] = models.sha256(weights)
    stem.with_suffix(".json").write_text(json.dumps(desc))
    return weights


def test_weights_without_the_format_metadata(pruned, tmp_path):
    stem = copy_checkpoint(pruned["convnext"][1], tmp_path / "plain")
    weights = rewrite_weights(stem, lambda state: None, meta=False)
    assert refused(stem, weights, "metadata.format") == "is null, not 'agentprune.model/v1'"


def test_extra_tensor(pruned, tmp_path):
    stem = copy_checkpoint(pruned["convnext"][1], tmp_path / "extra")
    weights = rewrite_weights(stem, lambda state: state.update(evil=torch.zeros(2)))
    what = refused(stem, weights, "tensors")
    assert what == "do not match convnext_atto (missing [], unexpected ['evil'])"


def test_reshaped_tensor_is_checked_against_the_structure(pruned, facts, tmp_path):
    """A qkv weight with one head fewer (checksum fixed) no longer fits the heads recorded."""
    stem = copy_checkpoint(pruned["vit_heads"][1], tmp_path / "reshaped")
    rows = facts["qkv"] - 3 * facts["d"]

    def drop_a_head(state):
        for leaf in ("weight", "bias"):
            state[f"blocks.0.attn.qkv.{leaf}"] = state[f"blocks.0.attn.qkv.{leaf}"][:rows].clone()

    rewrite_weights(stem, drop_a_head)
    what = refused(stem, stem.with_suffix(".json"), "modules.blocks.0.attn.qkv.out_features")
    shape = [rows, facts["qkv_in"]]
    assert what == f"is {facts['qkv']}, but blocks.0.attn.qkv.weight has shape {shape}"


@pytest.mark.parametrize(
    ("name", "module", "attr", "value", "what"),
    [
        ("test_resnet", "bn1", "num_features", 16, "is 16, but bn1.weight has shape [32]"),
        ("test_efficientnet_gn", "bn1", "num_groups", 5, "is 5, which does not divide"),
        ("test_efficientnet_gn", "bn1", "num_channels", 12, "is 12, but bn1.weight has shape"),
    ],
    ids=["batch-norm", "group-norm-groups", "group-norm-channels"],
)
def test_norms_against_their_weights(fresh, tmp_path, name, module, attr, value, what):
    stem = copy_checkpoint(fresh[name], tmp_path / name)
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    desc["modules"][module][attr] = value
    meta.write_text(json.dumps(desc))
    assert what in refused(stem, meta, f"modules.{module}.{attr}")


def test_long_names_are_clipped_to_one_short_line(pruned, tmp_path):
    stem = copy_checkpoint(pruned["vit_heads"][1], tmp_path / "long")
    meta = stem.with_suffix(".json")
    desc = json.loads(meta.read_text())
    desc["modules"]["x" * 10_000] = {}
    meta.write_text(json.dumps(desc))
    with pytest.raises(models.CheckpointError) as info:
        models.load(stem)
    assert len(str(info.value)) < len(str(meta)) + 200
    assert f"{meta}: modules.{'x' * 77}...: no such module" in str(info.value)


# --- round trips: what save writes, load takes back bitwise ------------------------------------


def assert_same_model(loaded: torch.nn.Module, model: torch.nn.Module, img_size: int) -> None:
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].dtype == actual[name].dtype, name
        assert torch.equal(expected[name], actual[name]), name
    assert models.module_attributes(loaded) == models.module_attributes(model)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("key", PRUNED)
def test_pruned_round_trip_is_bitwise(pruned, no_pickle, key):
    model, stem = pruned[key]
    loaded, desc = models.load(stem)
    assert_same_model(loaded, model, 32)
    assert desc["sha256"] == models.sha256(stem.with_suffix(".safetensors"))


def test_the_checkpoints_are_really_pruned(pruned, facts):
    """Heads and head dims (ViT), channels (ConvNeXt) and weights (Wanda) were removed."""
    heads = [a.num_heads for a in structured.attention_modules(pruned["vit_heads"][0])]
    assert len(heads) == 2 and max(heads) < 4  # 4 heads of 16 dims before pruning
    assert 3 * facts["h"] * facts["d"] == facts["qkv"] < 192
    assert facts["e"] < 64 and facts["dw"] < 24 and facts["ds_out"] < 48
    wanda = pruned["vit_wanda"][0]
    weights = [m.weight for m in wanda.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(w.shape) for w in weights[:2]] == [(192, 64), (64, 64)]  # shapes kept
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.3 < zeros < 0.7  # about half of the prunable weights zeroed


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_every_timm_test_model_round_trips(tmp_path, name):
    """Fresh models of every timm test architecture: what save records, load accepts and checks
    (BatchNorm, GroupNorm, RmsNorm, windowed and pooled attention, ...)."""
    torch.manual_seed(0)
    model = models.create(name, NUM_CLASSES)
    models.save(model, tmp_path / "m", name, NUM_CLASSES, {})
    loaded, _ = models.load(tmp_path / "m")
    size = model.pretrained_cfg.get("input_size", (3, 160, 160))[-1]
    assert_same_model(loaded, model, size)
    recorded = models.module_attributes(model)
    by_name = dict(model.named_modules())
    for module_name, attrs in recorded.items():
        assert set(attrs) <= set(models.structural_attributes(module_name, by_name[module_name]))


def test_distilled_and_headless_models_round_trip(tmp_path):
    """Two classifier heads (DeiT distilled) and none (num_classes=0) pass the classifier check."""
    name, overrides = TINY_MODELS["vit"]
    for classes, timm_name in ((NUM_CLASSES, "deit_tiny_distilled_patch16_224"), (0, name)):
        torch.manual_seed(0)
        model = models.create(timm_name, classes, overrides)
        models.save(model, tmp_path / "m", timm_name, classes, overrides)
        loaded, desc = models.load(tmp_path / "m")
        assert desc["num_classes"] == classes
        assert_same_model(loaded, model, 32)


# --- save refuses what load would refuse, before writing anything ------------------------------


def test_save_refuses_an_attribute_load_would_refuse(tmp_path):
    name, overrides = TINY_MODELS["vit"]
    model = models.create(name, NUM_CLASSES, overrides)
    model.blocks[1].attn.scale = math.nan
    with pytest.raises(models.CheckpointError) as info:
        models.save(model, tmp_path / "m", name, NUM_CLASSES, overrides)
    assert str(info.value) == (
        f"{tmp_path / 'm.json'}: modules.blocks.1.attn.scale: NaN is not a finite positive number"
    )
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_factory_keywords(tmp_path):
    name, overrides = TINY_MODELS["vit"]
    model = models.create(name, NUM_CLASSES, overrides)
    with pytest.raises(models.CheckpointError) as info:
        models.save(model, tmp_path / "m", name, NUM_CLASSES, {**overrides, "checkpoint_path": "x"})
    assert str(info.value).startswith(f"{tmp_path / 'm.json'}: overrides.checkpoint_path: ")
    assert list(tmp_path.iterdir()) == []


def test_save_records_only_the_table(pruned):
    """Attributes outside the table (the old ``dim`` of Softmax-like modules, flags, ...) are not
    written, so the whitelist load applies is exactly what save records."""
    model = pruned["vit_heads"][0]
    recorded = models.module_attributes(model)
    assert set(recorded["blocks.0.attn"]) == {"num_heads", "head_dim", "attn_dim", "scale"}
    for name, module in model.named_modules():
        allowed = models.structural_attributes(name, module)
        expected = {a for a in allowed if a in vars(module)}
        assert set(recorded.get(name, {})) == expected, name
    assert "fused_attn" in vars(model.blocks[0].attn)  # present, but not structural
    assert models.structural_attributes("blocks.0.attn.qkv", model.blocks[0].attn.qkv).keys() == {
        "in_features",
        "out_features",
    }
