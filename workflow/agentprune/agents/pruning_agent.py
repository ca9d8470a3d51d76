"""The pruning agent: a trial prune to the exact MACs target through the spine's search, verified
(finite forward pass, every kind inside its bound)."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch
from torch import nn

from agentprune.agents.analysis import SCOPES
from agentprune.pruning import structured
from agentprune.pruning.settings import PrunerSettings, PruningError, TargetOutOfReach


def _widths(model: nn.Module, globs: tuple[str, ...]) -> dict[str, int]:
    return {
        name: m.out_features if isinstance(m, nn.Linear) else m.out_channels
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and any(fnmatch.fnmatch(name, g) for g in globs)
    }


def realized_ratios(base: nn.Module, pruned: nn.Module, kinds: list[str]) -> dict[str, float]:
    """Per kind, the largest fraction of any one layer's channels (or of all heads) removed."""
    out: dict[str, float] = {}
    for kind in kinds:
        if kind == "heads":
            before = sum(int(a.num_heads) for a in structured.attention_modules(base))
            after = sum(int(a.num_heads) for a in structured.attention_modules(pruned))
            out[kind] = 1 - after / before if before else 0.0
            continue
        wide = _widths(base, SCOPES.get(kind, ()))
        narrow = _widths(pruned, SCOPES.get(kind, ()))
        out[kind] = max((1 - narrow[n] / w for n, w in wide.items() if n in narrow), default=0.0)
    return out


def _slack(base: nn.Module, kind: str) -> float:
    """How far past its bound a kind may be cut: one channel of its narrowest layer (channel
    counts round to whole channels); none for heads, whose counts are exact."""
    widths = _widths(base, SCOPES.get(kind, ()))
    return (1.0 / min(widths.values()) if widths else 0.0) + 1e-9


def fewest_macs(
    base: nn.Module, caps: dict[str, float], example_inputs: torch.Tensor, seed: int
) -> tuple[int, int] | None:
    """The fewest MACs any trial under ``caps`` can leave, and the base model's MACs; None when
    that cannot be told.

    A trial's layers are never cut past their kind's bound (plus one channel of slack), and the
    groups of no kind never past the largest bound; fewer channels never cost more MACs. So one
    uniform prune with every layer at exactly that limit removes at least as much as any trial
    can, whatever its importance or grouping.
    """
    limits = {k: min(1.0, c + (0.0 if k == "heads" else _slack(base, k))) for k, c in caps.items()}
    ceiling = max(limits.values(), default=0.0)
    base = copy.deepcopy(base).eval()
    base_macs = structured.count_macs(base, example_inputs)[0]
    if ceiling <= 0.0:
        return base_macs, base_macs
    channel_kinds = [k for k in limits if k != "heads"]
    settings = PrunerSettings.from_dict(
        {
            "importance": "magnitude_l2",
            "global_pruning": False,
            "isomorphic": False,
            "prune_num_heads": limits.get("heads", 0.0) > 0,
            "prune_head_dims": True,
            "head_ratio_scale": limits.get("heads", 0.0) / ceiling,
            "scope_ratios": {g: limits[k] / ceiling for k in channel_kinds for g in SCOPES[k]},
            "scope_max_ratio": {g: limits[k] for k in channel_kinds for g in SCOPES[k]},
            "max_pruning_ratio": ceiling,
            "max_head_ratio": caps.get("heads", 0.0),
            "calibration_batches": 1,
        }
    )
    importance = structured.CachedImportance(settings.importance, seed)
    try:
        pruned = structured.prune_at(base, settings, ceiling, importance, example_inputs)
    except (PruningError, RuntimeError, ValueError):
        return None  # the check cannot tell; the trials will
    return structured.count_macs(pruned, example_inputs)[0], base_macs


class PruningAgent:
    """Runs one trial prune and checks it."""

    name = "pruning"

    def run(
        self,
        base: nn.Module,
        settings: PrunerSettings,
        target: float,
        example_inputs: torch.Tensor,
        calibration: list[tuple[torch.Tensor, torch.Tensor]],
        seed: int,
        search: dict[str, Any],
        caps: dict[str, float],
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Prune a copy of ``base`` to ``target`` and verify it.

        Raises:
            TargetOutOfReach: the target is out of reach under these settings, or is reached
                only by pruning a kind past its bound by more than one channel: either way the
                bounds leave it out of reach, which the coordinator answers by relaxing them.
            PruningError: the forward or backward pass fails or is not finite (checked by
                ``prune_to_target``).
        """
        model, report = structured.prune_to_target(
            base, settings, target, example_inputs, calibration, seed, **search
        )
        realized = realized_ratios(base, model, list(caps))
        for kind, ratio in realized.items():
            if ratio > caps[kind] + _slack(base, kind):
                raise TargetOutOfReach(
                    f"{kind} pruned by {ratio:.3f}, above its bound {caps[kind]:.3f}"
                )
        report["realized_ratios"] = realized
        return model, report
