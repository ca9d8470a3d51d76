"""The multi-agent loop: profiling once, then master -> analysis -> pruning -> fine-tuning ->
evaluation per trial, until the master stops, the trials are spent, or a trial improves the best
proxy accuracy by less than ``agents.min_improvement``.

The plan it returns is the best trial by proxy (validation) accuracy; every trial, exchange,
fallback and clamp is recorded in the plan's provenance.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from agentprune.agents.analysis import AnalysisAgent, Bounds, kind_caps
from agentprune.agents.evaluation import EvaluationAgent, measure
from agentprune.agents.finetuning import FinetuningAgent, recover
from agentprune.agents.llm import LLM
from agentprune.agents.master import MasterAgent, isomorphic_strategy
from agentprune.agents.profiling_agent import ProfilingAgent
from agentprune.agents.pruning_agent import PruningAgent
from agentprune.agents.schemas import Strategy
from agentprune.pruning.settings import PruningError, TargetOutOfReach


@dataclass
class Workspace:
    """What the trials run on.

    Attributes:
        base: the base model (never modified).
        example_inputs: a batch-1 input.
        calibration: train-split calibration batches; a plan with ``k`` calibration batches uses
            the first ``k``, exactly as the prune step will.
        recovery: batches of the calibration split for the recovery runs.
        val: the validation split (the proxy; the test split is never touched).
        eval_batch: batch size for the proxy evaluation.
    """

    base: Any
    example_inputs: Any
    calibration: list
    recovery: list
    val: Any
    eval_batch: int


class Coordinator:
    """Runs the six agents against one LLM."""

    def __init__(
        self,
        llm: LLM,
        agents_cfg: dict[str, Any],
        search: dict[str, Any],
        log=print,
    ) -> None:
        self.llm = llm
        self.cfg = agents_cfg
        self.search = search
        self.log = log
        self.profiling = ProfilingAgent()
        self.master = MasterAgent()
        self.analysis = AnalysisAgent()
        self.pruning = PruningAgent()
        self.finetuning = FinetuningAgent()
        self.evaluation = EvaluationAgent()

    def run(
        self,
        target: float,
        profile: dict[str, Any],
        bounds: Bounds,
        overrides: dict[str, Any],
        workspace: Workspace,
        seed: int,
        default_calibration: int,
    ) -> dict[str, Any]:
        """Plan one run.

        Returns:
            ``pruner`` (the best trial's settings), ``expected`` (its achieved fraction and
            MACs), ``agents`` (protect, risks, stop reason, best trial) and ``provenance``.
        """
        from agentprune import train

        start = time.perf_counter()
        max_loss = float(self.cfg["max_loss_increase"])
        found, summary = self.profiling.run(self.llm, profile, max_loss, seed)
        kinds = list(summary["loss_increase"])
        heads_per_layer = list(summary.get("attention_heads") or [])
        # When the bounds leave the target out of reach, they are relaxed step by step (and
        # each step recorded): first the profiling agent's protection, then the measured bounds
        # down to the config ceiling. The target is the wildcard's and never moves.
        ladder = [
            ("measured bounds with protection", bounds),
            ("measured bounds without protection", dataclasses.replace(bounds, protect_factor=1.0)),
            (
                "the config ceiling agents.max_ratio for every kind",
                dataclasses.replace(bounds, max_ratio={}, protect_factor=1.0),
            ),
        ]
        level = 0
        caps = kind_caps(kinds, found.protect, bounds, heads_per_layer)
        self.log(f"profiling: protect {found.protect}; bounds {caps}")
        history: list[dict[str, Any]] = []
        clamps: list[dict[str, Any]] = []
        fallbacks: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        stop_reason = "max_iterations"
        max_iterations = int(self.cfg["max_iterations"])
        for index in range(max_iterations):
            state = {
                "target": target,
                "profile": summary,
                "protect": found.protect,
                "bounds": caps,
                "history": history,
                "trials_left": max_iterations - index,
                "calibration_batches": default_calibration,
                "min_improvement": float(self.cfg["min_improvement"]),
            }
            decision, from_llm = self.master.run(self.llm, state, seed)
            if decision.action == "stop" and history:
                stop_reason = "master"
                break
            tried = [t["strategy"] for t in history]
            if decision.strategy.model_dump() in tried:
                # Trials are deterministic: a repeat would only spend time. Take the default
                # policy's next strategy instead, or stop if that was tried too.
                default = self.master.heuristic(state)
                if default.action == "stop" or default.strategy.model_dump() in tried:
                    stop_reason = "repeated_strategy"
                    break
                fallbacks.append(
                    {
                        "agent": "master",
                        "reason": "repeated an earlier trial's strategy; ran the default policy's",
                    }
                )
                decision, from_llm = default, False
            trial = self._trial(
                index + 1, decision.strategy, from_llm, decision.rationale, target, kinds, found,
                bounds, caps, heads_per_layer, overrides, workspace, seed, clamps, best,
            )  # fmt: skip
            history.append(trial)
            if trial.get("out_of_reach") and level + 1 < len(ladder):
                level += 1
                bounds = ladder[level][1]
                caps = kind_caps(kinds, found.protect, bounds, heads_per_layer)
                fallbacks.append(
                    {
                        "agent": "coordinator",
                        "reason": f"target {target} out of reach under the bounds; relaxed to "
                        f"{ladder[level][0]}: {caps}",
                    }
                )
                self.log(f"bounds relaxed to {ladder[level][0]}: {caps}")
            if "val_top1" not in trial:
                continue
            previous = None if best is None else best["val_top1"]
            if best is None or trial["val_top1"] > best["val_top1"]:
                best = trial
            if previous is not None and trial["val_top1"] - previous < float(
                self.cfg["min_improvement"]
            ):
                stop_reason = "min_improvement"
                break
        while best is None:
            # Every trial failed: the isomorphic recipe, under the loosest bounds reached so far
            # and then looser ones, keeps the run alive.
            fallbacks.append(
                {
                    "agent": "coordinator",
                    "reason": f"no trial succeeded; ran the isomorphic recipe under "
                    f"{ladder[level][0]}",
                }
            )
            strategy = isomorphic_strategy("heads" in kinds, default_calibration)
            trial = self._trial(
                len(history) + 1, strategy, False, "fallback", target, kinds, found, bounds,
                caps, heads_per_layer, overrides, workspace, seed, clamps, None,
            )  # fmt: skip
            history.append(trial)
            if "val_top1" in trial:
                best = trial
            elif trial.get("out_of_reach") and level + 1 < len(ladder):
                level += 1
                bounds = ladder[level][1]
                caps = kind_caps(kinds, found.protect, bounds, heads_per_layer)
            else:
                raise PruningError(f"multi_agent: no trial reached the target ({trial['error']})")
        train.seed_everything(seed)
        return {
            "pruner": best["settings"],
            "expected": {k: best[k] for k in ("achieved", "macs", "params")},
            "agents": {
                "protect": found.protect,
                "risks": found.risks,
                "bounds": caps,
                "bounds_level": ladder[level][0],
                "stop_reason": stop_reason,
                "best_trial": best["trial"],
            },
            "provenance": {
                "exchanges": self.llm.exchanges,
                "fallbacks": self.llm.fallbacks + fallbacks,
                "clamps": clamps,
                "trials": history,
                "llm": self.llm.stats(),
                "planning_seconds": time.perf_counter() - start,
            },
        }

    def _trial(
        self,
        number: int,
        strategy: Strategy,
        from_llm: bool,
        rationale: str,
        target: float,
        kinds: list[str],
        found,
        bounds: Bounds,
        caps: dict[str, float],
        heads_per_layer: list[int],
        overrides: dict[str, Any],
        workspace: Workspace,
        seed: int,
        clamps: list[dict[str, Any]],
        best: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """One trial: settings -> prune -> recover -> measure -> assess."""
        from agentprune import train

        trial_start = time.perf_counter()
        settings, applied = self.analysis.run(
            strategy, target, kinds, found.protect, bounds, overrides, heads_per_layer
        )
        clamps.extend({**c, "trial": number} for c in applied)
        trial: dict[str, Any] = {
            "trial": number,
            "target": target,
            "strategy": strategy.model_dump(),
            "strategy_source": "llm" if from_llm else "heuristic",
            "rationale": rationale,
            "settings": settings.to_dict(),
            "bounds": caps,
        }
        # Same seeding and calibration prefix as the prune step: the best trial's pruned model
        # is exactly what the prune step will rebuild from the plan.
        train.seed_everything(seed)
        try:
            model, report = self.pruning.run(
                workspace.base,
                settings,
                target,
                workspace.example_inputs,
                workspace.calibration,
                seed,
                self.search,
                caps,
            )
        except (PruningError, RuntimeError, ValueError) as err:
            trial["error"] = str(err).splitlines()[0]
            trial["out_of_reach"] = isinstance(err, TargetOutOfReach)
            trial["seconds"] = time.perf_counter() - trial_start
            self.log(f"trial {number}: failed ({trial['error']})")
            return trial
        trial.update(
            achieved=report["achieved"],
            macs=report["macs"],
            params=report["params"],
            realized_ratios=report["realized_ratios"],
        )
        schedule, applied = self.finetuning.run(self.llm, trial, self.cfg["recovery"], seed)
        clamps.extend({**c, "trial": number} for c in applied)
        recovered = recover(
            model, workspace.recovery, schedule.lr, schedule.steps, seed,
            float(self.cfg["recovery"]["weight_decay"]),
        )  # fmt: skip
        trial["recovery"] = {"lr": schedule.lr, "steps": schedule.steps, **recovered}
        trial.update(measure(model, workspace.val, workspace.eval_batch))
        verdict = self.evaluation.run(
            self.llm, trial, None if best is None else best["val_top1"], seed
        )
        trial["assessment"] = verdict.model_dump()
        trial["seconds"] = time.perf_counter() - trial_start
        self.log(
            f"trial {number}: {strategy.grouping}/{strategy.importance} achieved "
            f"{trial['achieved']:.4f} val top1 {trial['val_top1']:.2f}% "
            f"({trial['seconds']:.1f}s)"
        )
        return trial
