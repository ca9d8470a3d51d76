"""The agent-planned methods: ``multi_agent`` (six agents, two of which ask an LLM, plan the
structured pruning by measured trials) and ``agents_heuristic``, the same loop with the default
policies answering every decision: its no-LLM ablation. Both have the same trial budget, bounds
and selection on validation accuracy, so the difference between them is what the LLM adds."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from agentprune.pruning.methods import (
    StructuredRecipe,
    register,
    search_arguments,
    search_section,
    structured_target,
)


@register
class MultiAgent(StructuredRecipe):
    """Profiling, master, analysis, pruning, fine-tuning and evaluation agents choose the pruner
    settings by measured trials; ``plan.json`` holds the best trial and the whole transcript."""

    name = "multi_agent"
    uses_agents = True
    runs_trials = True
    needs_profile = True
    config_section = "agents"
    ablation: ClassVar[str | None] = "agents_heuristic"
    needs_llm = True
    source = "agentprune multi-agent coordinator"
    llm_backend: ClassVar[str | None] = None
    """The backend this method forces (None: ``agents.backend``)."""

    def plan(self, target, profile, overrides, context):
        import torch

        from agentprune import data, models, train
        from agentprune.agents.analysis import run_bounds
        from agentprune.agents.coordinator import Coordinator, Workspace
        from agentprune.agents.evaluation import measure
        from agentprune.agents.llm import LLM, LLMSettings
        from agentprune.config import agents_settings

        start = time.perf_counter()
        config = context["config"]
        seed = int(context["seed"])
        if context.get("threads"):
            torch.set_num_threads(int(context["threads"]))
        agents_cfg = {
            **agents_settings(config),
            "max_loss_increase": float(config["profile"]["max_loss_increase"]),
        }
        if self.llm_backend is not None:
            agents_cfg["backend"] = self.llm_backend
        prune_cfg = config["prune"]
        train.seed_everything(seed)
        base, desc = models.load(context["base_stem"])
        splits = data.load_splits(config["dataset"], data_config=models.data_config_of(desc))
        batch = int(prune_cfg["batch_size"])
        bounds = run_bounds(
            profile, agents_cfg, context["dataset"], context["model"], desc["timm_name"]
        )
        workspace = Workspace(
            base=base,
            example_inputs=data.example_inputs(splits.img_size),
            calibration=data.calibration_batches(
                splits.train, bounds.max_calibration_batches, batch, seed
            ),
            recovery=data.calibration_batches(
                splits.train, int(agents_cfg["recovery"]["batches"]), batch, seed
            ),
            val=splits.val,
            eval_batch=int(config["evaluate"]["batch_size"]),
        )
        base_val = measure(base, splits.val, workspace.eval_batch)["val_top1"]
        llm = LLM(
            LLMSettings.from_config(agents_cfg, str(agents_cfg["cache_dir"])),
            threads=int(context.get("threads") or 1),
        )
        # The same target window (a GMACs target means GMACs) as the prune step will use.
        target_doc = structured_target(float(target), context)
        search = search_section(prune_cfg)
        try:
            arguments = search_arguments({"search": search, "target": target_doc})
            outcome = Coordinator(llm, agents_cfg, arguments).run(
                float(target),
                profile,
                bounds,
                dict(overrides),
                workspace,
                seed,
                int(prune_cfg["calibration_batches"]),
                base_val,
            )
        finally:
            llm.close()
        provenance = outcome.pop("provenance")
        provenance.update(
            backend=llm.backend,
            planner="Coordinator",
            llm_model=llm.model,
            recipe_source=self.source,
            allow_fallback=bool(agents_cfg["allow_fallback"]),
            planning_seconds=time.perf_counter() - start,
        )
        plan = {
            "method": self.name,
            "family": self.family,
            "dataset": context["dataset"],
            "model": context["model"],
            "seed": seed,
            "target": target_doc,
            "search": search,
            **outcome,
            "provenance": provenance,
        }
        check_plan(plan, float(target))
        return plan


@register
class AgentsHeuristic(MultiAgent):
    """The multi-agent loop with no LLM: every decision is the default policy's (the isomorphic
    recipe first, then a protective allocation, then more calibration), with the same trials,
    bounds and selection as ``multi_agent``. The ablation every LLM result is compared with."""

    name = "agents_heuristic"
    ablation = None
    needs_llm = False
    llm_backend = "heuristic"
    source = "agentprune multi-agent coordinator, default policies only (no LLM)"


def check_plan(plan: dict[str, Any], target: float) -> None:
    """The contract no LLM output can break: the wildcard's target, and every ratio in [0, 1).

    Raises:
        ValueError: naming the offending field (a bug in the clamping, never the LLM's doing).
    """
    if plan["target"]["value"] != target:
        raise ValueError(f"plan.target {plan['target']['value']} is not the wildcard's {target}")
    pruner = plan["pruner"]
    ratios = {
        "max_pruning_ratio": pruner["max_pruning_ratio"],
        "max_head_ratio": pruner["max_head_ratio"],
        **{f"scope_max_ratio.{g}": v for g, v in pruner["scope_max_ratio"].items()},
    }
    for name, value in ratios.items():
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"plan.pruner.{name}={value} is outside [0, 1)")
