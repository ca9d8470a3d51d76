"""The fixed recipes: structured (Torch-Pruning settings searched to a MACs target) and
unstructured (score every prunable weight, zero the lowest at the target sparsity).

Each is one class and one ``@register`` line (see :mod:`agentprune.pruning.registry`); their
settings come from the ``prune`` section and the method's ``method_settings`` entry, whose keys
are checked against what the recipe accepts before any job runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from agentprune.pruning.registry import Method, PlanContext, register
from agentprune.pruning.settings import MODES, PrunerSettings, PruningError
from agentprune.settings import SearchSettings, build, fail, plain, unknown_keys


def fixed_provenance(planner: str, source: str, seconds: float = 0.0) -> dict[str, Any]:
    """The provenance of a fixed recipe's plan: no LLM, no trials."""
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


def structured_target(target: float, target_gmacs: float | None) -> dict[str, Any]:
    """``plan.json``'s target of a structured method: the MACs fraction to remove, and the GMACs
    it came from when it was given in GMACs."""
    out: dict[str, Any] = {"metric": "macs_fraction_removed", "value": float(target)}
    if target_gmacs is not None:
        out["gmacs"] = float(target_gmacs)
    return out


def search_settings(prune: Mapping[str, Any], mode: str = "macs_targeted") -> SearchSettings:
    """The MACs search of a structured plan, from the ``prune`` section."""
    return SearchSettings(
        tolerance=float(prune["tolerance"]),
        gmacs_tolerance=float(prune["gmacs_tolerance"]),
        max_steps=int(prune["max_search_steps"]),
        mode=mode,
    )


def search_arguments(plan: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``structured.prune_to_target`` that ``plan`` sets."""
    search = plan["search"]
    return {
        "tolerance": float(search["tolerance"]),
        "max_steps": int(search["max_steps"]),
        "target_gmacs": plan["target"].get("gmacs"),
        "gmacs_tolerance": float(search["gmacs_tolerance"]),
        "mode": str(search["mode"]),
    }


def check_overrides(method: str, overrides: Mapping[str, Any], known: list[str]) -> dict[str, Any]:
    """A method's ``method_settings`` entry, whose keys must be in ``known``.

    Raises:
        ConfigError: one line naming the unknown key (and a close known one).
    """
    if not isinstance(overrides, Mapping):
        raise fail(f"method_settings.{method}", "expected a mapping of settings")
    if set(overrides) - set(known):
        raise fail(f"method_settings.{method}", unknown_keys(overrides, known))
    return dict(overrides)


@dataclass(frozen=True)
class RecipeSettings:
    """A structured recipe's settings: the default calibration batches (``prune``), the MACs
    search, and the user's ``method_settings`` overrides of the recipe's pruner settings."""

    calibration_batches: int
    search: SearchSettings
    overrides: dict[str, Any]


class StructuredRecipe(Method):
    """A fixed structured recipe: Torch-Pruning settings searched to the MACs target."""

    family = "structured"
    sections = ("prune",)
    recipe: ClassVar[dict[str, Any]] = {}
    source: ClassVar[str] = ""
    extra_keys: ClassVar[tuple[str, ...]] = ()
    """``method_settings`` keys besides the pruner settings' (e.g. isomorphic's ``mode``)."""

    def resolve_settings(self, sections, overrides):
        known = [f.name for f in fields(PrunerSettings)] + list(self.extra_keys)
        checked = check_overrides(self.name, overrides, known)
        pruner = {k: v for k, v in checked.items() if k not in self.extra_keys}
        where = f"method_settings.{self.name}"
        build(PrunerSettings, {**self.recipe, **pruner}, where)  # every value of its type
        try:  # ... and the recipe with the overrides valid pruner settings
            PrunerSettings.from_dict({**self.recipe, **pruner})
        except (PruningError, TypeError, ValueError) as err:
            raise fail(where, str(err)) from None
        return RecipeSettings(
            calibration_batches=int(sections["prune"]["calibration_batches"]),
            search=search_settings(sections["prune"]),
            overrides=checked,
        )

    def load_settings(self, plain_settings):
        return build(RecipeSettings, plain_settings, f"method_settings.{self.name}")

    def resolve(
        self, overrides: dict[str, Any], context: PlanContext
    ) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
        """The recipe's pruner settings for this run, the search mode, and a provenance record.

        Args:
            overrides: the config's ``method_settings[name]``.
            context: see :meth:`Method.plan`.

        Returns:
            Settings (recipe, then overrides), ``macs_targeted``, and None.
        """
        return {**self.recipe, **overrides}, "macs_targeted", None

    def plan(self, target, profile, settings, context):
        start = time.perf_counter()
        recipe, mode, record = self.resolve(dict(settings.overrides), context)
        pruner = PrunerSettings.from_dict(
            {"calibration_batches": settings.calibration_batches, **recipe}
        )
        provenance = fixed_provenance(type(self).__name__, self.source, 0.0)
        if record is not None:
            provenance["recipe"] = record
        provenance["planning_seconds"] = time.perf_counter() - start
        search = {**plain(settings.search), "mode": mode}
        return {
            "method": self.name,
            "family": self.family,
            "dataset": context.dataset,
            "model": context.model,
            "seed": context.seed,
            "target": structured_target(target, context.target_gmacs),
            "pruner": pruner.to_dict(),
            "search": search,
            "provenance": provenance,
        }

    def prune(self, base, plan, example_inputs, calibration, seed):
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
    extra_keys = ("published", "mode")
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

    def resolve_settings(self, sections, overrides):
        settings = super().resolve_settings(sections, overrides)
        rows = settings.overrides.get("published") or []
        if not isinstance(rows, list):
            raise fail("method_settings.isomorphic.published", "expected a list of rows")
        for i, row in enumerate(rows):
            try:
                _check_published_row(row, f"method_settings.isomorphic.published[{i}]")
            except PruningError as err:
                raise fail(f"method_settings.isomorphic.published.{i}", str(err)) from None
        mode = settings.overrides.get("mode", "macs_targeted")
        if mode not in MODES:
            raise fail("method_settings.isomorphic.mode", f"{mode!r} is not one of {MODES}")
        return settings

    def resolve(self, overrides, context):
        rows = list(overrides.pop("published", None) or [])
        mode = str(overrides.pop("mode", "macs_targeted"))
        timm_name, gmacs = context.timm, context.target_gmacs
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


@dataclass(frozen=True)
class UnstructuredSettings:
    """An unstructured recipe's settings (``plan.json``'s ``pruner``).

    Attributes:
        include: module-name globs of the prunable layers (the classifier is always excluded).
        exclude: module-name globs never pruned.
        calibration_batches: calibration batches for data-driven scores (``prune`` section).
        scores: the score (``magnitude``, ``wanda``).
        per_row: compare scores within output rows (else within the layer).
    """

    include: list[str]
    exclude: list[str]
    calibration_batches: int
    scores: str
    per_row: bool


class UnstructuredRecipe(Method):
    """A one-shot unstructured recipe: score every prunable weight, zero the lowest-scored ones
    at exactly the target sparsity of each layer."""

    family = "unstructured"
    sections = ("prune",)
    recipe: ClassVar[dict[str, Any]] = {}
    source: ClassVar[str] = ""

    def resolve_settings(self, sections, overrides):
        known = [f.name for f in fields(UnstructuredSettings)]
        values = {
            "include": ["*"],
            "exclude": [],
            "calibration_batches": int(sections["prune"]["calibration_batches"]),
            **self.recipe,
            **check_overrides(self.name, overrides, known),
        }
        return build(UnstructuredSettings, values, f"method_settings.{self.name}")

    def load_settings(self, plain_settings):
        return build(UnstructuredSettings, plain_settings, f"method_settings.{self.name}")

    def plan(self, target, profile, settings, context):
        start = time.perf_counter()
        return {
            "method": self.name,
            "family": self.family,
            "dataset": context.dataset,
            "model": context.model,
            "seed": context.seed,
            "target": {"metric": "sparsity", "value": float(target)},
            "pruner": plain(settings),
            "provenance": fixed_provenance(
                type(self).__name__, self.source, time.perf_counter() - start
            ),
        }

    def scores(self, model, layers, calibration, pruner):
        """Per-layer weight scores (higher keeps)."""
        raise NotImplementedError

    def prune(self, base, plan, example_inputs, calibration, seed):
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
    families = ("vision", "lm")
    recipe = {"scores": "magnitude", "per_row": False}
    source = "layer-wise magnitude pruning (Han et al., 2015)"

    def scores(self, model, layers, calibration, pruner):
        from agentprune.pruning import unstructured

        return unstructured.magnitude_scores(layers)


@register
class Wanda(UnstructuredRecipe):
    """|W| x the input feature norm from calibration activations, compared per output row."""

    name = "wanda"
    families = ("vision", "lm")
    recipe = {"scores": "wanda", "per_row": True}
    source = "Wanda (Sun et al., arXiv 2306.11695)"

    def scores(self, model, layers, calibration, pruner):
        from agentprune.pruning import unstructured

        batches = calibration[: int(pruner["calibration_batches"])]
        return unstructured.wanda_scores(model, layers, batches)
