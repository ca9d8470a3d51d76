"""The model families of a study (``models[].family``): which data sets, step settings, step
implementations and methods go with each.

* ``vision``: timm classifiers on image data sets; the steps of :mod:`agentprune.steps`.
* ``lm``: Hugging Face causal LMs on a text corpus; the steps of :mod:`agentprune.lm.steps`.

The workflow's rules are the same for both: a rule's params are the plain form of its step's
settings (built by :mod:`agentprune.resolve` for the model's family), and the script rebuilds
them with :func:`build_step`, which reads the family from the params themselves (an lm step's
settings carry ``family: lm``; a vision step's have no such field). Each function of
:mod:`agentprune.steps` hands an lm step on to the lm family's implementation (:func:`of_step`).
Nothing else branches on a family: a method serves a family when its ``families`` name it.

This module imports no torch (the Snakefile and the scripts import it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from agentprune.lm import settings as lm_settings
from agentprune.settings import (
    BaseModelStep,
    DataSettings,
    EvaluateStep,
    FinetuneStep,
    PlanStep,
    ProfileStep,
    PruneStep,
    WeightsEntry,
    build,
)

STEPS = ("dataset", "weights", "download_model", "profile", "plan", "prune", "finetune", "evaluate")
"""The steps whose settings a family defines."""


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the ``models[].family`` value.
        datasets: the ``dataset.name`` values its models are studied on.
        steps_module: the module with its step functions (same names and arguments as
            :mod:`agentprune.steps`), or None for the functions of :mod:`agentprune.steps`.
        step_types: step -> the settings class its rule's params are rebuilt into.
    """

    name: str
    datasets: tuple[str, ...]
    steps_module: str | None
    step_types: dict[str, type] = field(default_factory=dict)

    def supports(self, method: Any) -> bool:
        """Whether a registered method prunes this family's models."""
        return self.name in getattr(method, "families", ("vision",))

    def steps(self) -> ModuleType | None:
        """The module implementing this family's steps (None: :mod:`agentprune.steps`)."""
        return None if self.steps_module is None else importlib.import_module(self.steps_module)


VISION = Family(
    name="vision",
    datasets=("digits", "synthetic", "cifar10", "cifar100", "imagenet"),
    steps_module=None,
    step_types={
        "dataset": DataSettings,
        "weights": WeightsEntry,
        "download_model": BaseModelStep,
        "profile": ProfileStep,
        "plan": PlanStep,
        "prune": PruneStep,
        "finetune": FinetuneStep,
        "evaluate": EvaluateStep,
    },
)

LM = Family(
    name=lm_settings.FAMILY,
    datasets=lm_settings.CORPORA,
    steps_module="agentprune.lm.steps",
    step_types={
        "dataset": DataSettings,
        "weights": lm_settings.LMWeights,
        "download_model": lm_settings.LMBaseStep,
        "profile": lm_settings.LMProfileStep,
        "plan": lm_settings.LMPlanStep,
        "prune": lm_settings.LMPruneStep,
        "finetune": lm_settings.LMFinetuneStep,
        "evaluate": lm_settings.LMEvaluateStep,
    },
)

FAMILIES: dict[str, Family] = {f.name: f for f in (VISION, LM)}


def get(name: str) -> Family:
    """The family called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"model family {name!r} is unknown (known: {sorted(FAMILIES)})") from None


def for_dataset(name: str) -> Family:
    """The family whose models are studied on data set ``name``."""
    for family in FAMILIES.values():
        if name in family.datasets:
            return family
    raise KeyError(f"data set {name!r} belongs to no model family")


def of_step(step: Any) -> ModuleType | None:
    """The module implementing a step's family (None: :mod:`agentprune.steps` itself)."""
    return get(getattr(step, "family", VISION.name)).steps()


def build_step(kind: str, values: Mapping[str, Any], where: str) -> Any:
    """A step's settings from a rule's params, of the class its family defines for ``kind``."""
    name = values.get("family", VISION.name) if isinstance(values, Mapping) else VISION.name
    family = get(str(name))
    return build(family.step_types[kind], values, where)
