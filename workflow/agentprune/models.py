"""timm model creation, pretrained weights (fetch, verify) and pickle-free save/load of models.

A saved model is two files side by side:

* ``<stem>.safetensors``: the state dict (tensors only, no pickle);
* ``<stem>.json``: the structure: the timm name, the creation overrides, and the shape-defining
  attributes of every module (``in_features``, ``num_heads``, ...). Loading creates the unpruned
  architecture, resizes every parameter and buffer to the shapes in the safetensors file,
  restores those attributes, and loads the weights strictly.

One table, :func:`structural_rules`, says which attributes each kind of module has: save records
only those, and load sets only those, each checked against its JSON type and then against the
weights (heads x head_dim against qkv, Linear/Conv widths, norms, the classifier). Every failure
of :func:`load` is one line ``CheckpointError("<file>: <field>: <what is wrong>")``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agentprune.settings import WeightsEntry

FORMAT = "agentprune.model/v1"
# The top-level keys of a structure file, in the order save writes them.
STRUCTURE_KEYS = ("format", "timm_name", "num_classes", "overrides", "modules", "sha256", "extra")


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


def _has_pretrained_cfg(entry: WeightsEntry) -> bool:
    import timm.models

    return timm.models.get_pretrained_cfg(entry.timm, allow_unregistered=False) is not None


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


def fetch_pretrained(entry: WeightsEntry) -> tuple[Path, str]:
    """Download (or find in the cache) the pretrained weights file of a ``models`` entry.

    Sources, in timm's order of preference: ``pretrained_file`` (local, never downloaded), the
    Hugging Face hub (into ``weights_cache`` or the hub cache: ``$HF_HUB_CACHE``,
    ``$HF_HOME/hub``), then timm's URL (into ``weights_cache`` or ``$TORCH_HOME/hub/checkpoints``).
    With ``HF_HUB_OFFLINE=1`` only the cache is read.

    Args:
        entry: the weights part of a ``models`` entry.

    Returns:
        The local file and a description of where it came from.

    Raises:
        CheckpointError: one line naming the model and how to fetch its weights.
    """
    label = f"models[{entry.name}]"
    if entry.pretrained_file:
        path = Path(entry.pretrained_file).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{label}.pretrained_file={str(path)!r}: no such file")
        return path.resolve(), f"file:{path.resolve()}"
    cfg = _pretrained_cfg(entry.timm)
    cache = entry.weights_cache
    cache = str(Path(cache).expanduser()) if cache else None
    local_only = offline()
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        raise CheckpointError(f"{label}: timm has no hub or URL weights for {entry.timm!r}")
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
                f"{label}: pretrained weights of {entry.timm!r} ({where}) are not in the cache "
                f"and HF_HUB_OFFLINE=1; on a machine with internet and the same cache, {how} "
                "(or `snakemake --until download_weights`), or set models[].pretrained_file"
            ) from err
        raise CheckpointError(
            f"{label}: cannot fetch pretrained weights of {entry.timm!r} from {where} "
            f"({_first_line(err)}); {how} where there is internet, or set "
            "models[].pretrained_file"
        ) from err


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (safetensors, or a torch file loaded with
    ``weights_only=True``: never arbitrary pickle), unwrapped as timm unwraps checkpoints."""
    from timm.models import load_state_dict

    return load_state_dict(str(path), use_ema=True, weights_only=True)


def pretrained_weights(entry: WeightsEntry) -> dict[str, Any]:
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
    label = f"models[{entry.name}]"
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
    expected = entry.sha256
    if expected and expected.lower() != digest:
        raise CheckpointError(
            f"{label}: sha256 of {path} is {digest}, but models[].sha256 expects {expected.lower()}"
        )
    user_file = bool(entry.pretrained_file)
    # A user's file may be for an architecture timm has no weights of: then nothing is known of
    # its classifier beyond what the file says.
    cfg = _pretrained_cfg(entry.timm) if not user_file or _has_pretrained_cfg(entry) else {}
    classes = cfg.get("num_classes")
    if user_file:
        # A user's checkpoint may be for any label set: its classifier's rows say which.
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        rows = [state[h + ".weight"].shape[0] for h in heads if h + ".weight" in state]
        classes = rows[0] if rows else None
    return {
        "model": entry.name,
        "timm": entry.timm,
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


# --- the structure description: one table of structural attributes for save and load ----------


@dataclass(frozen=True)
class AttributeKind:
    """What the JSON value of one structural attribute must be, and the value it restores.

    Attributes:
        expected: the accepted values in words, for error messages.
        accepts: whether a JSON value is one of them.
        restore: the module attribute made from an accepted JSON value.
    """

    expected: str
    accepts: Callable[[Any], bool]
    restore: Callable[[Any], Any]


# ``type(v) is int`` keeps ``true``/``false`` (Python bools) out of sizes.
SIZE = AttributeKind("a positive integer", lambda v: type(v) is int and v > 0, int)
COUNT = AttributeKind("a non-negative integer", lambda v: type(v) is int and v >= 0, int)
SHAPE = AttributeKind(
    "a non-empty list of positive integers",
    lambda v: type(v) is list and bool(v) and all(type(x) is int and x > 0 for x in v),
    tuple,
)
# A model's bookkeeping widths: one, or one per stage (LeViT, CrossViT, RepViT, ...).
WIDTHS = AttributeKind(
    "a positive integer or a non-empty list of them",
    lambda v: SIZE.accepts(v) or SHAPE.accepts(v),
    lambda v: tuple(v) if isinstance(v, list) else int(v),
)
SCALE = AttributeKind(
    "a finite positive number",
    lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
    float,
)

# (attribute, what is wrong) when a module's attributes disagree with its tensors.
Problem = tuple[str, str]


@dataclass(frozen=True)
class ModuleRule:
    """The structural attributes of one kind of module, and how they must agree with its tensors.

    Attributes:
        kind: the kind of module, in words.
        matches: ``matches(name, module)``: whether the rule applies to a module.
        attributes: attribute name -> what its JSON value must be. :func:`module_attributes`
            records exactly these (when the module has them); :func:`load` sets nothing else.
        check: ``check(name, module)``: the first disagreement with the module's tensors, or None.
    """

    kind: str
    matches: Callable[[str, nn.Module], bool]
    attributes: Mapping[str, AttributeKind]
    check: Callable[[str, nn.Module], Problem | None]


def _instance_of(*types: type) -> Callable[[str, nn.Module], bool]:
    return lambda name, module: isinstance(module, types)


def _is_root(name: str, module: nn.Module) -> bool:
    return name == ""


def _is_attention(name: str, module: nn.Module) -> bool:
    # The same duck type the structured pruner fixes up (a qkv Linear and num_heads): timm's
    # Attention and its relatives (windowed, rotary, ...) alike.
    # (_modules, not getattr: a missing attribute costs an exception in nn.Module.__getattr__.)
    return isinstance(module._modules.get("qkv"), nn.Linear) and "num_heads" in vars(module)


def _tensor(module: nn.Module, leaf: str) -> torch.Tensor | None:
    value = module._parameters.get(leaf, module._buffers.get(leaf))
    return value if isinstance(value, torch.Tensor) else None


def _tensor_name(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


def _shape_problem(
    name: str, module: nn.Module, leaves: tuple[str, ...], shape: tuple[int, ...], attr: str
) -> Problem | None:
    """The first of ``leaves`` (when present) whose shape is not ``shape``, blamed on ``attr``."""
    for leaf in leaves:
        tensor = _tensor(module, leaf)
        if tensor is not None and tuple(tensor.shape) != shape:
            value = vars(module)[attr]
            shown = list(value) if isinstance(value, tuple) else value
            return attr, (
                f"is {shown}, but {_tensor_name(name, leaf)} has shape {list(tensor.shape)}"
            )
    return None


def _check_linear(name: str, module: nn.Module) -> Problem | None:
    weight = list(module.weight.shape)
    tensor = _tensor_name(name, "weight")
    if len(weight) != 2 or weight[0] != module.out_features:
        return "out_features", f"is {module.out_features}, but {tensor} has shape {weight}"
    if weight[1] != module.in_features:
        return "in_features", f"is {module.in_features}, but {tensor} has shape {weight}"
    return _shape_problem(name, module, ("bias",), (module.out_features,), "out_features")


def _check_conv(name: str, module: nn.Module) -> Problem | None:
    groups, ins, outs = module.groups, module.in_channels, module.out_channels
    if ins % groups or outs % groups:
        what = f"is {groups}, which does not divide in_channels {ins} and out_channels {outs}"
        return "groups", what
    weight = list(module.weight.shape)
    tensor = _tensor_name(name, "weight")
    # A conv weight is (out, in / groups, *kernel); a transposed one is (in, out / groups, *kernel).
    rows_attr, per_group_attr = ("in_channels", "out_channels")
    if not module.transposed:
        rows_attr, per_group_attr = per_group_attr, rows_attr
    rows, per_group = vars(module)[rows_attr], vars(module)[per_group_attr] // groups
    if len(weight) != 2 + len(module.kernel_size) or weight[0] != rows:
        return rows_attr, f"is {rows}, but {tensor} has shape {weight}"
    if weight[1] != per_group:
        # One channel per group is a depthwise weight: its groups are what the file got wrong.
        attr = "groups" if groups != 1 or weight[1] == 1 else per_group_attr
        return attr, (
            f"{per_group_attr} {vars(module)[per_group_attr]} / groups {groups} = {per_group} "
            f"channels per group, but {tensor} has shape {weight}"
        )
    return _shape_problem(name, module, ("bias",), (outs,), "out_channels")


def _check_layer_norm(name: str, module: nn.Module) -> Problem | None:
    shape = tuple(module.normalized_shape)
    return _shape_problem(name, module, ("weight", "bias"), shape, "normalized_shape")


def _check_batch_norm(name: str, module: nn.Module) -> Problem | None:
    leaves = ("weight", "bias", "running_mean", "running_var")
    return _shape_problem(name, module, leaves, (module.num_features,), "num_features")


def _check_group_norm(name: str, module: nn.Module) -> Problem | None:
    if module.num_channels % module.num_groups:
        return "num_groups", (
            f"is {module.num_groups}, which does not divide num_channels {module.num_channels}"
        )
    return _shape_problem(name, module, ("weight", "bias"), (module.num_channels,), "num_channels")


def _check_attention(name: str, module: nn.Module) -> Problem | None:
    # forward reshapes qkv's output into (3, num_heads, head_dim) and feeds proj num_heads x
    # head_dim features; attention without a head_dim attribute still splits qkv into heads.
    heads, head_dim = module.num_heads, vars(module).get("head_dim")
    outputs = module.qkv.weight.shape[0]
    qkv = _tensor_name(name, "qkv.weight")
    if type(heads) is not int or heads < 1:
        return "num_heads", f"is {heads!r}, not {SIZE.expected}"
    if type(head_dim) is not int:
        if outputs % heads:
            return "num_heads", f"{heads} heads do not divide the {outputs} outputs of {qkv}"
        return None
    if 3 * heads * head_dim != outputs:
        attr = "num_heads" if outputs % (3 * head_dim) == 0 else "head_dim"
        return attr, (
            f"3 x {heads} heads x head_dim {head_dim} = {3 * heads * head_dim}, "
            f"but {qkv} has {outputs} outputs"
        )
    attn_dim = vars(module).get("attn_dim")
    if attn_dim is not None and attn_dim != heads * head_dim:
        return "attn_dim", f"is {attn_dim}, not {heads} heads x head_dim {head_dim}"
    proj = getattr(module, "proj", None)
    if isinstance(proj, nn.Linear) and proj.weight.shape[-1] != heads * head_dim:
        return "head_dim", (
            f"{heads} heads x head_dim {head_dim} = {heads * head_dim}, but "
            f"{_tensor_name(name, 'proj.weight')} takes {proj.weight.shape[-1]} inputs"
        )
    return None


def _classifiers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named Linear/Conv classifier head(s) of a timm model (none when it has no head)."""
    get = getattr(type(model), "get_classifier", None)
    heads = get(model) if callable(get) else None
    heads = heads if isinstance(heads, tuple | list) else (heads,)
    names = {id(module): name for name, module in model.named_modules()}
    return [
        (names.get(id(head), "classifier"), head)
        for head in heads
        if isinstance(head, nn.Linear | nn.Conv2d)
    ]


def _classifier_problem(model: nn.Module, num_classes: Any) -> str | None:
    for name, head in _classifiers(model):
        outputs = head.weight.shape[0]
        if outputs != num_classes:
            return f"is {num_classes}, but the classifier {name}.weight has {outputs} outputs"
    return None


def _check_root(name: str, model: nn.Module) -> Problem | None:
    # num_features / embed_dim / head_hidden_size are the unpruned widths: the pruner does not
    # update them and no forward reads them, so only their types are checked.
    if "num_classes" not in vars(model):
        return None
    problem = _classifier_problem(model, vars(model)["num_classes"])
    return None if problem is None else ("num_classes", problem)


def _unchecked(name: str, module: nn.Module) -> Problem | None:
    return None


@functools.cache
def structural_rules() -> tuple[ModuleRule, ...]:
    """The one table of structural attributes: what :func:`save` records and :func:`load` sets.

    A module gets the attributes of every rule that matches it. Anything a structure file names
    outside its module's rules is refused by :func:`load`.
    """
    from timm import layers
    from timm.layers import norm as timm_norm

    # timm's norms that are not nn.LayerNorm / nn.GroupNorm subclasses but keep normalized_shape.
    timm_norms = tuple(
        getattr(timm_norm, n)
        for n in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm")
        + ("SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32")
        if hasattr(timm_norm, n)
    )
    torch_norms = tuple(getattr(nn, n) for n in ("LayerNorm", "RMSNorm") if hasattr(nn, n))
    heads = tuple(
        getattr(layers, n)
        for n in ("ClassifierHead", "NormMlpClassifierHead", "ClNormMlpClassifierHead")
        if hasattr(layers, n)
    )
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    convs += (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    instance_norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    return (
        ModuleRule(
            "the model",
            _is_root,
            {
                "num_classes": COUNT,
                "num_features": WIDTHS,
                "embed_dim": WIDTHS,
                "head_hidden_size": WIDTHS,
            },
            _check_root,
        ),
        ModuleRule(
            "attention",
            _is_attention,
            {"num_heads": SIZE, "head_dim": SIZE, "attn_dim": SIZE, "scale": SCALE},
            _check_attention,
        ),
        ModuleRule(
            "linear",
            _instance_of(nn.Linear),
            {"in_features": SIZE, "out_features": SIZE},
            _check_linear,
        ),
        ModuleRule(
            "convolution",
            _instance_of(*convs),
            {"in_channels": SIZE, "out_channels": SIZE, "groups": SIZE},
            _check_conv,
        ),
        ModuleRule(
            "layer norm",
            _instance_of(*torch_norms, *timm_norms),
            {"normalized_shape": SHAPE},
            _check_layer_norm,
        ),
        ModuleRule(
            "batch norm",
            _instance_of(*batch_norms, *instance_norms),
            {"num_features": SIZE},
            _check_batch_norm,
        ),
        ModuleRule(
            "group norm",
            _instance_of(nn.GroupNorm),
            {"num_groups": SIZE, "num_channels": SIZE},
            _check_group_norm,
        ),
        # Bookkeeping widths of timm's classifier heads, stale after pruning like the model's.
        ModuleRule(
            "classifier head",
            _instance_of(*heads),
            {"in_features": SIZE, "num_features": SIZE},
            _unchecked,
        ),
    )


def _rules_for(name: str, module: nn.Module) -> list[ModuleRule]:
    return [rule for rule in structural_rules() if rule.matches(name, module)]


def _allowed(rules: list[ModuleRule]) -> dict[str, AttributeKind]:
    allowed: dict[str, AttributeKind] = {}
    for rule in rules:
        allowed.update(rule.attributes)
    return allowed


def structural_attributes(name: str, module: nn.Module) -> dict[str, AttributeKind]:
    """The attributes of module ``name`` that a structure file may record, with their kinds."""
    return _allowed(_rules_for(name, module))


# module name -> (module, the rules that apply to it), in named_modules order.
RuledModules = dict[str, tuple[nn.Module, list[ModuleRule]]]


def _ruled_modules(model: nn.Module) -> RuledModules:
    return {name: (module, _rules_for(name, module)) for name, module in model.named_modules()}


def _json_value(value: Any) -> Any:
    """``value`` as JSON holds it (tuples become lists), or None when JSON cannot hold it."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
        return list(value)
    return None


def _clip(text: str, limit: int = 80) -> str:
    """Text from a structure file as one short line: control characters escaped, long text cut."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    """A value from a structure file, as JSON writes it, on one short line."""
    try:
        return _clip(json.dumps(value))
    except (TypeError, ValueError):
        return _clip(repr(value))


def _module_field(name: str) -> str:
    return f"modules.{_clip(name)}" if name else 'modules[""]'


def _attribute_field(name: str, attr: str) -> str:
    return f"{_module_field(name)}.{_clip(attr)}"


def module_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The structural attributes of every module, keyed by module name.

    Only the attributes :func:`structural_rules` lists for a module are recorded, and only when
    the module has them with a value JSON can hold.

    Raises:
        CheckpointError: if an attribute holds a value its kind refuses (zero heads, a NaN
            scale): :func:`load` would refuse the file, so it is never written.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {}
        for attr, kind in structural_attributes(name, module).items():
            if attr not in vars(module):
                continue
            value = _json_value(vars(module)[attr])
            if value is None:  # None or an object: not a size this module is shaped by
                continue
            if not kind.accepts(value):
                raise CheckpointError(
                    f"{_attribute_field(name, attr)}: {_shown(value)} is not {kind.expected}"
                )
            attrs[attr] = value
        if attrs:
            out[name] = attrs
    return out


@functools.cache
def _factory_keywords() -> frozenset[str]:
    """timm.create_model's own keywords: they load files or configs, never shape a model."""
    import inspect

    import timm

    params = inspect.signature(timm.create_model).parameters.values()
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(named | {"num_classes", "features_only"})


def _timm_name_problem(name: Any) -> str | None:
    import timm

    if not isinstance(name, str):
        return f"{_shown(name)} is not a string; cannot rebuild the architecture"
    # Registry names only: "hf-hub:" and "local-dir:" names would read configs from elsewhere.
    if not timm.is_model(name):
        return f"{_shown(name)} is not a timm model name; cannot rebuild the architecture"
    return None


def _overrides_problem(overrides: Any) -> Problem | None:
    if not isinstance(overrides, dict):
        return "", f"{_shown(overrides)} is not an object of timm.create_model keyword arguments"
    for key in sorted(set(overrides) & _factory_keywords()):
        return key, "is a keyword of timm.create_model itself, which a checkpoint may not set"
    return None


def _description_problem(desc: Any) -> Problem | None:
    """The first top-level field of a structure description that is wrong, or None.

    Fields are checked in the order :func:`structure` writes them. ``modules`` is checked
    against the rebuilt model by :func:`load`.
    """
    if not isinstance(desc, dict):
        kind = type(desc).__name__
        return "format", f"not an agentprune structure file (the top level is a {kind})"
    if desc.get("format") != FORMAT:
        return "format", (
            f"is {_shown(desc.get('format'))}, not {FORMAT!r}: not an agentprune structure file"
        )
    for key in desc:
        if key not in STRUCTURE_KEYS:
            return _clip(key), f"unknown key (a structure file has {', '.join(STRUCTURE_KEYS)})"
    for key in ("timm_name", "num_classes", "overrides"):
        if key not in desc:
            return key, "missing; cannot rebuild the architecture"
    problem = _timm_name_problem(desc["timm_name"])
    if problem:
        return "timm_name", problem
    if not COUNT.accepts(desc["num_classes"]):
        return "num_classes", f"{_shown(desc['num_classes'])} is not {COUNT.expected}"
    problem = _overrides_problem(desc["overrides"])
    if problem:
        key, what = problem
        return (f"overrides.{_clip(key)}" if key else "overrides"), what
    if not isinstance(desc.get("modules", {}), dict):
        return "modules", "is not an object of module name -> attributes"
    digest = desc.get("sha256")
    if digest is not None and not (
        isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    ):
        return "sha256", f"{_shown(digest)} is not a lowercase hex SHA-256"
    extra = desc.get("extra", {})
    if not isinstance(extra, dict):
        return "extra", "is not an object"
    if not isinstance(extra.get("data_config", {}), dict | None):
        return "extra.data_config", "is not an object"
    return None


def structure(
    model: nn.Module, name: str, num_classes: int, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON structure description of ``model`` relative to a fresh ``name`` architecture.

    Raises:
        CheckpointError: one line naming the field, if :func:`load` would refuse the description.
    """
    desc = {
        "format": FORMAT,
        "timm_name": name,
        "num_classes": num_classes,
        "overrides": dict(overrides or {}),
        "modules": module_attributes(model),
    }
    problem = _description_problem(desc)
    if problem:
        raise CheckpointError(f"{problem[0]}: {problem[1]}")
    return desc


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

    Raises:
        CheckpointError: one line, before anything is written, if :func:`load` would refuse the
            structure description.
    """
    from safetensors.torch import save_file

    stem = Path(stem)
    weights = stem.with_suffix(".safetensors")
    meta = stem.with_suffix(".json")
    try:
        desc = structure(model, name, num_classes, overrides)
    except CheckpointError as err:
        raise CheckpointError(f"{meta}: {err}") from err
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
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


# --- load: every failure is one line "<file>: <field>: <what is wrong>" ------------------------


def _error(path: Path, field: str, what: str) -> CheckpointError:
    text = f"{path}: {field}: {what}"
    return CheckpointError(text.replace("\r", "\\r").replace("\n", "\\n"))


def _read_description(meta: Path) -> dict[str, Any]:
    try:
        desc = json.loads(meta.read_text(encoding="utf-8"))
    except OSError as err:
        raise _error(meta, "file", f"cannot be read ({_first_line(err)})") from err
    # ValueError: bad JSON, bad UTF-8, or an integer beyond Python's digit limit.
    except (ValueError, RecursionError) as err:
        raise _error(
            meta, "JSON", f"not a JSON structure description ({_first_line(err)})"
        ) from err
    problem = _description_problem(desc)
    if problem:
        raise _error(meta, *problem)
    return desc


def _read_weights(weights: Path, meta: Path, digest: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        actual = sha256(weights) if digest is not None else None
    except OSError as err:
        raise _error(weights, "file", f"cannot be read ({_first_line(err)})") from err
    if actual != digest:
        raise _error(weights, "sha256", f"checksum differs from {meta.name}'s; the file is corrupt")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise _error(
            weights, "safetensors", f"not a readable safetensors file ({_first_line(err)})"
        ) from err
    if metadata.get("format") != FORMAT:
        raise _error(
            weights, "metadata.format", f"is {_shown(metadata.get('format'))}, not {FORMAT!r}"
        )
    return state


def _rebuild(desc: dict[str, Any], meta: Path) -> nn.Module:
    name, overrides = desc["timm_name"], desc["overrides"]
    try:
        return create(name, desc["num_classes"], overrides, pretrained=False)
    # Constructors refuse keywords and values with any exception type (TypeError, ValueError,
    # AssertionError, ZeroDivisionError, ...); each is the file's fault here.
    except Exception as err:
        found = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        field = "overrides" if overrides else "timm_name"
        if found and found.group(1) in overrides:
            field = f"overrides.{_clip(found.group(1))}"
        raise _error(
            meta,
            field,
            f"cannot rebuild {name!r} ({type(err).__name__}: {_first_line(err)})",
        ) from err


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


def _restore_attributes(ruled: RuledModules, modules: dict[str, Any], meta: Path) -> None:
    """Set the structural attributes a structure file records, refusing anything else."""
    for name, attrs in modules.items():
        entry = ruled.get(name)  # a lookup: no path from the file is ever getattr'd
        if entry is None:
            raise _error(meta, _module_field(name), "no such module in the rebuilt architecture")
        if not isinstance(attrs, dict):
            raise _error(meta, _module_field(name), "is not an object of attribute -> value")
        module, rules = entry
        allowed = _allowed(rules)
        for attr, value in attrs.items():
            field = _attribute_field(name, attr)
            kind = allowed.get(attr)
            if kind is None:
                listed = ", ".join(sorted(allowed)) or "none"
                raise _error(
                    meta,
                    field,
                    f"not a structural attribute of {type(module).__name__} (allowed: {listed})",
                )
            if attr not in vars(module):
                raise _error(meta, field, f"this {type(module).__name__} has no such attribute")
            if not kind.accepts(value):
                raise _error(meta, field, f"{_shown(value)} is not {kind.expected}")
            setattr(module, attr, kind.restore(value))


def _check_shapes(model: nn.Module, ruled: RuledModules, num_classes: int, meta: Path) -> None:
    """Check every structural attribute, then the file's num_classes, against the tensors."""
    # Children before their parents: a Linear whose own weight disagrees is named, rather than
    # the attention that reads it.
    for name, (module, rules) in reversed(ruled.items()):
        for rule in rules:
            found = rule.check(name, module)
            if found:
                raise _error(meta, _attribute_field(name, found[0]), found[1])
    problem = _classifier_problem(model, num_classes)
    if problem:
        raise _error(meta, "num_classes", problem)


def load(stem: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save`, rebuilding its (pruned) architecture without pickle.

    The structure file is data: only the attributes :func:`structural_rules` lists for each
    module are set, each checked against its kind and then against the weights' shapes; nothing
    in it is called, imported or fetched.

    Args:
        stem: path without suffix, or the ``.safetensors``/``.json`` path.

    Returns:
        The model (eval mode) and its structure description.

    Raises:
        CheckpointError: one line ``<file>: <field>: <what is wrong>``, if a file is missing,
            corrupt, foreign, or does not fit the structure.
    """
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for path in (weights, meta):
        if not path.is_file():
            raise _error(path, "file", "checkpoint file is missing")
    desc = _read_description(meta)
    state = _read_weights(weights, meta, desc.get("sha256"))
    model = _rebuild(desc, meta)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        unexpected = sorted(set(state) - expected)[:3]
        raise _error(
            weights,
            "tensors",
            f"do not match {desc['timm_name']} (missing {missing}, unexpected {unexpected})",
        )
    _resize_tensors(model, {k: tuple(v.shape) for k, v in state.items()})
    ruled = _ruled_modules(model)
    _restore_attributes(ruled, desc.get("modules", {}), meta)
    _check_shapes(model, ruled, desc["num_classes"], meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. a dtype the parameter cannot take
        raise _error(weights, "tensors", f"do not load ({_first_line(err)})") from err
    return model.eval(), desc


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
