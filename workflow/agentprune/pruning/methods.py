"""The method registry: method name -> strategy object.

A method knows how to *plan* (write the ``plan.json`` decision) and how to *prune* (carry a plan
out on a base model). The rest of the pipeline only calls :func:`get` and never branches on a
method's name, so a new method is one class plus one ``@register`` line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from agentprune.pruning.settings import GMACS_TOLERANCE, MODES, PrunerSettings, PruningError

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
        ablation: the registered method that is this one without its distinguishing part (the
            agents' loop without an LLM): the tables pair the two.
        needs_llm: the planner asks an LLM (a config without a usable one is an error).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "structured"
    uses_agents: ClassVar[bool] = False
    runs_trials: ClassVar[bool] = False
    needs_profile: ClassVar[bool] = False
    config_section: ClassVar[str | None] = None
    ablation: ClassVar[str | None] = None
    needs_llm: ClassVar[bool] = False

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


def structured_target(target: float, context: dict[str, Any]) -> dict[str, Any]:
    """``plan.json``'s target of a structured method: the MACs fraction to remove, and the GMACs
    it came from when it was given in GMACs (``context["target_gmacs"]``, set by the plan step)."""
    out: dict[str, Any] = {"metric": "macs_fraction_removed", "value": float(target)}
    if context.get("target_gmacs") is not None:
        out["gmacs"] = float(context["target_gmacs"])
    return out


def search_section(prune_cfg: dict[str, Any], mode: str = "macs_targeted") -> dict[str, Any]:
    """``plan.json``'s ``search`` of a structured method: the windows, the steps and the mode."""
    return {
        "tolerance": float(prune_cfg["tolerance"]),
        "gmacs_tolerance": float(prune_cfg.get("gmacs_tolerance", GMACS_TOLERANCE)),
        "max_steps": int(prune_cfg["max_search_steps"]),
        "mode": mode,
    }


def search_arguments(plan: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``structured.prune_to_target`` that ``plan`` sets."""
    search = plan["search"]
    return {
        "tolerance": float(search["tolerance"]),
        "max_steps": int(search["max_steps"]),
        "target_gmacs": plan["target"].get("gmacs"),
        "gmacs_tolerance": float(search.get("gmacs_tolerance", GMACS_TOLERANCE)),
        "mode": str(search.get("mode", "macs_targeted")),
    }


class StructuredRecipe(Method):
    """A fixed structured recipe: Torch-Pruning settings searched to the MACs target."""

    family = "structured"
    recipe: ClassVar[dict[str, Any]] = {}
    source: ClassVar[str] = ""

    def resolve(
        self, overrides: dict[str, Any], context: dict[str, Any]
    ) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
        """The recipe's pruner settings for this run, the search mode, and a provenance record.

        Args:
            overrides: the config's ``method_settings[name]``.
            context: see :meth:`Method.plan`.

        Returns:
            Settings (recipe, then overrides), ``macs_targeted``, and None.
        """
        return {**self.recipe, **overrides}, "macs_targeted", None

    def plan(self, target, profile, overrides, context):
        start = time.perf_counter()
        prune_cfg = context["config"]["prune"]
        recipe, mode, record = self.resolve(dict(overrides), context)
        settings = PrunerSettings.from_dict(
            {"calibration_batches": int(prune_cfg["calibration_batches"]), **recipe}
        )
        provenance = _provenance(type(self).__name__, self.source, 0.0)
        if record is not None:
            provenance["recipe"] = record
        provenance["planning_seconds"] = time.perf_counter() - start
        return {
            "method": self.name,
            "family": self.family,
            "dataset": context["dataset"],
            "model": context["model"],
            "seed": context["seed"],
            "target": structured_target(target, context),
            "pruner": settings.to_dict(),
            "search": search_section(prune_cfg, mode),
            "provenance": provenance,
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
            **search_arguments(plan),
        )


# Isomorphic-Pruning (github.com/VainF/Isomorphic-Pruning): where each pruner setting of the
# `isomorphic` recipe comes from, in its prune.py and scripts/pruning/*.sh.
ISOMORPHIC_SOURCES: dict[str, str] = {
    "importance": "scripts/pruning/*.sh --pruning-type taylor (GroupTaylorImportance)",
    "global_pruning": "scripts/pruning/*.sh --global-pruning",
    "isomorphic": "prune.py: its IsomorphicPruner unless --no-isomorphic (no script passes it)",
    "prune_num_heads": "prune.py: prune_num_heads=True",
    "prune_head_dims": "prune.py: prune_head_dims=True",
    "head_ratio_scale": "--head-pruning-ratio / --pruning-ratio (DeiT-B 4.2G/2.6G: 1)",
    "head_dim_ratio_scale": (
        "--head-dim-pruning-ratio / --pruning-ratio (DeiT-B 4.2G/2.6G: 0.5); prune.py puts every "
        "timm Attention in pruning_ratio_dict at that ratio"
    ),
    "round_to": "prune.py --round-to (default 2; the ConvNeXt scripts pass --round-to 2)",
    "attention_scale": (
        "prune.py sets num_heads and head_dim from the pruner, then scale = head_dim ** -0.5"
    ),
    "max_head_ratio": "no bound in the scripts; 0.9 only caps the head ratio the search may try",
    "calibration_batches": "--taylor-batchs 50 (prune.calibration_batches in config/paper.yaml)",
}
# The keys of a published row (method_settings.isomorphic.published[]), named after the script
# flags they copy; absent flags take prune.py's defaults.
PUBLISHED_FLAGS: dict[str, str] = {
    "pruning_ratio": "--pruning-ratio",
    "head_pruning_ratio": "--head-pruning-ratio",
    "head_dim_pruning_ratio": "--head-dim-pruning-ratio",
    "round_to": "--round-to",
    "remove_layers": "--remove-layers",
}
PUBLISHED_KEYS = frozenset({"timm", "target_gmacs", "script", *PUBLISHED_FLAGS})


def architecture(timm_name: str) -> str:
    """A timm name without its pretrained tag (``convnext_base.fb_in1k`` -> ``convnext_base``): the
    tag names weights, not a structure."""
    return timm_name.split(".", 1)[0]


def timm_name_of(context: dict[str, Any]) -> str | None:
    """The timm name of the plan's model (its ``config.models`` entry), None if not listed."""
    for entry in context["config"].get("models", []):
        if entry.get("name") == context["model"]:
            return entry.get("timm")
    return None


def _check_published_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise PruningError(f"{where} is not a mapping")
    unknown = sorted(set(row) - PUBLISHED_KEYS)
    if unknown:
        raise PruningError(f"{where} has unknown keys {unknown} (known: {sorted(PUBLISHED_KEYS)})")
    for key in ("timm", "target_gmacs", "script", "pruning_ratio"):
        if key not in row:
            raise PruningError(f"{where} lacks {key!r}")
    if not 0.0 < float(row["pruning_ratio"]) < 1.0:
        raise PruningError(f"{where}.pruning_ratio={row['pruning_ratio']} is not in (0, 1)")


def published_row(
    rows: list[dict[str, Any]], timm_name: str | None, target_gmacs: float | None
) -> dict[str, Any] | None:
    """The published row for this architecture and GMACs target (None: no row matches).

    Raises:
        PruningError: naming the first malformed row.
    """
    for i, row in enumerate(rows):
        _check_published_row(row, f"method_settings.isomorphic.published[{i}]")
    if timm_name is None or target_gmacs is None:
        return None
    for row in rows:
        same_target = math.isclose(float(row["target_gmacs"]), target_gmacs, rel_tol=1e-9)
        if same_target and architecture(str(row["timm"])) == architecture(timm_name):
            return row
    return None


def published_settings(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A published row as pruner settings, with each value's source (script and flag).

    The head and head-dim ratios become multiples of ``pruning_ratio``: the search's one knob
    then scales all three in the published proportions, and at the knob's published value they
    are the published ratios.
    """
    ratio = float(row["pruning_ratio"])
    heads = float(row.get("head_pruning_ratio", 0.0))  # prune.py's default
    head_dims = row.get("head_dim_pruning_ratio")  # prune.py's default None: no dict entry
    settings: dict[str, Any] = {
        "pruning_ratio": ratio,
        "prune_num_heads": heads > 0,
        "head_ratio_scale": heads / ratio,
        "head_dim_ratio_scale": None if head_dims is None else float(head_dims) / ratio,
        "round_to": int(row.get("round_to", 2)),  # prune.py --round-to default
        # prune.py removes layers only from a timm ConvNeXt's model.stages[-2].blocks.
        "remove_blocks": {"stages.-2.blocks": int(row["remove_layers"])}
        if row.get("remove_layers")
        else {},
    }
    script = str(row["script"])
    sources = {
        key: f"{script} {flag} {row[key]}" if key in row else f"prune.py default of {flag}"
        for key, flag in PUBLISHED_FLAGS.items()
    }
    return settings, sources


@register
class Isomorphic(StructuredRecipe):
    """Isomorphic Pruning (Fang et al., ECCV'24; github.com/VainF/Isomorphic-Pruning): Taylor
    importance ranked globally within isomorphic groups, whole heads and head dims pruned at the
    published ratios, channels rounded to 2, the attention scale recomputed.

    Per model and GMACs target, ``method_settings.isomorphic.published`` rows (config/paper.yaml)
    hold the published script's ratios. ``mode: macs_targeted`` (default) searches one knob that
    scales them in their proportions into the GMACs window; ``mode: as_published`` prunes once at
    them. Targets without a row use the DeiT-B 4.2G/2.6G proportions (head ratio = ratio,
    head-dim ratio = ratio / 2) and are searched.
    """

    name = "isomorphic"
    recipe = {
        "importance": "taylor",
        "global_pruning": True,
        "isomorphic": True,
        "prune_num_heads": True,
        "prune_head_dims": True,
        "head_ratio_scale": 1.0,
        "head_dim_ratio_scale": 0.5,
        "round_to": 2,
        "attention_scale": "recompute",
        "max_head_ratio": 0.9,
    }
    source = "Isomorphic-Pruning (arXiv 2407.04616) prune.py and scripts/pruning/*.sh"

    def resolve(self, overrides, context):
        rows = list(overrides.pop("published", None) or [])
        mode = str(overrides.pop("mode", "macs_targeted"))
        if mode not in MODES:
            raise PruningError(f"method_settings.isomorphic.mode={mode!r} is not one of {MODES}")
        timm_name, gmacs = timm_name_of(context), context.get("target_gmacs")
        row = published_row(rows, timm_name, gmacs)
        if row is None and mode == "as_published":
            what = f"{timm_name} at {gmacs:g} GMACs" if gmacs is not None else "a ratio target"
            raise PruningError(
                f"isomorphic mode as_published needs a published row for {what} in "
                "method_settings.isomorphic.published; none matches"
            )
        published, flag_sources = published_settings(row) if row else ({}, {})
        record = {
            "published_row": row,
            "mode": mode,
            "sources": {**ISOMORPHIC_SOURCES, **flag_sources},
        }
        return {**self.recipe, **published, **overrides}, mode, record


# The other structured baselines prune attention as Torch-Pruning 1.6.1's BasePruner does by
# default (prune_head_dims=True, prune_num_heads=False, head_pruning_ratio=0): head dims go at the
# ratio of their ranking like any channel, whole heads stay. Their recipes spell this out.
TP_DEFAULT_HEADS = {"prune_num_heads": False, "prune_head_dims": True, "head_ratio_scale": 0.0}


@register
class MagnitudeL1(StructuredRecipe):
    """Uniform (per-layer) L1-magnitude channel pruning (DepGraph's L1 baseline). Heads: head dims
    pruned at the layer's ratio, no whole heads (Torch-Pruning's defaults)."""

    name = "magnitude_l1"
    recipe = {"importance": "magnitude_l1", "global_pruning": False, **TP_DEFAULT_HEADS}
    source = "DepGraph (arXiv 2301.12900) uniform magnitude baseline"


@register
class MagnitudeL2(StructuredRecipe):
    """Uniform (per-layer) L2-magnitude channel pruning. Heads: head dims pruned at the layer's
    ratio, no whole heads (Torch-Pruning's defaults)."""

    name = "magnitude_l2"
    recipe = {"importance": "magnitude_l2", "global_pruning": False, **TP_DEFAULT_HEADS}
    source = "DepGraph (arXiv 2301.12900) uniform magnitude baseline"


@register
class Taylor(StructuredRecipe):
    """First-order Taylor importance, ranked globally, not isomorphic. Heads: head dims ranked
    with all other channels, no whole heads (Torch-Pruning's defaults)."""

    name = "taylor"
    recipe = {
        "importance": "taylor",
        "global_pruning": True,
        "isomorphic": False,
        **TP_DEFAULT_HEADS,
    }
    source = "Molchanov et al. 2019 Taylor criterion via Torch-Pruning GroupTaylorImportance"


@register
class Random(StructuredRecipe):
    """Seeded random channel scores, uniform per layer: the floor every method must beat. Heads:
    head dims pruned at the layer's ratio, no whole heads (Torch-Pruning's defaults)."""

    name = "random"
    recipe = {"importance": "random", "global_pruning": False, **TP_DEFAULT_HEADS}
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
