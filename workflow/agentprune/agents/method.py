"""The agent-planned methods: ``multi_agent`` (six agents, two of which ask an LLM, plan the
structured pruning by measured trials) and ``agents_heuristic``, the same loop with the default
policies answering every decision: its no-LLM ablation. Both have the same trial budget, bounds
and selection on validation accuracy, so the difference between them is what the LLM adds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from agentprune.agents.llm_settings import LLMSettings
from agentprune.agents.settings import AgentsSettings, RecoverySettings
from agentprune.pruning.methods import (
    StructuredRecipe,
    check_overrides,
    search_arguments,
    search_settings,
    structured_target,
)
from agentprune.pruning.registry import register
from agentprune.pruning.settings import PrunerSettings
from agentprune.settings import build, fail, plain


@register
class MultiAgent(StructuredRecipe):
    """Profiling, master, analysis, pruning, fine-tuning and evaluation agents choose the pruner
    settings by measured trials; ``plan.json`` holds the best trial and the whole transcript."""

    name = "multi_agent"
    sections = ("agents", "prune", "profile", "evaluate", "results")
    uses_agents = True
    runs_trials = True
    needs_profile = True
    ablation: ClassVar[str | None] = "agents_heuristic"
    needs_llm = True
    source = "agentprune multi-agent coordinator"
    asks_llm: ClassVar[bool] = True
    """Whether the loop's decisions go to the LLM (False: the default policies answer)."""

    def resolve_settings(self, sections, overrides):
        agents, prune = sections["agents"], sections["prune"]
        llm = None
        if self.asks_llm:
            cache_dir = str(Path(sections["results"]) / "llm_cache")
            try:
                llm = LLMSettings.from_agents(agents, cache_dir)
            except ValueError as err:
                raise fail("agents", str(err)) from None
        known = list(PrunerSettings.__dataclass_fields__)
        checked = check_overrides(self.name, overrides, known)
        build(PrunerSettings, checked, f"method_settings.{self.name}")  # every value of its type
        return AgentsSettings(
            llm=llm,
            anchor_default=bool(agents["anchor_default"]),
            max_fallback_share=float(agents["max_fallback_share"]),
            allow_fallback=bool(agents["allow_fallback"]),
            max_iterations=int(agents["max_iterations"]),
            min_improvement=float(agents["min_improvement"]),
            max_ratio=float(agents["max_ratio"]),
            protect_factor=float(agents["protect_factor"]),
            max_calibration_batches=int(agents["max_calibration_batches"]),
            bounds=list(agents["bounds"]),
            recovery=build(RecoverySettings, agents["recovery"], "agents.recovery"),
            max_loss_increase=float(sections["profile"]["max_loss_increase"]),
            calibration_batches=int(prune["calibration_batches"]),
            search=search_settings(prune),
            eval_batch=int(sections["evaluate"]["batch_size"]),
            overrides=checked,
        )

    def load_settings(self, plain_settings):
        return build(AgentsSettings, plain_settings, f"method_settings.{self.name}")

    def plan(self, target, profile, settings, context):
        import torch

        from agentprune import data, models, train
        from agentprune.agents.analysis import run_bounds
        from agentprune.agents.coordinator import Coordinator, Workspace
        from agentprune.agents.evaluation import measure
        from agentprune.agents.llm import LLM

        start = time.perf_counter()
        seed = context.seed
        if context.threads:
            torch.set_num_threads(int(context.threads))
        train.seed_everything(seed)
        base, desc = models.load(context.base_stem)
        splits = data.load_splits(context.data, data_config=models.data_config_of(desc))
        batch = context.calibration_batch_size
        bounds = run_bounds(profile, settings, context.dataset, context.model, desc["timm_name"])
        workspace = Workspace(
            base=base,
            example_inputs=data.example_inputs(splits.img_size),
            calibration=data.calibration_batches(
                splits.train, bounds.max_calibration_batches, batch, seed
            ),
            recovery=data.calibration_batches(splits.train, settings.recovery.batches, batch, seed),
            val=splits.val,
            eval_batch=settings.eval_batch,
        )
        base_val = measure(base, splits.val, workspace.eval_batch)["val_top1"]
        llm = LLM(settings.llm, threads=int(context.threads or 1))
        # The same target window (a GMACs target means GMACs) as the prune step will use.
        target_doc = structured_target(float(target), context.target_gmacs)
        search = plain(settings.search)
        try:
            arguments = search_arguments({"search": search, "target": target_doc})
            outcome = Coordinator(llm, settings, arguments).run(
                float(target),
                profile,
                bounds,
                dict(settings.overrides),
                workspace,
                seed,
                settings.calibration_batches,
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
            allow_fallback=settings.allow_fallback,
            planning_seconds=time.perf_counter() - start,
        )
        plan = {
            "method": self.name,
            "family": self.family,
            "dataset": context.dataset,
            "model": context.model,
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
    bounds and selection as ``multi_agent``. The ablation every LLM result is compared with.
    Its settings leave the LLM keys out, so changing the LLM reruns only ``multi_agent``."""

    name = "agents_heuristic"
    ablation = None
    needs_llm = False
    asks_llm = False
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
