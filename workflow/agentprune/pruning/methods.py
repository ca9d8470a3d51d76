"""The method registry: method name -> strategy object.

A method knows how to *plan* (write the ``plan.json`` decision) and how to *prune* (carry a plan
out on a base model). The rest of the pipeline only calls :func:`get` and never branches on a
method's name, so a new method is one class plus one ``@register`` line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from agentprune.pruning.settings import PrunerSettings

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


class Method:
    """A pruning method: a planner plus a pruner.

    Attributes:
        name: the registry key and the ``{method}`` wildcard.
        family: ``structured`` (the ratio is the fraction of MACs removed) or ``unstructured`` (the
            ratio is the sparsity of the prunable weights).
        uses_agents: the plan comes from the LLM agents (its transcript goes into the report).
        runs_trials: the planner prunes, fine-tunes and evaluates trial models, so planning is as
            heavy as the run itself (the workflow's ``plan_trials`` rule: a GPU job on a cluster).
        needs_profile: the planner reads ``profile.json`` (the CLI profiles only for these).
        config_section: the top-level config section the planner reads (a change there reruns
            this method's chain only).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "structured"
    uses_agents: ClassVar[bool] = False
    runs_trials: ClassVar[bool] = False
    needs_profile: ClassVar[bool] = False
    config_section: ClassVar[str | None] = None

    def plan(
        self,
        target: float,
        profile: dict[str, Any],
        overrides: dict[str, Any],
        context: dict[str, Any],
    ) -> dict[str, Any]:
        """Decide how to prune; the returned dict is ``plan.json``.

        Args:
            target: the ``{ratio}`` wildcard.
            profile: the base model's ``profile.json``.
            overrides: the config's ``method_settings[name]`` (user overrides of the recipe).
            context: identity and config: ``dataset``, ``model``, ``seed``, ``config``.
        """
        raise NotImplementedError

    def prune(
        self,
        base: nn.Module,
        plan: dict[str, Any],
        example_inputs: torch.Tensor,
        calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
        seed: int,
        prune_cfg: dict[str, Any],
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Carry ``plan`` out on a copy of ``base``; return the pruned model and a report.

        The report should hold ``macs`` and ``params`` of the pruned model (counted with
        ``tp.utils.count_ops_and_params``); the evaluate step reuses them.
        """
        raise NotImplementedError

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Masks that must stay applied during fine-tuning (None: the shapes carry the pruning)."""
        return None


def _provenance(planner: str, source: str, seconds: float) -> dict[str, Any]:
    return {
        "backend": "fixed",
        "planner": planner,
        "llm_model": None,
        "recipe_source": source,
        "exchanges": [],
        "fallbacks": [],
        "clamps": [],
        "trials": [],
        "planning_seconds": seconds,
    }


class StructuredRecipe(Method):
    """A fixed structured recipe: Torch-Pruning settings searched to the MACs target."""

    family = "structured"
    recipe: ClassVar[dict[str, Any]] = {}
    source: ClassVar[str] = ""

    def plan(self, target, profile, overrides, context):
        start = time.perf_counter()
        prune_cfg = context["config"]["prune"]
        settings = PrunerSettings.from_dict(
            {
                "calibration_batches": int(prune_cfg["calibration_batches"]),
                **self.recipe,
                **overrides,
            }
        )
        return {
            "method": self.name,
            "family": self.family,
            "dataset": context["dataset"],
            "model": context["model"],
            "seed": context["seed"],
            "target": {"metric": "macs_fraction_removed", "value": float(target)},
            "pruner": settings.to_dict(),
            "search": {
                "tolerance": float(prune_cfg["tolerance"]),
                "max_steps": int(prune_cfg["max_search_steps"]),
            },
            "provenance": _provenance(
                type(self).__name__, self.source, time.perf_counter() - start
            ),
        }

    def prune(self, base, plan, example_inputs, calibration, seed, prune_cfg):
        from agentprune.pruning import structured

        settings = PrunerSettings.from_dict(plan["pruner"])
        return structured.prune_to_target(
            base,
            settings,
            float(plan["target"]["value"]),
            example_inputs,
            calibration,
            seed,
            tolerance=float(plan["search"]["tolerance"]),
            max_steps=int(plan["search"]["max_steps"]),
        )


@register
class Isomorphic(StructuredRecipe):
    """Isomorphic Pruning (Fang et al., ECCV'24): Taylor importance ranked within isomorphic groups,
    with head and head-dim pruning."""

    name = "isomorphic"
    # Isomorphic-Pruning's DeiT run: --pruning-type taylor --global-pruning --isomorphic
    # --prune-num-heads --head-pruning-ratio 0.5 at --pruning-ratio 0.5 (so heads at 1x the ratio);
    # head dims are pruned with the channel ratio.
    recipe = {
        "importance": "taylor",
        "global_pruning": True,
        "isomorphic": True,
        "prune_num_heads": True,
        "prune_head_dims": True,
        "head_ratio_scale": 1.0,
    }
    source = "Isomorphic-Pruning (arXiv 2407.04616) DeiT recipe"


@register
class MagnitudeL1(StructuredRecipe):
    """Uniform (per-layer) L1-magnitude channel pruning (DepGraph's L1 baseline)."""

    name = "magnitude_l1"
    recipe = {"importance": "magnitude_l1", "global_pruning": False}
    source = "DepGraph (arXiv 2301.12900) uniform magnitude baseline"


@register
class MagnitudeL2(StructuredRecipe):
    """Uniform (per-layer) L2-magnitude channel pruning."""

    name = "magnitude_l2"
    recipe = {"importance": "magnitude_l2", "global_pruning": False}
    source = "DepGraph (arXiv 2301.12900) uniform magnitude baseline"


@register
class Taylor(StructuredRecipe):
    """First-order Taylor importance, ranked globally, not isomorphic."""

    name = "taylor"
    recipe = {"importance": "taylor", "global_pruning": True, "isomorphic": False}
    source = "Molchanov et al. 2019 Taylor criterion via Torch-Pruning GroupTaylorImportance"


@register
class Random(StructuredRecipe):
    """Seeded random channel scores, uniform per layer: the floor every method must beat."""

    name = "random"
    recipe = {"importance": "random", "global_pruning": False}
    source = "random baseline"


class UnstructuredRecipe(Method):
    """A one-shot unstructured recipe: score every prunable weight, zero the lowest-scored ones
    at exactly the target sparsity of each layer."""

    family = "unstructured"
    recipe: ClassVar[dict[str, Any]] = {}
    source: ClassVar[str] = ""

    def plan(self, target, profile, overrides, context):
        start = time.perf_counter()
        pruner = {
            "include": ["*"],
            "exclude": [],
            "calibration_batches": int(context["config"]["prune"]["calibration_batches"]),
            **self.recipe,
            **overrides,
        }
        return {
            "method": self.name,
            "family": self.family,
            "dataset": context["dataset"],
            "model": context["model"],
            "seed": context["seed"],
            "target": {"metric": "sparsity", "value": float(target)},
            "pruner": pruner,
            "provenance": _provenance(
                type(self).__name__, self.source, time.perf_counter() - start
            ),
        }

    def scores(self, model, layers, calibration, pruner):
        """Per-layer weight scores (higher keeps)."""
        raise NotImplementedError

    def prune(self, base, plan, example_inputs, calibration, seed, prune_cfg):
        import copy

        from agentprune.pruning import unstructured

        start = time.perf_counter()
        pruner = plan["pruner"]
        sparsity = float(plan["target"]["value"])
        model = copy.deepcopy(base).eval()
        layers = unstructured.prunable_layers(model, pruner["include"], pruner["exclude"])
        scores = self.scores(model, layers, calibration, pruner)
        masks = unstructured.masks_from_scores(scores, sparsity, bool(pruner["per_row"]))
        unstructured.apply_masks(model, masks)
        return model, sparsity_report(model, layers, sparsity, example_inputs, start)

    def masks(self, model):
        from agentprune.pruning import unstructured

        return unstructured.masks_of(model)


def sparsity_report(model, layers, target, example_inputs, start) -> dict[str, Any]:
    """What the prune step reports for an unstructured method (MACs are counted dense)."""
    from agentprune import evaluate
    from agentprune.pruning import structured, unstructured

    macs, params = structured.count_macs(model, example_inputs)
    achieved = evaluate.sparsity(model)["sparsity"]
    return {
        "target": target,
        "achieved": achieved,
        "densities": unstructured.layer_densities(model, layers),
        "macs": macs,
        "params": params,
        "seconds": time.perf_counter() - start,
    }


@register
class Magnitude(UnstructuredRecipe):
    """|W|, compared within each layer (``per_row: true`` compares within output rows)."""

    name = "magnitude"
    recipe = {"scores": "magnitude", "per_row": False}
    source = "layer-wise magnitude pruning (Han et al., 2015)"

    def scores(self, model, layers, calibration, pruner):
        from agentprune.pruning import unstructured

        return unstructured.magnitude_scores(layers)


@register
class Wanda(UnstructuredRecipe):
    """|W| x the input feature norm from calibration activations, compared per output row."""

    name = "wanda"
    recipe = {"scores": "wanda", "per_row": True}
    source = "Wanda (Sun et al., arXiv 2306.11695)"

    def scores(self, model, layers, calibration, pruner):
        from agentprune.pruning import unstructured

        batches = calibration[: int(pruner["calibration_batches"])]
        return unstructured.wanda_scores(model, layers, batches)


# The agents' method registers itself on import; it lives with the agents because it is one of
# them. Imported last, once everything it subclasses exists.
from agentprune.agents import method as _multi_agent  # noqa: E402, F401
from agentprune.pruning.icbs import method as _icbs  # noqa: E402, F401
