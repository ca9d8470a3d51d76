"""The method registry: method name -> strategy object, and the :class:`Method` base.

A method knows which config sections it reads and turns them into its typed settings
(:meth:`Method.resolve_settings`), how to *plan* (write the ``plan.json`` decision) and how to
*prune* (carry a plan out on a base model). The rest of the pipeline only calls :func:`get` and
never branches on a method's name, so a new method is one class plus one ``@register`` line.

This module imports no method (``agentprune.pruning.catalog`` imports them all, which registers
them), so the library has no import cycle through the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from agentprune.settings import DataSettings

if TYPE_CHECKING:  # torch stays out of planning and config checks, which need none of it
    import torch
    from torch import nn

REGISTRY: dict[str, Method] = {}


class UnknownMethodError(KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding one instance of ``cls`` to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"method {name!r} is not registered (known: {', '.join(sorted(REGISTRY))})"
        ) from None


def names() -> list[str]:
    """All registered method names."""
    return sorted(REGISTRY)


@dataclass(frozen=True)
class PlanContext:
    """What a planner knows about its run besides its settings.

    Attributes:
        dataset: the data set's name.
        model: the ``models[].name``.
        timm: its timm name.
        seed: the run's seed.
        target_gmacs: the target in GMACs when it was given so (else None).
        base_stem: the base model (planners that run trials load it).
        threads: CPU threads the job may use.
        data: the data set's settings (planners that run trials load it).
        calibration_batch_size: images per calibration batch.
    """

    dataset: str
    model: str
    timm: str
    seed: int
    target_gmacs: float | None
    base_stem: str | None
    threads: int | None
    data: DataSettings
    calibration_batch_size: int


class Method:
    """A pruning method: its settings, a planner and a pruner.

    Attributes:
        name: the registry key and the ``{method}`` wildcard.
        family: ``structured`` (the ratio is the fraction of MACs removed) or ``unstructured`` (the
            ratio is the sparsity of the prunable weights).
        sections: the top-level config sections its settings come from (besides its
            ``method_settings`` entry): a change there reruns this method's chain only.
        uses_agents: the plan comes from the LLM agents (its transcript goes into the report).
        runs_trials: the planner prunes, fine-tunes and evaluates trial models, so planning is as
            heavy as the run itself (the workflow's ``plan_trials`` rule: a GPU job on a cluster).
        needs_profile: the planner reads ``profile.json`` (the CLI profiles only for these).
        ablation: the registered method that is this one without its distinguishing part (the
            agents' loop without an LLM): the tables pair the two.
        needs_llm: the planner asks an LLM (a config without a usable one is an error).
        families: the model families it prunes (``models[].family``): ``vision`` through this
            class's ``plan``/``prune``, ``lm`` through the strategy of the same name in
            :mod:`agentprune.lm.strategies`. A study naming it for another family is refused.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "structured"
    sections: ClassVar[tuple[str, ...]] = ()
    uses_agents: ClassVar[bool] = False
    runs_trials: ClassVar[bool] = False
    needs_profile: ClassVar[bool] = False
    ablation: ClassVar[str | None] = None
    needs_llm: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...]] = ("vision",)

    def resolve_settings(self, sections: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
        """The method's typed settings from its config sections and its ``method_settings``
        entry (the user's overrides, whose keys must be ones the settings accept).

        Raises:
            ConfigError: one line naming an unknown or invalid ``method_settings`` key.
        """
        raise NotImplementedError

    def load_settings(self, plain: Mapping[str, Any]) -> Any:
        """The typed settings back from their plain form (a plan rule's params)."""
        raise NotImplementedError

    def plan(
        self, target: float, profile: dict[str, Any], settings: Any, context: PlanContext
    ) -> dict[str, Any]:
        """Decide how to prune; the returned dict is ``plan.json``.

        Args:
            target: the ``{ratio}`` wildcard.
            profile: the base model's ``profile.json``.
            settings: the method's typed settings (see :meth:`resolve_settings`).
            context: the run's identity and what planners that run trials need.
        """
        raise NotImplementedError

    def prune(
        self,
        base: nn.Module,
        plan: dict[str, Any],
        example_inputs: torch.Tensor,
        calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
        seed: int,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Carry ``plan`` out on a copy of ``base``; return the pruned model and a report.

        The report should hold ``macs`` and ``params`` of the pruned model (counted with
        ``tp.utils.count_ops_and_params``); the evaluate step reuses them.
        """
        raise NotImplementedError

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Masks that must stay applied during fine-tuning (None: the shapes carry the pruning)."""
        return None
