"""timm model creation, pretrained weights (fetch, verify) and pickle-free save/load of models.

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
import os
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
    pretrained_num_classes: int | None = None,
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
        pretrained_num_classes: classifier width of ``pretrained_file`` when it differs from the
            hub weights' (a user's own checkpoint). timm keeps the file's classifier when this
            equals ``num_classes`` and re-initialises it otherwise.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: if the name is not a timm model, or the weights do not fit it.
    """
    import timm

    kwargs = dict(overrides or {})
    if pretrained_file:
        overlay: dict[str, Any] = {"file": str(pretrained_file)}
        if pretrained_num_classes is not None:
            overlay["num_classes"] = int(pretrained_num_classes)
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(
            name, pretrained=pretrained or bool(pretrained_file), num_classes=num_classes, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"model {name!r} is not a timm model name") from err
        if pretrained_file and "state_dict" in str(err):
            raise CheckpointError(
                f"{pretrained_file}: weights do not fit {name} with these overrides "
                f"({_first_line(err)})"
            ) from err
        raise
    return model.eval()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# --- pretrained weights: fetch into a cache, verify, record ------------------------------------


def offline() -> bool:
    """Whether Hugging Face offline mode is on (``HF_HUB_OFFLINE``), read at call time.

    huggingface_hub reads the variable once at import; reading it here lets a job (or a test) set
    it later, and the same switch also keeps timm's URL downloads off the network.
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _pretrained_cfg(name: str) -> dict[str, Any]:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise CheckpointError(f"model {name!r}: timm has no pretrained weights for it")
    return cfg.to_dict()


def _has_pretrained_cfg(entry: dict[str, Any]) -> bool:
    import timm.models

    return timm.models.get_pretrained_cfg(entry["timm"], allow_unregistered=False) is not None


def _fetch_hf(hub_id: str, filename: str | None, cache_dir: str | None, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    # timm's preference: the safetensors twin of the checkpoint when the repo has one, then the
    # checkpoint itself (loaded with weights_only=True).
    filename = filename or "pytorch_model.bin"
    twin = {
        "pytorch_model.bin": "model.safetensors",
        "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
    }.get(filename, filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    candidates = [name for name in (twin, filename) if name]
    last: Exception | None = None
    for candidate in dict.fromkeys(candidates):
        try:
            path = hf_hub_download(
                repo_id=repo,
                filename=candidate,
                revision=revision or None,
                cache_dir=cache_dir,
                local_files_only=local_only,
            )
            return Path(path)
        except (EntryNotFoundError, LocalEntryNotFoundError) as err:
            last = err
    assert last is not None
    raise last


def _fetch_url(url: str, cache_dir: str | None, local_only: bool) -> Path:
    import torch.hub

    # The directory timm's own URL downloads use (honours $TORCH_HOME), unless configured.
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    dest = folder / Path(url.split("?")[0]).name
    if dest.is_file():
        return dest
    if local_only:
        raise FileNotFoundError(f"{dest} is not cached")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    os.replace(tmp, dest)  # a broken download never looks like a cached file
    return dest


def fetch_pretrained(entry: dict[str, Any]) -> tuple[Path, str]:
    """Download (or find in the cache) the pretrained weights file of a ``models`` entry.

    Sources, in timm's order of preference: ``pretrained_file`` (local, never downloaded), the
    Hugging Face hub (into ``weights_cache`` or the hub cache: ``$HF_HUB_CACHE``,
    ``$HF_HOME/hub``), then timm's URL (into ``weights_cache`` or ``$TORCH_HOME/hub/checkpoints``).
    With ``HF_HUB_OFFLINE=1`` only the cache is read.

    Args:
        entry: a ``models`` entry of the config.

    Returns:
        The local file and a description of where it came from.

    Raises:
        CheckpointError: one line naming the model and how to fetch its weights.
    """
    label = f"models[{entry['name']}]"
    if entry.get("pretrained_file"):
        path = Path(entry["pretrained_file"]).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{label}.pretrained_file={str(path)!r}: no such file")
        return path.resolve(), f"file:{path.resolve()}"
    cfg = _pretrained_cfg(entry["timm"])
    cache = entry.get("weights_cache")
    cache = str(Path(cache).expanduser()) if cache else None
    local_only = offline()
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        raise CheckpointError(f"{label}: timm has no hub or URL weights for {entry['timm']!r}")
    try:
        if hub_id:
            return _fetch_hf(hub_id, cfg.get("hf_hub_filename"), cache, local_only), (
                f"hf-hub:{hub_id}"
            )
        return _fetch_url(url, cache, local_only), f"url:{url}"
    except Exception as err:  # hub, HTTP and OS errors alike become one actionable line
        where = f"hf-hub {hub_id}" if hub_id else url
        if hub_id:
            how = f"run `hf download {hub_id.partition('@')[0]}`"
            how += f" with HF_HUB_CACHE={cache}" if cache else ""
        else:
            how = f"download {url} into {cache or '$TORCH_HOME/hub/checkpoints'}"
        if local_only:
            raise CheckpointError(
                f"{label}: pretrained weights of {entry['timm']!r} ({where}) are not in the cache "
                f"and HF_HUB_OFFLINE=1; on a machine with internet and the same cache, {how} "
                "(or `snakemake --until download_weights`), or set models[].pretrained_file"
            ) from err
        raise CheckpointError(
            f"{label}: cannot fetch pretrained weights of {entry['timm']!r} from {where} "
            f"({_first_line(err)}); {how} where there is internet, or set "
            "models[].pretrained_file"
        ) from err


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (safetensors, or a torch file loaded with
    ``weights_only=True``: never arbitrary pickle), unwrapped as timm unwraps checkpoints."""
    from timm.models import load_state_dict

    return load_state_dict(str(path), use_ema=True, weights_only=True)


def pretrained_weights(entry: dict[str, Any]) -> dict[str, Any]:
    """Fetch and verify the pretrained weights of a ``models`` entry; describe them.

    Verification: the file loads as a state dict of tensors; its SHA-256 is computed and, when
    ``models[].sha256`` is configured, must match.

    Args:
        entry: a ``models`` entry with ``pretrained: true`` or a ``pretrained_file``.

    Returns:
        The weights manifest: ``model``, ``timm``, ``source``, ``file`` (absolute path),
        ``sha256``, ``tensors`` (count), ``num_classes`` (the classifier width the weights were
        trained for, or None when unknown) and ``user_file`` (whether it is a configured file).

    Raises:
        CheckpointError: one line, if the weights cannot be fetched, read or do not match.
    """
    label = f"models[{entry['name']}]"
    path, source = fetch_pretrained(entry)
    try:
        state = read_weights(path)
    except Exception as err:  # safetensors, zip and unpickling errors have no common base
        raise CheckpointError(
            f"{label}: {path} is not a readable weights file ({_first_line(err)})"
        ) from err
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label}: {path} holds no state dict of tensors")
    digest = sha256(path)
    expected = entry.get("sha256")
    if expected and expected.lower() != digest:
        raise CheckpointError(
            f"{label}: sha256 of {path} is {digest}, but models[].sha256 expects {expected.lower()}"
        )
    user_file = bool(entry.get("pretrained_file"))
    # A user's file may be for an architecture timm has no weights of: then nothing is known of
    # its classifier beyond what the file says.
    cfg = _pretrained_cfg(entry["timm"]) if not user_file or _has_pretrained_cfg(entry) else {}
    classes = cfg.get("num_classes")
    if user_file:
        # A user's checkpoint may be for any label set: its classifier's rows say which.
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        rows = [state[h + ".weight"].shape[0] for h in heads if h + ".weight" in state]
        classes = rows[0] if rows else None
    return {
        "model": entry["name"],
        "timm": entry["timm"],
        "source": source,
        "file": str(path),
        "sha256": digest,
        "tensors": len(state),
        "num_classes": None if classes is None else int(classes),
        "user_file": user_file,
    }


def check_weights(manifest: dict[str, Any]) -> None:
    """Check that the file a weights manifest describes is still there, byte for byte.

    Raises:
        CheckpointError: one line, if the file is gone or changed since it was verified.
    """
    path = Path(manifest["file"])
    label = f"models[{manifest['model']}]"
    if not path.is_file():
        raise CheckpointError(
            f"{label}: verified weights file {path} is gone; rerun the download_weights rule"
        )
    if sha256(path) != manifest["sha256"]:
        raise CheckpointError(
            f"{label}: {path} changed since download_weights verified it (sha256 differs)"
        )


def data_config(model: nn.Module, img_size: int) -> dict[str, Any]:
    """timm's data config of ``model`` (interpolation, mean/std, crop) at ``img_size``, JSON-able.

    This is what ``data.load_splits(..., data_config=...)`` takes: models.py resolves it from the
    model, data.py only consumes the plain dict, so neither imports the other.
    """
    from timm.data import resolve_data_config

    resolved = dict(resolve_data_config({}, model=model))
    resolved["input_size"] = (3, int(img_size), int(img_size))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def data_config_of(desc: dict[str, Any]) -> dict[str, Any] | None:
    """The data config recorded in a structure description (None: the data set's default)."""
    return (desc.get("extra") or {}).get("data_config")


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
