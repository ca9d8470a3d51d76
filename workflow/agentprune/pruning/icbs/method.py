"""The ``icbs`` method: iCBS masks at the target sparsity, through the registry."""

from __future__ import annotations

import time

from agentprune.pruning.icbs.settings import ICBSConfig
from agentprune.pruning.methods import (
    UnstructuredRecipe,
    check_overrides,
    fixed_provenance,
    sparsity_report,
)
from agentprune.pruning.registry import register
from agentprune.settings import fail, plain


@register
class ICBS(UnstructuredRecipe):
    """iterative Combinatorial Brain Surgeon: block coordinate descent over small QUBOs solved by
    cardinality-constrained simulated annealing (arXiv 2411.17796)."""

    name = "icbs"
    families = ("vision", "lm")
    sections = ("icbs",)
    source = "iCBS (arXiv 2411.17796), implemented from the algorithm"

    def resolve_settings(self, sections, overrides):
        known = list(ICBSConfig.__dataclass_fields__)
        values = {**sections["icbs"], **check_overrides(self.name, overrides, known)}
        try:
            return ICBSConfig.from_dict(values)
        except ValueError as err:  # a bad value: name the key the user wrote
            raise fail("icbs", str(err)) from None

    def load_settings(self, plain_settings):
        return ICBSConfig.from_dict(dict(plain_settings))

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
            "provenance": {
                **fixed_provenance(type(self).__name__, self.source),
                "planning_seconds": time.perf_counter() - start,
            },
        }

    def prune(self, base, plan, example_inputs, calibration, seed):
        import copy

        from agentprune.pruning import unstructured
        from agentprune.pruning.icbs import pruner

        start = time.perf_counter()
        cfg = ICBSConfig.from_dict(plan["pruner"])
        print(f"icbs settings: {plain(cfg)}", flush=True)
        sparsity = float(plan["target"]["value"])
        model = copy.deepcopy(base).eval()
        search = pruner.icbs_prune(
            model, sparsity, calibration[: cfg.calibration_batches], cfg, seed, log=print
        )
        layers = unstructured.prunable_layers(model, cfg.include, cfg.exclude)
        report = sparsity_report(model, layers, sparsity, example_inputs, start)
        return model, {**report, "icbs": search}
