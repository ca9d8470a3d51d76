"""timm model creation, pretrained download, and pickle-free save/load of (pruned) models.

A saved model is two files side by side:

* ``<stem>.safetensors``: the state dict (tensors only, no pickle);
* ``<stem>.json``: the structure: the timm name, the creation overrides, and the shape-defining
  attributes of every module (``in_features``, ``num_heads``, ...). Loading creates the unpruned
  architecture, resizes every parameter and buffer to the shapes in the safetensors file,
  restores those attributes, and loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "agentprune.model/v1"
# Attributes that define a module's shape or how its forward uses the shape. Recorded when they
# exist and
# hold plain JSON values; timm's Attention reads num_heads/head_dim/scale in forward.
SHAPE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "normalized_shape",
    "num_groups",
    "num_channels",
    "num_heads",
    "head_dim",
    "attn_dim",
    "scale",
    "embed_dim",
    "num_classes",
    "head_hidden_size",
    "dim",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to the architecture it claims."""


def create(
    name: str,
    num_classes: int,
    overrides: dict[str, Any] | None = None,
    pretrained: bool = False,
    pretrained_file: str | None = None,
) -> nn.Module:
    """Create a timm model.

    Args:
        name: any timm model name (``deit_tiny_patch16_224``, ``convnext_base.fb_in1k``, ...).
        num_classes: classifier width.
        overrides: keyword overrides passed to ``timm.create_model`` (``img_size``, ``depth``, ...).
        pretrained: download the hub weights (needs network unless they are cached or HF offline
            mode finds them locally).
        pretrained_file: a local weights file used instead of the hub (timm
        ``pretrained_cfg_overlay``).

    Returns:
        The model in eval mode.
    """
    import timm

    kwargs = dict(overrides or {})
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        model = timm.create_model(
            name, pretrained=pretrained or bool(pretrained_file), num_classes=num_classes, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"model {name!r} is not a timm model name") from err
        raise
    return model.eval()


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
        return list(value)
    return _NOT_PLAIN


_NOT_PLAIN = object()


def module_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape-defining attributes of every module, keyed by module name."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {}
        for attr in SHAPE_ATTRIBUTES:
            if attr in vars(module):
                value = _plain(vars(module)[attr])
                if value is not _NOT_PLAIN:
                    attrs[attr] = value
        if attrs:
            out[name] = attrs
    return out


def structure(
    model: nn.Module, name: str, num_classes: int, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON structure description of ``model`` relative to a fresh ``name`` architecture."""
    return {
        "format": FORMAT,
        "timm_name": name,
        "num_classes": num_classes,
        "overrides": dict(overrides or {}),
        "modules": module_attributes(model),
    }


def save(
    model: nn.Module,
    stem: str | Path,
    name: str,
    num_classes: int,
    overrides: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Save ``model`` pickle-free as ``<stem>.safetensors`` and ``<stem>.json``.

    Returns:
        The two paths written.
    """
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    meta = stem.with_suffix(".json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    desc = structure(model, name, num_classes, overrides)
    desc["sha256"] = sha256(weights)
    if extra:
        desc["extra"] = extra
    meta.write_text(json.dumps(desc, indent=1))
    return weights, meta


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resize_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    for full_name, shape in shapes.items():
        module_name, _, leaf = full_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf in module._parameters and module._parameters[leaf] is not None:
            old = module._parameters[leaf]
            if tuple(old.shape) != tuple(shape):
                module._parameters[leaf] = nn.Parameter(
                    torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad
                )
        elif leaf in module._buffers and module._buffers[leaf] is not None:
            old = module._buffers[leaf]
            if tuple(old.shape) != tuple(shape):
                module._buffers[leaf] = torch.empty(shape, dtype=old.dtype)


def load(stem: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save`, rebuilding its (pruned) architecture without pickle.

    Args:
        stem: path without suffix, or the ``.safetensors``/``.json`` path.

    Returns:
        The model (eval mode) and its structure description.

    Raises:
        CheckpointError: if a file is missing, corrupt, foreign, or does not fit the structure.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for path in (weights, meta):
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        desc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta}: not a JSON structure description ({err})") from err
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise CheckpointError(f"{meta}: not an agentprune structure file (format != {FORMAT})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    if "sha256" in desc and desc["sha256"] != sha256(weights):
        raise CheckpointError(f"{weights}: checksum differs from {meta.name}; the file is corrupt")
    try:
        model = create(desc["timm_name"], desc["num_classes"], desc["overrides"], pretrained=False)
    except (KeyError, TypeError, CheckpointError) as err:
        raise CheckpointError(f"{meta}: cannot rebuild {desc.get('timm_name')!r} ({err})") from err
    expected = set(model.state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        unexpected = sorted(set(state) - expected)[:3]
        raise CheckpointError(
            f"{weights}: tensors do not match {desc['timm_name']} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    _resize_tensors(model, {k: tuple(v.shape) for k, v in state.items()})
    try:
        for module_name, attrs in desc.get("modules", {}).items():
            module = model.get_submodule(module_name) if module_name else model
            for attr, value in attrs.items():
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        model.load_state_dict(state, strict=True)
    except (AttributeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{meta}: structure does not fit the weights ({first})") from err
    return model.eval(), desc


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
