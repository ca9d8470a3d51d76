"""The pruning agent: a trial prune to the exact MACs target through the spine's search, verified
(finite forward pass, every kind inside its bound)."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from agentprune.agents.analysis import SCOPES
from agentprune.pruning import structured
from agentprune.pruning.settings import PrunerSettings, TargetOutOfReach


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
            # Channel counts round to whole channels (one of slack); head counts are exact.
            widths = _widths(base, SCOPES.get(kind, ()))
            slack = (1.0 / min(widths.values()) if widths else 0.0) + 1e-9
            if ratio > caps[kind] + slack:
                raise TargetOutOfReach(
                    f"{kind} pruned by {ratio:.3f}, above its bound {caps[kind]:.3f}"
                )
        report["realized_ratios"] = realized
        return model, report
