"""The multi-agent planner: safety clamps, the heuristic policy, the loop on a real (tiny) trained
model, and the LLM's decisions carried through to the pruned model, under faults and from the
response cache.

The LLM side here is a scripted OpenAI-compatible server (``fault_server``): it tests our handling
of what an LLM returns. Real LLMs (SmolLM2 in process and over HTTP) are in ``test_llm.py`` and at
the end of this module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from agentprune import config as cfgmod
from agentprune import resolve, steps
from agentprune.agents.analysis import AnalysisAgent, Bounds, kind_caps, run_bounds
from agentprune.agents.base import classify, compact, rounded
from agentprune.agents.coordinator import BoundsLadder, LLMUnavailableError, TrialContext
from agentprune.agents.influence import influence
from agentprune.agents.master import MasterAgent
from agentprune.agents.profiling_agent import ProfilingAgent, summarize
from agentprune.agents.schemas import Allocation, MasterDecision, Strategy
from agentprune.pruning import catalog
from fault_server import FaultServer, Step

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["attention", "heads", "mlp", "residual"]


def _bounds(max_ratio: dict[str, float]) -> Bounds:
    """Bounds with the schema's default protect factor, calibration cap and ceiling."""
    agents = cfgmod.defaults("agents")
    return Bounds(
        max_ratio=max_ratio,
        protect_factor=agents["protect_factor"],
        max_calibration_batches=agents["max_calibration_batches"],
        default_ratio=agents["max_ratio"],
    )


def _strategy(**kw: Any) -> Strategy:
    base = dict(
        importance="taylor",
        grouping="isomorphic",
        heads=1.0,
        allocation=None,
        round_to=1,
        calibration_batches=4,
    )
    return Strategy(**{**base, **kw})


# --- analysis: every LLM value ends inside the bounds, and each clamp is recorded ---------------


def test_analysis_clamps_out_of_bound_values_and_records_them() -> None:
    bounds = _bounds({"attention": 0.6, "heads": 0.5, "mlp": 0.4, "residual": 0.3})
    strategy = _strategy(
        heads=2.0,
        allocation=Allocation(attention=1.0, mlp=3.0, residual=0.5),
        calibration_batches=500,
    )
    settings, clamps = AnalysisAgent().run(
        strategy, 0.5, KINDS, ["residual"], bounds, {}, heads_per_layer=[4, 4]
    )
    fields = {c["field"]: c for c in clamps}
    assert set(fields) == {
        "strategy.heads",
        "strategy.allocation.mlp",
        "strategy.allocation.residual",
        "strategy.calibration_batches",
    }
    assert fields["strategy.heads"]["applied"] == pytest.approx(0.5 / 0.5)
    assert fields["strategy.allocation.mlp"]["applied"] == pytest.approx(0.4 / 0.5)
    assert settings.calibration_batches == bounds.max_calibration_batches
    # The protected residual kind's bound halves to 0.15: at target 0.5 its largest multiple is 0.3.
    assert fields["strategy.allocation.residual"]["bound"] == pytest.approx(0.3)
    assert settings.scope_ratios["patch_embed.proj"] == pytest.approx(0.3)
    assert settings.scope_max_ratio["patch_embed.proj"] == pytest.approx(0.15)
    assert settings.max_head_ratio == pytest.approx(0.5)
    # Nothing is left to the global ranking but the heads: its cap is the largest kind bound.
    assert 0 < settings.max_pruning_ratio < 1
    for scale, glob in zip(settings.scope_ratios.values(), settings.scope_max_ratio):
        assert scale * 0.5 <= settings.scope_max_ratio[glob] + 1e-9


def test_analysis_maps_grouping_and_ranked_kinds_share_the_tightest_bound() -> None:
    bounds = _bounds({"attention": 0.8, "mlp": 0.35, "residual": 0.7})
    settings, clamps = AnalysisAgent().run(
        _strategy(grouping="uniform", importance="magnitude_l1", heads=0.0, round_to=8),
        0.3,
        ["attention", "mlp", "residual"],
        [],
        bounds,
        {},
    )
    assert clamps == []
    assert (settings.global_pruning, settings.isomorphic) == (False, False)
    assert settings.importance == "magnitude_l1" and settings.round_to == 8
    assert settings.max_pruning_ratio == pytest.approx(0.35)
    assert not settings.prune_num_heads


def test_head_bound_rounds_down_to_whole_heads() -> None:
    bounds = _bounds({"heads": 0.45})
    assert kind_caps(["heads"], [], bounds, [2, 2])["heads"] == 0.0
    assert kind_caps(["heads"], [], bounds, [4, 4])["heads"] == 0.25
    settings, clamps = AnalysisAgent().run(_strategy(), 0.3, ["heads"], [], bounds, {}, [2, 2])
    assert not settings.prune_num_heads and clamps[0]["reason"].startswith("the heads bound")


def test_config_bounds_tighten_the_profile_per_family() -> None:
    profile = {"safety_bounds": {"max_ratio": {"mlp": 0.9, "heads": 0.6}}}
    config = resolve.load_config(
        ROOT / "config" / "config.yaml",
        overrides={
            "agents": {
                "bounds": [{"match": "deit_*", "max_ratio": {"heads": 0.25}}],
                "max_ratio": 0.8,
            }
        },
    )
    agents = catalog.get("multi_agent").load_settings(
        resolve.method_settings(config, "multi_agent")
    )
    vit = run_bounds(profile, agents, "digits", "vit", "deit_tiny_patch16_224")
    cnn = run_bounds(profile, agents, "digits", "cnn", "convnext_atto")
    assert vit.max_ratio == {"mlp": 0.8, "heads": 0.25}
    assert cnn.max_ratio == {"mlp": 0.8, "heads": 0.6}


# --- default policies and prompts ---------------------------------------------------------------


def _state(history: list[dict[str, Any]], protect: list[str]) -> dict[str, Any]:
    return {
        "target": 0.3,
        "profile": {"attention_heads": [4, 4], "loss_increase": {"mlp": {"0.3": 0.1}}},
        "protect": protect,
        "risks": [],
        "bounds": {},
        "max_calibration_batches": 16,
        "recovery": {"lr": 0.001, "steps": 20, "lr_min": 1e-5, "lr_max": 0.01, "max_steps": 50},
        "base_val_top1": 90.0,
        "history": history,
        "trials_left": 3,
        "calibration_batches": 4,
    }


def _plan_of(decision: MasterDecision) -> dict[str, Any]:
    """A stand-in for the coordinator's effective trial: the decision's trial plan itself."""
    return decision.trial_plan()


def _ran(decision: MasterDecision) -> dict[str, Any]:
    """A history entry for a trial that ran ``decision``."""
    return {"effective": _plan_of(decision), "val_top1": 80.0}


def test_master_default_runs_its_sequence_skipping_what_was_tried_then_stops() -> None:
    master = MasterAgent()
    first = master.heuristic(_state([], ["mlp"]), _plan_of)
    assert first.action == "continue"
    assert (first.strategy.grouping, first.strategy.importance) == ("isomorphic", "taylor")
    assert (first.recovery.lr, first.recovery.steps) == (0.001, 20)
    second = master.heuristic(_state([_ran(first)], ["mlp"]), _plan_of)
    assert second.strategy.allocation.mlp == 0.5 and second.strategy.allocation.attention == 1.0
    # A trial the LLM already ran is skipped: the default answers with the next untried one.
    third = master.heuristic(_state([_ran(second)], ["mlp"]), _plan_of)
    assert third.trial_plan() == first.trial_plan()
    history = [_ran(first), _ran(second)]
    last = master.heuristic(_state(history, ["mlp"]), _plan_of)
    assert last.strategy.calibration_batches == 8 and last.strategy.heads == 0.5
    spent = master.heuristic(_state([*history, _ran(last)], ["mlp"]), _plan_of)
    assert spent.action == "stop"


def test_prompts_describe_every_field_and_hide_the_default_unless_anchored() -> None:
    master = MasterAgent()
    state = _state([], [])
    default = master.heuristic(state, _plan_of)
    limits = master.limits(state)
    plain = master.messages(master.turns(state), None, limits, master.context(state))
    system, run = plain[0]["content"].split("\nThe run: ")
    for field in ("action", "importance", "grouping", "heads", "allocation", "round_to",
                  "calibration_batches", "lr", "steps"):  # fmt: skip
        assert f"- {field} (" in system, field
    # No free text: every reply token is a choice the loop acts on.
    assert "rationale" not in system
    # What stays fixed over the plan is in the system prompt (evaluated once); what changes
    # from call to call is the user message.
    assert json.loads(run)["target"] == state["target"] and "history" not in json.loads(run)
    assert len(plain) == 2 and set(json.loads(plain[1]["content"])) == {"bounds", "trials_left"}
    # Every field is described, with the run's own limits filled in.
    assert "(1e-05 to 0.01)" in system and "at most 50" in system and "at most 16" in system
    # Numbers are menus (a small model's replies stay short and sane; clamps still apply).
    assert "heads (0.0|0.5|1.0|1.5|2.0)" in system and "steps (0|10|20|30|50)" in system
    assert "{" not in system
    assert "default policy" not in system and '"isomorphic","round_to"' not in system
    anchored = master.messages(master.turns(state), default, limits)[0]["content"]
    assert "The default policy would reply:" in anchored
    assert compact(rounded(default.model_dump())) in anchored


def _trial(number: int, bounds: dict[str, float], val_top1: float | None) -> dict[str, Any]:
    """A coordinator trial record: what the master's turns are built from."""
    strategy = MasterAgent().heuristic(_state([], []), _plan_of)
    trial = {
        "trial": number,
        "strategy": strategy.strategy.model_dump(),
        "recovery_requested": strategy.recovery.model_dump(),
        "bounds": bounds,
    }
    if val_top1 is None:
        trial["error"] = "no ratio reaches the target; raise max_pruning_ratio"
    else:
        trial.update(achieved=0.5, val_top1=val_top1, val_loss=0.3, params=1000)
        trial["assessment"] = {"drop_from_base": 1.0, "gain_over_best": None}
    return trial


def test_the_master_conversation_only_grows_one_turn_per_trial() -> None:
    """Call k + 1's messages are call k's plus the turn of the trial k ran, so the backend
    evaluates each turn once; relaxed bounds are said once, in the turn after which they
    changed."""
    master = MasterAgent()
    tight, loose = {"mlp": 0.3}, {"mlp": 0.9}
    trials = [_trial(1, tight, None), _trial(2, loose, 80.0)]
    calls = []
    for k in range(3):
        state = _state(trials[:k], [])
        state["bounds"] = tight if k == 0 else loose
        state["trials_left"] = 3 - k
        limits, context = master.limits(state), master.context(state)
        calls.append(master.messages(master.turns(state), None, limits, context))
    for before, after in zip(calls, calls[1:]):
        assert after[: len(before)] == before and len(after) == len(before) + 1
    first, failed, ran = (json.loads(m["content"]) for m in calls[2][1:])
    assert first == {"bounds": tight, "trials_left": 3}
    assert failed["error"] == "no ratio reaches the target" and failed["trials_left"] == 2
    assert failed["bounds_relaxed_to"] == loose and "bounds_relaxed_to" not in ran
    assert ran["val_top1"] == 80.0 and ran["trials_left"] == 1
    assert "val_loss" not in ran and "params" not in ran and ran["drop_from_base"] == 1.0


def test_a_reply_equal_to_the_default_is_not_an_llm_strategy() -> None:
    master = MasterAgent()
    default = master.heuristic(_state([], []), _plan_of)
    copied = MasterDecision.model_validate(default.model_dump())
    assert classify(copied, default, None).source == "llm_equal_default"
    other = copied.model_copy(update={"action": "continue"})
    other = other.model_copy(update={"strategy": other.strategy.model_copy(update={"heads": 0})})
    assert classify(other, default, None).source == "llm"
    fell_back = classify(None, default, "transport")
    assert (fell_back.source, fell_back.reason, fell_back.decision) == (
        "default",
        "transport",
        default,
    )


def test_influence_counts_decisions_by_source_and_reason() -> None:
    decisions = [
        {"agent": "profiling", "source": "llm", "reason": None},
        {"agent": "master", "source": "llm_equal_default", "reason": None},
        {"agent": "master", "source": "default", "reason": "invalid"},
        {"agent": "master", "source": "default", "reason": "repeat"},
        {"agent": "master", "source": "llm", "reason": None},
    ]
    trials = [{"strategy_source": s} for s in ("llm_equal_default", "default", "llm")]
    summary = influence(decisions, trials, trials[2], "unanchored")
    master = summary["agents"]["master"]
    assert (master["decisions"], master["llm"], master["llm_differs"]) == (4, 2, 1)
    assert master["default"] == {"transport": 0, "invalid": 1, "repeat": 1, "no_llm": 0}
    assert (summary["llm_trials"], summary["selected_llm"]) == (1, True)
    assert (summary["failed"], summary["asked"], summary["fallback_share"]) == (1, 5, 0.2)
    no_llm = [{"agent": "master", "source": "default", "reason": "no_llm"}]
    assert influence(no_llm, trials[:1], trials[0], "unanchored")["fallback_share"] is None


def test_profiling_heuristic_protects_the_most_sensitive_kinds() -> None:
    profile = {
        "macs": 100,
        "params": 10,
        "breakdown": {"mlp": 60, "attention_qkv": 40},
        "num_heads": [4],
        "sensitivity": {
            "kinds": {
                "mlp": {"ratios": [0.1, 0.5], "loss_increase": [0.1, 0.4]},
                "heads": {"ratios": [0.1, 0.5], "loss_increase": [0.2, 0.9]},
                "attention": {"ratios": [0.1, 0.5], "loss_increase": [0.0, 0.1]},
            }
        },
        "safety_bounds": {"max_ratio": {"mlp": 0.9}},
    }
    summary = summarize(profile)
    assert summary["macs_share"] == {"mlp": 0.6, "attention_qkv": 0.4}
    decision = ProfilingAgent().heuristic(summary, max_loss_increase=0.5)
    assert decision.protect == ["heads", "mlp"]


# --- the loop on a trained tiny ViT -------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained smoke ViT and its profile (the plan rule's inputs)."""
    root = tmp_path_factory.mktemp("agents")
    config = resolve.load_config(
        ROOT / "config" / "config.yaml",
        ROOT / "config" / "smoke.yaml",
        overrides={"results": str(root / "results")},
    )
    base = root / "base" / "model"
    steps.base_model(resolve.base_model_step(config, "vit"), base, root / "base" / "metrics.json")
    steps.profile(resolve.profile_step(config), base, root / "profile.json")
    return {"root": root, "config": config, "base": base, "profile": root / "profile.json"}


def plan(
    smoke: dict[str, Any],
    agents: dict[str, Any],
    name: str,
    seed: int = 0,
    method: str = "multi_agent",
) -> dict:
    """Plan ``method`` at ratio 0.3 with ``agents`` merged into the config."""
    study = {"agents": agents, "methods": [method], "paper": {"reference_method": method}}
    config = cfgmod.merge(smoke["config"], study)
    resolve.prepare(config)
    out = smoke["root"] / name / "plan.json"
    step = resolve.plan_step(config, method, "vit", 0.3)
    return steps.plan(step, seed, smoke["profile"], out, smoke["base"], threads=1)


def assert_in_bounds(doc: dict[str, Any]) -> None:
    """The contract every multi_agent plan keeps, whatever the LLM said."""
    assert doc["target"] == {"metric": "macs_fraction_removed", "value": 0.3}
    for trial in doc["provenance"]["trials"]:
        caps, s = trial["bounds"], trial["settings"]
        assert 0 < s["max_pruning_ratio"] < 1
        assert 0 <= s["max_head_ratio"] < 1
        assert s["max_head_ratio"] <= caps.get("heads", 0.0) + 1e-9
        assert 1 <= s["calibration_batches"] <= 16
        for glob, cap in s["scope_max_ratio"].items():
            assert 0 <= cap < 1 and s["scope_ratios"][glob] * 0.3 <= cap + 1e-9
        for kind, ratio in trial.get("realized_ratios", {}).items():
            assert ratio <= caps[kind] + 1 / 16 + 1e-9, (kind, ratio)
        if "recovery" in trial:
            assert 1e-5 <= trial["recovery"]["lr"] <= 0.01
            assert 0 <= trial["recovery"]["steps"] <= 50


def test_ablation_is_the_default_policies_and_the_prune_step_rebuilds_its_best_trial(
    smoke,
) -> None:
    doc = plan(smoke, {}, "ablation", method="agents_heuristic")
    trials = doc["provenance"]["trials"]
    assert 1 <= len(trials) <= 3 and doc["provenance"]["backend"] == "heuristic"
    assert doc["method"] == "agents_heuristic" and doc["agents"]["prompt"] == "unanchored"
    scored = [t for t in trials if "val_top1" in t]
    best = max(scored, key=lambda t: t["val_top1"])
    assert doc["agents"]["best_trial"] == best["trial"]
    assert doc["pruner"] == best["settings"]
    assert trials[0]["strategy"]["grouping"] == "isomorphic"
    assert all(t["strategy_source"] == "default" for t in trials)
    assert_in_bounds(doc)
    influence = doc["agents"]["influence"]
    assert influence["llm"] == 0 and influence["asked"] == 0 and influence["llm_trials"] == 0
    assert influence["agents"]["master"]["default"]["no_llm"] == len(trials) + (
        doc["agents"]["stop_reason"] == "default_sequence_spent"
    )
    cost = steps.planning_cost(doc["provenance"], doc["agents"])
    assert cost["llm_calls"] == 0 and cost["influence"] == influence
    # The prune step carries the plan out to exactly the trial's model.
    root = smoke["root"] / "ablation"
    report = steps.prune(
        resolve.prune_step(smoke["config"]),
        root / "plan.json",
        smoke["base"],
        root / "pruned",
        root / "report.json",
    )
    assert report["macs"] == doc["expected"]["macs"]
    assert report["achieved"] == pytest.approx(doc["expected"]["achieved"], abs=1e-12)
    assert abs(report["achieved"] - 0.3) <= 0.005


def test_a_target_reached_only_past_a_bound_is_out_of_reach(vit_factory, example_inputs, calib):
    """The coordinator relaxes the bounds on TargetOutOfReach only: a prune that meets the MACs
    target by cutting a kind past its bound must say so, or every later trial fails the same way
    and the plan dies (seen on convnext 0.5, whose top-up pushed mlp to 0.500 over 0.467)."""
    from agentprune.agents.pruning_agent import PruningAgent
    from agentprune.pruning.settings import PrunerSettings, TargetOutOfReach

    search = {"tolerance": 0.005, "max_steps": 30, "gmacs_tolerance": 0.005}
    caps = {"attention": 0.9, "mlp": 0.05, "residual": 0.9}
    with pytest.raises(TargetOutOfReach, match=r"mlp pruned by 0\.\d+, above its bound 0\.050"):
        PruningAgent().run(
            vit_factory(), PrunerSettings(), 0.5, example_inputs, calib, 0, search, caps
        )


TIGHT = {"match": "digits/vit", "max_ratio": {k: 0.05 for k in ("attention", "mlp", "residual")}}


def test_bounds_that_cannot_reach_the_target_are_relaxed_before_trial_1(smoke) -> None:
    """Bounds under which even every kind cut to its bound misses the target are relaxed before
    any trial, so neither loop spends a trial (nor the LLM a decision) on finding it out (seen on
    convnext 0.75: every kind at its measured bound removes at most 0.646 of the MACs, and trial 1
    of both loops failed there)."""
    # A heads bound below one head: no kind can make up for the others.
    tight = {"match": TIGHT["match"], "max_ratio": {**TIGHT["max_ratio"], "heads": 0.05}}
    doc = plan(smoke, {"bounds": [tight]}, "tight_checked", method="agents_heuristic")
    trials = doc["provenance"]["trials"]
    assert not any(t.get("out_of_reach") for t in trials)
    assert trials[0]["bounds"]["mlp"] > 0.05 and "val_top1" in trials[0]
    relaxations = doc["provenance"]["relaxations"]
    assert relaxations and all(r["before_trial"] == 1 for r in relaxations)
    reasons = [f["reason"] for f in doc["provenance"]["fallbacks"] if f["kind"] == "relaxed"]
    assert reasons and all("checked before trial 1" in r for r in reasons)
    assert "only 0." in reasons[0]
    assert trials[0]["bounds"] == relaxations[-1]["bounds"]
    assert abs(doc["expected"]["achieved"] - 0.3) <= 0.005
    assert_in_bounds(doc)


def test_the_check_before_trial_1_never_relaxes_bounds_that_reach_the_target(
    vit_factory, example_inputs
) -> None:
    """The fewest MACs under the bounds is a floor no trial goes below: a trial that reaches the
    target under the bounds proves the check would have let them stand."""
    from agentprune.agents.pruning_agent import fewest_macs
    from agentprune.pruning import structured

    base = vit_factory()
    base_macs = structured.count_macs(base, example_inputs)[0]
    tight = fewest_macs(base, {"attention": 0.05, "mlp": 0.05, "residual": 0.05}, example_inputs, 0)
    loose = fewest_macs(base, {"attention": 0.6, "mlp": 0.6, "residual": 0.6}, example_inputs, 0)
    assert tight[1] == loose[1] == base_macs
    assert fewest_macs(base, {}, example_inputs, 0) == (base_macs, base_macs)  # nothing to cut
    assert 0.0 < 1 - tight[0] / base_macs < 0.3 < 1 - loose[0] / base_macs
    settings = structured.PrunerSettings(max_pruning_ratio=0.6)
    _, report = structured.prune_to_target(
        base, settings, 0.3, example_inputs, [], 0,
        tolerance=0.005, max_steps=30, gmacs_tolerance=0.005,
    )  # fmt: skip
    assert report["macs"] >= loose[0]


def test_bounds_that_fail_a_trial_are_relaxed_step_by_step(smoke, monkeypatch) -> None:
    """A trial that finds the target out of reach (the check before trial 1 cannot always tell)
    relaxes the bounds one loosening level at a time."""
    from agentprune.agents import coordinator

    monkeypatch.setattr(coordinator, "fewest_macs", lambda *args: None)
    doc = plan(smoke, {"bounds": [TIGHT]}, "tight", method="agents_heuristic")
    trials = doc["provenance"]["trials"]
    assert trials[0]["out_of_reach"] and trials[0]["bounds"]["mlp"] == 0.05
    reasons = [f["reason"] for f in doc["provenance"]["fallbacks"]]
    assert any("relaxed to the config ceiling" in r for r in reasons)
    assert doc["agents"]["bounds_level"].startswith("the config ceiling")
    relaxations = doc["provenance"]["relaxations"]
    assert relaxations[-1]["level"].startswith("the config")
    assert all(r["before_trial"] is None for r in relaxations)
    # Every relaxation loosens something: a level equal to the one before (no protection to drop)
    # is skipped instead of spending a trial on the same bounds.
    steps = [trials[0]["bounds"]] + [r["bounds"] for r in relaxations]
    assert all(a != b for a, b in zip(steps, steps[1:]))
    assert abs(doc["expected"]["achieved"] - 0.3) <= 0.005
    assert_in_bounds(doc)


def test_a_relaxation_always_loosens_a_bound() -> None:
    """Without protected kinds, dropping the protection changes nothing: that level is skipped
    rather than spending a trial on the same bounds."""
    measured = _bounds({"attention": 0.2, "mlp": 0.2, "residual": 0.2})
    ctx = TrialContext(
        target=0.5,
        kinds=KINDS,
        protect=[],
        heads_per_layer=[4, 4],
        overrides={},
        workspace=None,
        seed=0,
        base_val_top1=90.0,
        ladder=BoundsLadder.of(measured),
    )
    tight = ctx.caps
    assert ctx.relax() and ctx.ladder.label.startswith("the config ceiling")
    assert ctx.caps != tight and not ctx.relax()
    protected = dataclasses.replace(ctx, protect=["mlp"], ladder=BoundsLadder.of(measured))
    assert protected.relax() and protected.ladder.label == "measured bounds without protection"


def _scripted(decisions: dict[str, Any]):
    """A server callable answering each agent (recognised by its role prompt) with a decision;
    a list answers the agent's calls in turn (its last entry from then on)."""
    calls: dict[str, int] = {}

    def answer(body: dict, headers: dict) -> Step:
        system = body["messages"][0]["content"]
        for agent, decision in decisions.items():
            if f"You are the {agent} agent" in system:
                turn = calls.get(agent, 0)
                calls[agent] = turn + 1
                reply = (
                    decision[min(turn, len(decision) - 1)]
                    if isinstance(decision, list)
                    else decision
                )
                return Step(json.dumps(reply), usage=(100, 20))
        return Step("{}")

    return answer


UNIFORM_L1 = {
    "action": "continue",
    "strategy": {
        "importance": "magnitude_l1",
        "grouping": "uniform",
        "heads": 9.0,
        "allocation": {"attention": 1.0, "mlp": 1.0, "residual": 0.5},
        "round_to": 1,
        "calibration_batches": 99,
    },
    "recovery": {"lr": 5.0, "steps": 999},
}
SCRIPT = {"profiling": {"risks": ["heads are few"], "protect": ["mlp"]}, "master": UNIFORM_L1}


def _openai(server: FaultServer, cache_dir: Path | None, **kw: Any) -> dict[str, Any]:
    return {
        "backend": "openai",
        "model": "scripted",
        "base_url": server.url,
        "max_iterations": 1,
        "cache": "readwrite" if cache_dir else "off",
        "cache_dir": str(cache_dir or ""),
        "backoff_s": 0.01,
        **kw,
    }


def _served(smoke, script: dict[str, Any], name: str, **agents: Any) -> tuple[dict, FaultServer]:
    server = FaultServer(default=_scripted(script))
    try:
        return plan(smoke, _openai(server, None, **agents), name), server
    finally:
        server.close()


def test_llm_decisions_drive_the_pruned_model_inside_the_bounds(smoke) -> None:
    doc, _ = _served(smoke, SCRIPT, "scripted")
    (trial,) = doc["provenance"]["trials"]
    assert trial["strategy_source"] == "llm"
    assert doc["agents"]["protect"] == ["mlp"] and doc["agents"]["risks"] == ["heads are few"]
    pruner = doc["pruner"]
    assert (pruner["importance"], pruner["global_pruning"]) == ("magnitude_l1", False)
    clamped = {c["field"] for c in doc["provenance"]["clamps"]}
    assert {"strategy.calibration_batches", "recovery.lr", "recovery.steps"} <= clamped
    assert trial["recovery"]["lr"] == 0.01 and trial["recovery"]["steps"] == 50
    assert_in_bounds(doc)
    exchanges = doc["provenance"]["exchanges"]
    assert [e["agent"] for e in exchanges] == ["profiling", "master"]
    assert all(e["ok"] and e["completion_tokens"] == 20 for e in exchanges)
    assert doc["provenance"]["fallbacks"] == []
    influence = doc["agents"]["influence"]
    assert influence["agents"]["profiling"]["llm_differs"] == 1
    assert influence["agents"]["master"]["llm_differs"] == 1
    assert (influence["llm_trials"], influence["selected_llm"]) == (1, True)
    assert influence["fallback_share"] == 0.0
    # A different decision gives a different model than the ablation's plan.
    ablation = plan(smoke, {"max_iterations": 1}, "ablation1", method="agents_heuristic")
    assert ablation["pruner"] != pruner
    assert ablation["expected"]["params"] != doc["expected"]["params"]


def _default_replies(smoke) -> dict[str, Any]:
    """What the default policies decide first on the smoke model, as LLM replies."""
    summary = summarize(json.loads(Path(smoke["profile"]).read_text()))
    profiling = ProfilingAgent().heuristic(summary, 0.5)
    state = _state([], profiling.protect)
    state["profile"] = summary
    state["calibration_batches"] = smoke["config"]["prune"]["calibration_batches"]
    master = MasterAgent().heuristic(state, _plan_of)
    return {"profiling": profiling.model_dump(), "master": master.model_dump()}


def test_a_copied_default_reply_is_recorded_as_equal_to_the_default(smoke) -> None:
    doc, _ = _served(smoke, _default_replies(smoke), "copied")
    (trial,) = doc["provenance"]["trials"]
    assert trial["strategy_source"] == "llm_equal_default"
    influence = doc["agents"]["influence"]
    assert influence["llm"] == 2 and influence["llm_differs"] == 0
    assert (influence["llm_trials"], influence["selected_llm"]) == (0, False)
    assert doc["provenance"]["prompt"] == "unanchored"
    # No exchange showed the LLM the default decision it copied.
    assert not any(
        "default policy" in e["messages"][0]["content"] for e in doc["provenance"]["exchanges"]
    )
    anchored, _ = _served(smoke, _default_replies(smoke), "anchored", anchor_default=True)
    assert anchored["agents"]["prompt"] == anchored["provenance"]["prompt"] == "anchored"
    assert all(
        "The default policy would reply:" in e["messages"][0]["content"]
        for e in anchored["provenance"]["exchanges"]
    )


def test_a_repeated_strategy_is_re_asked_once_then_the_default_runs(smoke) -> None:
    doc, server = _served(smoke, SCRIPT, "repeat", max_iterations=2)
    masters = [
        r for r in server.requests if "You are the master agent" in r["messages"][0]["content"]
    ]
    assert len(masters) == 3  # trial 1, its repeat, the re-ask with feedback
    assert "already tried" in masters[2]["messages"][-1]["content"]
    first, second = doc["provenance"]["trials"]
    assert first["strategy_source"] == "llm"
    assert (second["strategy_source"], second["default_reason"]) == ("default", "repeat")
    assert second["strategy"]["grouping"] == "isomorphic"  # the default's first trial
    master = doc["agents"]["influence"]["agents"]["master"]
    assert master["default"]["repeat"] == 1 and master["llm_differs"] == 1


FAULTS = {
    "malformed_json": lambda: FaultServer(default=Step('{"action": "continue", "strat')),
    "schema_violation": lambda: FaultServer(
        default=Step(json.dumps({"action": "go", "lr": -1, "protect": ["everything"]}))
    ),
    "http_500": lambda: FaultServer(default=Step(status=500)),
    "http_429": lambda: FaultServer(default=Step(status=429)),
    "hang": lambda: FaultServer(default=Step("{}", delay=2.0)),
}


def _faulty(fault: str) -> FaultServer:
    if fault == "connection_refused":
        server = FaultServer()
        server.close()  # the port is now closed
        return server
    return FAULTS[fault]()


@pytest.mark.parametrize("fault", [*FAULTS, "connection_refused"])
def test_a_failing_llm_fails_the_plan_with_one_line(smoke, fault: str) -> None:
    server = _faulty(fault)
    agents = _openai(server, None, timeout_s=0.3, max_retries=1, max_reasks=1, max_iterations=2)
    try:
        with pytest.raises(LLMUnavailableError) as err:
            plan(smoke, agents, f"fail_{fault}")
    finally:
        server.close()
    message = str(err.value)
    assert "\n" not in message and "backend openai" in message and server.url in message
    assert "agents.max_fallback_share=0.5" in message and "last error:" in message
    # It fails early: no trial model is pruned once the share can no longer be met.
    assert not (smoke["root"] / f"fail_{fault}" / "plan.json").exists()


@pytest.mark.parametrize("fault", ["malformed_json", "connection_refused"])
def test_opted_in_fallback_completes_and_is_recorded(smoke, fault: str) -> None:
    server = _faulty(fault)
    agents = _openai(server, None, timeout_s=0.3, max_retries=1, allow_fallback=True)
    try:
        doc = plan(smoke, agents, f"fault_{fault}")
    finally:
        server.close()
    provenance = doc["provenance"]
    assert provenance["trials"] and "val_top1" in provenance["trials"][0]
    assert provenance["allow_fallback"] is True
    kind = "transport" if fault == "connection_refused" else "invalid"
    assert {(f["agent"], f["kind"]) for f in provenance["fallbacks"]} == {
        ("profiling", kind),
        ("master", kind),
    }
    assert doc["agents"]["influence"]["fallback_share"] == 1.0
    assert provenance["trials"][0]["strategy_source"] == "default"
    assert_in_bounds(doc)


def _stable(doc: dict[str, Any]) -> dict[str, Any]:
    """A plan without its timings (which differ between runs by nature)."""
    doc = copy.deepcopy(doc)
    prov = doc["provenance"]
    prov.pop("planning_seconds")
    prov.pop("llm")
    for trial in prov["trials"]:
        trial.pop("seconds")
        trial.get("recovery", {}).pop("seconds", None)
    for exchange in prov["exchanges"]:
        exchange.pop("latency_s")
        exchange.pop("cached")
    return doc


def test_cache_replays_the_plan_without_calling_the_llm(smoke, tmp_path: Path) -> None:
    server = FaultServer(default=_scripted(SCRIPT))
    try:
        first = plan(smoke, _openai(server, tmp_path / "cache"), "cache1")
        calls = len(server.requests)
        second = plan(smoke, _openai(server, tmp_path / "cache"), "cache2")
    finally:
        server.close()
    assert calls == 2 and len(server.requests) == calls
    assert steps.planning_cost(second["provenance"])["llm_calls"] == 0
    assert all(e["cached"] for e in second["provenance"]["exchanges"])
    assert _stable(first) == _stable(second)


# --- real LLMs: SmolLM2-135M over HTTP and in process ---------------------------------------------

needs_llama = pytest.mark.skipif(
    not __import__("agentprune.agents.llm", fromlist=["x"]).llama_cpp_available(),
    reason="llama-cpp-python is not installed (pip install -e '.[llm]')",
)


def _assert_real_exchanges(doc: dict[str, Any], backend: str) -> None:
    provenance = doc["provenance"]
    assert provenance["backend"] == backend
    real = [e for e in provenance["exchanges"] if e["ok"]]
    # Every agent that asks the LLM got a valid, non-empty answer from it.
    assert {e["agent"] for e in real} == {"profiling", "master"}
    assert all(e["completion_tokens"] > 0 and e["prompt_tokens"] > 0 for e in real)
    assert not [f for f in provenance["fallbacks"] if f.get("kind") == "invalid"]
    assert steps.planning_cost(provenance)["llm_calls"] >= 2
    influence = doc["agents"]["influence"]
    assert influence["asked"] == influence["decisions"] and influence["fallback_share"] == 0.0
    assert_in_bounds(doc)


@needs_llama
def test_openai_backend_plans_with_a_real_llm_server(smoke, llama_server) -> None:
    agents = {
        "backend": "openai",
        "model": "smollm2",
        "base_url": llama_server,
        "max_iterations": 2,
        "cache": "off",
        "timeout_s": 120,
    }
    doc = plan(smoke, agents, "http")
    _assert_real_exchanges(doc, "openai")
    # llama-cpp-python's server rejects json_schema once; auto then asks for json_object.
    first = doc["provenance"]["exchanges"][0]
    assert first["ok"] or "response_format" in first["error"]


@needs_llama
def test_llamacpp_backend_plans_in_process(smoke) -> None:
    doc = plan(smoke, {"backend": "llamacpp", "max_iterations": 2, "cache": "off"}, "inproc")
    _assert_real_exchanges(doc, "llamacpp")
    assert doc["provenance"]["llm_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_transcript_page_shows_every_exchange_and_escapes_llm_text() -> None:
    from agentprune.transcript import render_transcript

    exchange = {
        "agent": "evaluation",
        "backend": "openai",
        "model": "m",
        "messages": [{"role": "user", "content": "assess"}],
        "response": '{"assessment": "<script>alert(1)</script>"}',
        "decision": None,
        "ok": False,
        "error": "invalid reply",
        "latency_s": 0.5,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached": False,
    }
    doc = {
        "method": "multi_agent",
        "dataset": "digits",
        "model": "vit",
        "seed": 0,
        "target": {"value": 0.3},
        "pruner": {"importance": "taylor"},
        "agents": {"best_trial": 1, "stop_reason": "master", "protect": ["mlp"], "bounds": {}},
        "provenance": {
            "backend": "openai",
            "llm_model": "m",
            "planning_seconds": 3.0,
            "exchanges": [exchange, {**exchange, "agent": "master", "ok": True, "error": None}],
            "fallbacks": [{"agent": "evaluation", "reason": "invalid reply after 1 re-ask"}],
            "clamps": [{"agent": "analysis", "field": "strategy.heads", "requested": 3,
                        "applied": 1, "bound": 1, "reason": "heads bound", "trial": 1}],
            "trials": [{"trial": 1, "strategy": {"grouping": "global"}, "strategy_source": "llm",
                        "achieved": 0.3, "val_top1": 90.0, "val_loss": 0.3,
                        "recovery": {"lr": 0.001, "steps": 5}, "seconds": 1.0,
                        "assessment": {"acceptable": True, "assessment": "fine"}}],
        },
    }  # fmt: skip
    page = render_transcript(doc)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("<details") == 2
    assert "invalid reply after 1 re-ask" in page and "strategy.heads" in page
