"""The multi-agent loop: profiling once, then master -> analysis -> pruning -> fine-tuning ->
evaluation per trial, until the master stops, the trials are spent, or a trial improves the best
proxy accuracy by less than ``agents.min_improvement``.

Two agents ask the LLM: profiling (protect and risks, once) and master (the next trial's strategy
and recovery, or stop, once per trial). Analysis clamps the strategy to the safety bounds, pruning
prunes to the exact MACs target, fine-tuning runs the clamped recovery, evaluation measures
validation accuracy and puts it into the history the master reads next. Every decision is
recorded with its source (the LLM's own, the LLM's equal to the default policy's, or the default
policy's and why) next to what the default policy would have decided in the same state.

Bounds that cannot reach the target even with every kind cut to its bound are relaxed before
trial 1 (recorded like any relaxation), so neither loop spends a trial learning that.

The plan it returns is the best trial by proxy (validation) accuracy; every trial, decision,
exchange, fallback and clamp is recorded in the plan's provenance.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from agentprune.agents.analysis import AnalysisAgent, Bounds, kind_caps
from agentprune.agents.base import Answer
from agentprune.agents.evaluation import EvaluationAgent, measure
from agentprune.agents.finetuning import FinetuningAgent, recover
from agentprune.agents.influence import influence, llm_failures
from agentprune.agents.llm import LLM
from agentprune.agents.master import MasterAgent, isomorphic_strategy
from agentprune.agents.profiling_agent import ProfilingAgent
from agentprune.agents.pruning_agent import PruningAgent, fewest_macs
from agentprune.agents.schemas import MasterDecision, Recovery, Strategy
from agentprune.agents.settings import AgentsSettings
from agentprune.pruning import structured
from agentprune.pruning.settings import PruningError, TargetOutOfReach


class LLMUnavailableError(RuntimeError):
    """Too many of a plan's LLM decisions failed: the run would be the default policy's."""


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


@dataclass
class BoundsLadder:
    """The safety bounds of a run and how far they were relaxed.

    When the bounds leave the target out of reach they are relaxed step by step (each step
    recorded): first the profiling agent's protection, then the measured bounds down to the config
    ceiling. The target is the wildcard's and never moves.
    """

    levels: list[tuple[str, Bounds]]
    level: int = 0

    @classmethod
    def of(cls, bounds: Bounds) -> BoundsLadder:
        """The ladder that starts at ``bounds``."""
        return cls(
            [
                ("measured bounds with protection", bounds),
                (
                    "measured bounds without protection",
                    dataclasses.replace(bounds, protect_factor=1.0),
                ),
                (
                    "the config ceiling agents.max_ratio for every kind",
                    dataclasses.replace(bounds, max_ratio={}, protect_factor=1.0),
                ),
            ]
        )

    @property
    def label(self) -> str:
        """The current level's description."""
        return self.levels[self.level][0]

    @property
    def bounds(self) -> Bounds:
        """The current level's bounds."""
        return self.levels[self.level][1]

    def relax(self) -> bool:
        """Move one level looser; False when already at the loosest."""
        if self.level + 1 >= len(self.levels):
            return False
        self.level += 1
        return True


@dataclass
class TrialContext:
    """What every trial of one plan shares.

    Attributes:
        target: the MACs fraction to remove.
        kinds: the group kinds of this model (from the profile).
        protect: the kinds the profiling agent protects.
        heads_per_layer: attention heads of each layer.
        overrides: ``method_settings.<method>``: the user's word on the pruner is final.
        workspace: models and data.
        seed: the run's seed.
        base_val_top1: the unpruned model's validation top-1 (what a trial's drop is from).
        ladder: the safety bounds and their relaxation.
        clamps: every clamp applied so far (each with its trial number).
        relaxations: every relaxation of the bounds so far.
    """

    target: float
    kinds: list[str]
    protect: list[str]
    heads_per_layer: list[int]
    overrides: dict[str, Any]
    workspace: Workspace
    seed: int
    base_val_top1: float
    ladder: BoundsLadder
    clamps: list[dict[str, Any]] = field(default_factory=list)
    relaxations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def caps(self) -> dict[str, float]:
        """The effective bound of every kind at the current level."""
        return kind_caps(self.kinds, self.protect, self.ladder.bounds, self.heads_per_layer)

    def relax(self) -> bool:
        """Down the ladder to the next level that loosens a bound (without protection, a level
        can equal the one before); False when there is none left."""
        before = self.caps
        while self.ladder.relax():
            if self.caps != before:
                return True
        return False


class Coordinator:
    """Runs the six agents against one LLM."""

    def __init__(
        self,
        llm: LLM,
        settings: AgentsSettings,
        search: dict[str, Any],
        log=print,
    ) -> None:
        """Args:
        llm: the LLM (or the no-LLM default policies).
        settings: the loop's settings.
        search: ``structured.prune_to_target``'s keyword arguments of every trial (the plan's
            window, as the prune step will use it).
        log: line logger.
        """
        self.llm = llm
        self.cfg = settings
        self.recovery = dataclasses.asdict(settings.recovery)
        self.search = search
        self.log = log
        self.anchored = settings.anchor_default
        self.profiling = ProfilingAgent()
        self.master = MasterAgent()
        self.analysis = AnalysisAgent()
        self.pruning = PruningAgent()
        self.finetuning = FinetuningAgent()
        self.evaluation = EvaluationAgent()
        self.decisions: list[dict[str, Any]] = []
        # The coordinator's own fallbacks: relaxed bounds and fallback trials.
        self.fallbacks: list[dict[str, Any]] = []

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self,
        target: float,
        profile: dict[str, Any],
        bounds: Bounds,
        overrides: dict[str, Any],
        workspace: Workspace,
        seed: int,
        default_calibration: int,
        base_val_top1: float,
    ) -> dict[str, Any]:
        """Plan one run.

        Returns:
            ``pruner`` (the best trial's settings), ``expected`` (its achieved fraction and
            MACs), ``agents`` (protect, risks, stop reason, best trial, influence) and
            ``provenance``.

        Raises:
            LLMUnavailableError: more than ``agents.max_fallback_share`` of the LLM decisions
                failed and ``agents.allow_fallback`` is off.
        """
        start = time.perf_counter()
        answer, summary = self.profiling.run(
            self.llm, profile, self.cfg.max_loss_increase, seed, self.anchored
        )
        self._decided(answer.record("profiling"))
        ctx = TrialContext(
            target=target,
            kinds=list(summary["loss_increase"]),
            protect=list(answer.decision.protect),
            heads_per_layer=list(summary.get("attention_heads") or []),
            overrides=overrides,
            workspace=workspace,
            seed=seed,
            base_val_top1=base_val_top1,
            ladder=BoundsLadder.of(bounds),
        )
        self.log(f"profiling: protect {ctx.protect}; bounds {ctx.caps}")
        self._reachable_bounds(ctx)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        stop_reason = "max_iterations"
        max_iterations = self.cfg.max_iterations
        for index in range(max_iterations):
            state = {
                "target": target,
                "profile": summary,
                "protect": ctx.protect,
                "risks": list(answer.decision.risks),
                "bounds": ctx.caps,
                "max_calibration_batches": ctx.ladder.bounds.max_calibration_batches,
                "recovery": self.recovery,
                "base_val_top1": ctx.base_val_top1,
                "history": history,
                "trials_left": max_iterations - index,
                "calibration_batches": default_calibration,
            }
            decided = self.master.run(
                self.llm, state, lambda d: self._effective(d, ctx), seed, self.anchored
            )
            self._decided(decided.record("master", trial=index + 1))
            if decided.decision.action == "stop" and history:
                stop_reason = _stop_reason(decided)
                break
            trial = self._trial(index + 1, decided, ctx, best)
            history.append(trial)
            if trial.get("out_of_reach"):
                self._relax(ctx)
            if "val_top1" not in trial:
                continue
            previous = None if best is None else best["val_top1"]
            if best is None or trial["val_top1"] > best["val_top1"]:
                best = trial
            if previous is not None and trial["val_top1"] - previous < self.cfg.min_improvement:
                stop_reason = "min_improvement"
                break
        while best is None:
            best = self._fallback_trial(history, ctx, default_calibration)
        self._check_fallbacks(final=True)
        return self._outcome(ctx, history, best, stop_reason, answer, start)

    # -- one trial ---------------------------------------------------------------------------

    def _effective(self, decision: MasterDecision, ctx: TrialContext) -> dict[str, Any]:
        """The trial ``decision`` would run under the current bounds (every clamp applied)."""
        settings, _ = self._settings(decision.strategy, ctx)
        recovery, _ = self.finetuning.run(decision.recovery, self.recovery)
        return {"settings": settings.to_dict(), "recovery": recovery.model_dump()}

    def _settings(self, strategy: Strategy, ctx: TrialContext):
        return self.analysis.run(
            strategy,
            ctx.target,
            ctx.kinds,
            ctx.protect,
            ctx.ladder.bounds,
            ctx.overrides,
            ctx.heads_per_layer,
        )

    def _trial(
        self, number: int, decided: Answer, ctx: TrialContext, best: dict[str, Any] | None
    ) -> dict[str, Any]:
        """One trial: settings -> prune -> recover -> measure -> assess."""
        decision = decided.decision
        assert isinstance(decision, MasterDecision)
        return self._run_trial(
            number,
            decision.strategy,
            decision.recovery,
            {"strategy_source": decided.source, "default_reason": decided.reason},
            ctx,
            best,
        )

    def _run_trial(
        self,
        number: int,
        strategy: Strategy,
        requested: Recovery,
        source: dict[str, Any],
        ctx: TrialContext,
        best: dict[str, Any] | None,
    ) -> dict[str, Any]:
        from agentprune import train

        trial_start = time.perf_counter()
        settings, applied = self._settings(strategy, ctx)
        recovery, recovery_clamps = self.finetuning.run(requested, self.recovery)
        ctx.clamps.extend({**c, "trial": number} for c in applied + recovery_clamps)
        trial: dict[str, Any] = {
            "trial": number,
            "target": ctx.target,
            "strategy": strategy.model_dump(),
            "recovery_requested": requested.model_dump(),
            **source,
            "settings": settings.to_dict(),
            "effective": {"settings": settings.to_dict(), "recovery": recovery.model_dump()},
            "bounds": ctx.caps,
        }
        # Same seeding and calibration prefix as the prune step: the best trial's pruned model
        # is exactly what the prune step will rebuild from the plan.
        train.seed_everything(ctx.seed)
        ws = ctx.workspace
        try:
            model, report = self.pruning.run(
                ws.base,
                settings,
                ctx.target,
                ws.example_inputs,
                ws.calibration,
                ctx.seed,
                self.search,
                ctx.caps,
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
        recovered = recover(
            model, ws.recovery, recovery.lr, recovery.steps, ctx.seed,
            self.cfg.recovery.weight_decay,
        )  # fmt: skip
        trial["recovery"] = {"lr": recovery.lr, "steps": recovery.steps, **recovered}
        trial.update(measure(model, ws.val, ws.eval_batch))
        trial["assessment"] = self.evaluation.assess(
            trial["val_top1"], ctx.base_val_top1, None if best is None else best["val_top1"]
        )
        trial["seconds"] = time.perf_counter() - trial_start
        self.log(
            f"trial {number} ({source['strategy_source']}): {strategy.grouping}/"
            f"{strategy.importance} achieved {trial['achieved']:.4f} val top1 "
            f"{trial['val_top1']:.2f}% ({trial['seconds']:.1f}s)"
        )
        return trial

    def _fallback_trial(
        self, history: list[dict[str, Any]], ctx: TrialContext, calibration: int
    ) -> dict[str, Any] | None:
        """When every trial failed: the isomorphic recipe, under the loosest bounds reached so far
        and then looser ones, keeps the run alive (recorded as the coordinator's fallback)."""
        self.fallbacks.append(
            {
                "agent": "coordinator",
                "kind": "no_trial",
                "reason": f"no trial succeeded; ran the isomorphic recipe under {ctx.ladder.label}",
            }
        )
        strategy = isomorphic_strategy("heads" in ctx.kinds, calibration)
        recovery = Recovery(lr=self.cfg.recovery.lr, steps=self.cfg.recovery.steps)
        source = {"strategy_source": "fallback", "default_reason": "no_trial"}
        trial = self._run_trial(len(history) + 1, strategy, recovery, source, ctx, None)
        history.append(trial)
        if "val_top1" in trial:
            return trial
        if trial.get("out_of_reach") and self._relax(ctx):
            return None
        raise PruningError(f"multi_agent: no trial reached the target ({trial['error']})")

    def _reachable_bounds(self, ctx: TrialContext) -> None:
        """Before trial 1, relax the bounds while they cannot reach the target even with every
        kind cut to its bound, so that no trial (and no LLM decision) is spent finding it out."""
        if self.search.get("mode", "macs_targeted") != "macs_targeted":
            return  # a published ratio is pruned once, wherever it lands
        ws = ctx.workspace
        while True:
            found = fewest_macs(ws.base, ctx.caps, ws.example_inputs, ctx.seed)
            if found is None:
                return
            macs, base_macs = found
            window = structured.Window.of(
                ctx.target,
                self.search["tolerance"],
                base_macs,
                self.search.get("target_gmacs"),
                self.search["gmacs_tolerance"],
            )
            most = 1 - macs / base_macs
            if most >= window.target - window.tolerance:
                return
            if not self._relax(ctx, f"even every kind at its bound removes only {most:.3f}"):
                return

    def _relax(self, ctx: TrialContext, checked: str | None = None) -> bool:
        """One step down the bounds ladder, recorded; False when there is none left.

        ``checked`` is what the check before trial 1 found, when it is the one relaxing (else a
        failed trial is)."""
        if not ctx.relax():
            return False
        found = f" ({checked} of the MACs, checked before trial 1)" if checked else ""
        reason = (
            f"target {ctx.target} out of reach under the bounds{found}; relaxed to "
            f"{ctx.ladder.label}: {ctx.caps}"
        )
        ctx.relaxations.append(
            {"level": ctx.ladder.label, "bounds": ctx.caps, "before_trial": 1 if checked else None}
        )
        self.fallbacks.append({"agent": "coordinator", "kind": "relaxed", "reason": reason})
        self.log(f"bounds relaxed to {ctx.ladder.label}: {ctx.caps}")
        return True

    # -- decisions, fallbacks and the outcome ------------------------------------------------

    def _decided(self, record: dict[str, Any]) -> None:
        """Record one decision; fail early once the plan can no longer stay under the share."""
        self.decisions.append(record)
        self._check_fallbacks(final=False)

    def _check_fallbacks(self, final: bool) -> None:
        """Raise :class:`LLMUnavailableError` when too many LLM decisions failed.

        Before the end of the plan, it raises as soon as the share is exceeded even if every
        remaining decision succeeded (1 + max_iterations decisions at most), so a dead endpoint
        fails after a few decisions instead of running a whole heuristic plan.
        """
        if self.cfg.allow_fallback:
            return
        failed, asked = llm_failures(self.decisions)
        share = self.cfg.max_fallback_share
        most = asked if final else max(asked, 1 + self.cfg.max_iterations)
        if asked and failed > share * most:
            raise LLMUnavailableError(self._unavailable(failed, asked, share))

    def _unavailable(self, failed: int, asked: int, share: float) -> str:
        settings = self.llm.settings
        where = settings.base_url or "the SDK's default endpoint"
        if self.llm.backend == "llamacpp":
            where = self.llm.model
        last = self.llm.fallbacks[-1]["reason"] if self.llm.fallbacks else "none recorded"
        return (
            f"multi_agent planning failed: {failed} of {asked} LLM decisions failed (more than "
            f"agents.max_fallback_share={share:g}); backend {self.llm.backend} at {where}; last "
            f"error: {last} (set agents.allow_fallback: true to let the default policy answer)"
        )

    def _outcome(
        self,
        ctx: TrialContext,
        history: list[dict[str, Any]],
        best: dict[str, Any],
        stop_reason: str,
        profiling: Answer,
        start: float,
    ) -> dict[str, Any]:
        from agentprune import train

        train.seed_everything(ctx.seed)
        prompt = "anchored" if self.anchored else "unanchored"
        return {
            "pruner": best["settings"],
            "expected": {k: best[k] for k in ("achieved", "macs", "params")},
            "agents": {
                "protect": ctx.protect,
                "risks": list(profiling.decision.risks),
                "bounds": ctx.caps,
                "bounds_level": ctx.ladder.label,
                "stop_reason": stop_reason,
                "best_trial": best["trial"],
                "prompt": prompt,
                "influence": influence(self.decisions, history, best, prompt),
            },
            "provenance": {
                "prompt": prompt,
                "decisions": self.decisions,
                "exchanges": self.llm.exchanges,
                "fallbacks": self.llm.fallbacks + self.fallbacks,
                "clamps": ctx.clamps,
                "relaxations": ctx.relaxations,
                "trials": history,
                "llm": self.llm.stats(),
                "planning_seconds": time.perf_counter() - start,
            },
        }


def _stop_reason(decided: Answer) -> str:
    """Why a master decision stopped the search."""
    if decided.source != "default":
        return "master"
    return "repeated_strategy" if decided.reason == "repeat" else "default_sequence_spent"
