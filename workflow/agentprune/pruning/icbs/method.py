"""The ``icbs`` method: iCBS masks at the target sparsity, through the registry."""

from __future__ import annotations

import time

from agentprune.pruning.icbs.settings import ICBSConfig
from agentprune.pruning.methods import UnstructuredRecipe, register


@register
class ICBS(UnstructuredRecipe):
    """iterative Combinatorial Brain Surgeon: block coordinate descent over small QUBOs solved by
    cardinality-constrained simulated annealing (arXiv 2411.17796)."""

    name = "icbs"
    config_section = "icbs"
    source = "iCBS (arXiv 2411.17796), implemented from the algorithm"

    def plan(self, target, profile, overrides, context):
        start = time.perf_counter()
        plan = super().plan(target, profile, {}, context)
        settings = {**(context["config"].get("icbs") or {}), **overrides}
        plan["pruner"] = ICBSConfig.from_dict(settings).to_dict()
        plan["provenance"]["planning_seconds"] = time.perf_counter() - start
        return plan

    def prune(self, base, plan, example_inputs, calibration, seed, prune_cfg):
        import copy

        from agentprune.pruning import methods, unstructured
        from agentprune.pruning.icbs import pruner

        start = time.perf_counter()
        cfg = ICBSConfig.from_dict(plan["pruner"])
        sparsity = float(plan["target"]["value"])
        model = copy.deepcopy(base).eval()
        search = pruner.icbs_prune(
            model, sparsity, calibration[: cfg.calibration_batches], cfg, seed, log=print
        )
        layers = unstructured.prunable_layers(model, cfg.include, cfg.exclude)
        report = methods.sparsity_report(model, layers, sparsity, example_inputs, start)
        return model, {**report, "icbs": search}
