"""Model profiling: MACs/params, a breakdown by group kind, dependency and isomorphic groups, the
sensitivity of each group kind, and the safety bounds derived from it (written to ``profile.json``).
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentprune.pruning import structured
from agentprune.pruning.settings import GROUP_KINDS
from agentprune.settings import ProfileSettings

# Module-name globs per breakdown kind, first match wins. Names follow timm's ViT/DeiT/ConvNeXt.
BREAKDOWN_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention_qkv", ("*attn.qkv",)),
    ("attention_proj", ("*attn.proj",)),
    ("mlp", ("*mlp.fc1", "*mlp.fc2")),
    ("classifier", ("head", "head.fc", "head_dist", "fc", "classifier")),
    ("embedding", ("patch_embed.proj",)),
    ("conv_stages", ("stem.*", "stages.*")),
)


def _kind_of(name: str, kinds: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    for kind, patterns in kinds:
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            return kind
    return "other"


def _leaf_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """MACs of every Linear/Conv2d layer at batch 1, measured with forward hooks."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                per_out = module.in_features
            else:
                per_out = module.in_channels // module.groups
                per_out *= module.kernel_size[0] * module.kernel_size[1]
            macs[name] = macs.get(name, 0) + int(output.numel() // output.shape[0]) * per_out

        return count

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        for handle in hooks:
            handle.remove()
    return macs


def macs_breakdown(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """MACs per breakdown kind (Linear/Conv layers by name), the attention matmuls, and the rest
    (norms, activations), adding up to the Torch-Pruning total."""
    total, _ = structured.count_macs(model, example_inputs)
    out: Counter[str] = Counter()
    leaf = _leaf_macs(model, example_inputs)
    for name, macs in leaf.items():
        out[_kind_of(name, BREAKDOWN_KINDS)] += macs
    names = {m: n for n, m in model.named_modules()}
    for attn in structured.attention_modules(model):
        # softmax(q k^T) v: two (tokens x tokens x attn_dim) products per image.
        qkv = attn.qkv
        tokens = leaf.get(names[qkv], 0) // max(1, qkv.in_features * qkv.out_features)
        out["attention_matmul"] += 2 * tokens * tokens * (qkv.out_features // 3)
    out["other"] += int(total) - sum(out.values())
    return dict(out)


def _isomorphic_tag(graph, group) -> str:
    """The structural signature Torch-Pruning uses to put groups in one isomorphic scope."""
    parts = []
    for dep, _ in group:
        direction = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        parts.append(
            f"{type(dep.source.module).__name__}>{type(dep.target.module).__name__}:{direction}"
        )
    return "|".join(parts)


def dependency_groups(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    """Count dependency groups and isomorphic groups, and list each group's root, kind and width."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    ignored = structured.classifier_modules(model)
    groups = []
    tags: Counter[str] = Counter()
    for group in graph.get_all_groups(
        ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]
    ):
        root = group[0].dep.target.module
        name = names.get(root, "?")
        tag = _isomorphic_tag(graph, group)
        tags[tag] += 1
        pruned_outputs = [
            names.get(dep.target.module, "?")
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
        ]
        kinds = [_kind_of(n, GROUP_KINDS) for n in pruned_outputs]
        # A group that also prunes the stem/patch embedding is the residual stream, whatever its
        # root.
        kind = "residual" if "residual" in kinds else _kind_of(name, GROUP_KINDS)
        groups.append(
            {
                "root": name,
                "kind": kind,
                "channels": int(graph.get_out_channels(root) or 0),
                "modules": len(group),
                "isomorphic_tag": tag,
            }
        )
    return {
        "dependency_groups": len(groups),
        "isomorphic_groups": len(tags),
        "groups": groups,
    }


def calibration_loss(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean cross-entropy over calibration batches."""
    model.eval()
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x), y)) for x, y in batches]
    return sum(losses) / max(1, len(losses))


def prune_kind(
    model: nn.Module, kind: str, ratio: float, roots: list[str], example_inputs: torch.Tensor
) -> nn.Module:
    """A copy of ``model`` with only the groups of ``kind`` pruned by ``ratio`` (L2 magnitude).

    ``kind == "heads"`` removes whole attention heads instead of channels.
    """
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    num_heads = {a.qkv: int(a.num_heads) for a in structured.attention_modules(pruned)}
    kw: dict[str, Any] = {}
    if kind == "heads":
        # A vanishing channel ratio on qkv puts its groups in scope; only heads are removed.
        kw = dict(
            pruning_ratio=0.0,
            pruning_ratio_dict={a.qkv: 1e-9 for a in structured.attention_modules(pruned)},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
    else:
        kw = dict(
            pruning_ratio=0.0,
            pruning_ratio_dict={modules[r]: ratio for r in roots},
            prune_head_dims=True,
        )
    pruner = tp.pruner.BasePruner(
        pruned,
        example_inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False,
        ignored_layers=structured.classifier_modules(pruned),
        num_heads=num_heads,
        **kw,
    )
    pruner.step()
    structured.fix_timm_attributes(pruned, pruner.num_heads, rescale=False)
    return pruned


def safety_bound(
    ratios: Sequence[float],
    deltas: Sequence[float],
    max_increase: float,
    floor: float,
    ceiling: float,
) -> float:
    """The largest pruning ratio whose calibration-loss increase stays within ``max_increase``,
    linearly interpolated between measured points (0 at ratio 0), clipped to [floor, ceiling]."""
    points = [(0.0, 0.0), *sorted(zip(ratios, deltas))]
    bound = points[-1][0] if points[-1][1] <= max_increase else 0.0
    for (r0, d0), (r1, d1) in zip(points, points[1:]):
        if d1 > max_increase:
            bound = r0 + (r1 - r0) * (max_increase - d0) / (d1 - d0) if d1 != d0 else r0
            break
    if all(d <= max_increase for _, d in points):
        # Extrapolate beyond the last measured ratio only up to the ceiling.
        bound = ceiling
    return float(min(ceiling, max(floor, bound)))


def sensitivity(
    model: nn.Module,
    example_inputs: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ratios: Sequence[float],
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    """Calibration loss after pruning only one group kind at each ratio."""
    base = calibration_loss(model, batches)
    roots_by_kind: dict[str, list[str]] = {}
    for group in groups:
        if group["kind"] != "other":
            roots_by_kind.setdefault(group["kind"], []).append(group["root"])
    if structured.attention_modules(model):
        roots_by_kind["heads"] = []
    result: dict[str, Any] = {}
    for kind, roots in sorted(roots_by_kind.items()):
        losses = []
        for ratio in ratios:
            try:
                pruned = prune_kind(model, kind, ratio, roots, example_inputs)
                losses.append(calibration_loss(pruned, batches))
            except (structured.PruningError, RuntimeError) as err:
                losses.append(float("inf"))
                result.setdefault("errors", []).append(f"{kind}@{ratio}: {err}")
        result[kind] = {
            "ratios": list(ratios),
            "loss": losses,
            "loss_increase": [loss - base for loss in losses],
            "groups": len(roots),
        }
    return {
        "base_loss": base,
        "kinds": {k: v for k, v in result.items() if k != "errors"},
        "errors": result.get("errors", []),
    }


def profile_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: ProfileSettings,
) -> dict[str, Any]:
    """Everything the planners read about a base model.

    Args:
        model: the base model.
        example_inputs: a batch-1 input.
        batches: calibration batches (from the validation split).
        cfg: the profile settings (``sensitivity_ratios``, ``max_loss_increase``,
            ``bound_floor``, ``bound_ceiling``).

    Returns:
        The profile (JSON-able).
    """
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    macs, params = structured.count_macs(model, example_inputs)
    groups = dependency_groups(model, example_inputs)
    sens = sensitivity(model, example_inputs, batches, cfg.sensitivity_ratios, groups["groups"])
    bounds = {
        kind: safety_bound(
            info["ratios"],
            info["loss_increase"],
            float(cfg.max_loss_increase),
            float(cfg.bound_floor),
            float(cfg.bound_ceiling),
        )
        for kind, info in sens["kinds"].items()
    }
    attn = structured.attention_modules(model)
    return {
        "macs": macs,
        "params": params,
        "breakdown": macs_breakdown(model, example_inputs),
        "num_heads": [int(a.num_heads) for a in attn],
        "dependency_groups": groups["dependency_groups"],
        "isomorphic_groups": groups["isomorphic_groups"],
        "groups": groups["groups"],
        "sensitivity": sens,
        "safety_bounds": {
            "max_ratio": bounds,
            "rule": (
                f"largest ratio whose calibration-loss increase is <= {cfg.max_loss_increase} "
                f"(interpolated), clipped to [{cfg.bound_floor}, {cfg.bound_ceiling}]"
            ),
        },
        "seconds": time.perf_counter() - start,
    }
