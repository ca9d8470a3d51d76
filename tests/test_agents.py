"""The multi-agent planner: safety clamps, the heuristic policy, the loop on a real (tiny) trained
model, and the LLM's decisions carried through to the pruned model, under faults and from the
response cache.

The LLM side here is a scripted OpenAI-compatible server (``fault_server``): it tests our handling
of what an LLM returns. Real LLMs (SmolLM2 in process and over HTTP) are in ``test_llm.py`` and at
the end of this module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from agentprune import config as cfgmod
from agentprune import steps
from agentprune.agents.analysis import AnalysisAgent, Bounds, kind_caps, run_bounds
from agentprune.agents.master import MasterAgent
from agentprune.agents.profiling_agent import ProfilingAgent, summarize
from agentprune.agents.schemas import Allocation, Strategy
from fault_server import FaultServer, Step

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["attention", "heads", "mlp", "residual"]


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
    bounds = Bounds(max_ratio={"attention": 0.6, "heads": 0.5, "mlp": 0.4, "residual": 0.3})
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
    bounds = Bounds(max_ratio={"attention": 0.8, "mlp": 0.35, "residual": 0.7})
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
    bounds = Bounds(max_ratio={"heads": 0.45})
    assert kind_caps(["heads"], [], bounds, [2, 2])["heads"] == 0.0
    assert kind_caps(["heads"], [], bounds, [4, 4])["heads"] == 0.25
    settings, clamps = AnalysisAgent().run(_strategy(), 0.3, ["heads"], [], bounds, {}, [2, 2])
    assert not settings.prune_num_heads and clamps[0]["reason"].startswith("the heads bound")


def test_config_bounds_tighten_the_profile_per_family() -> None:
    profile = {"safety_bounds": {"max_ratio": {"mlp": 0.9, "heads": 0.6}}}
    agents = {"bounds": [{"match": "deit_*", "max_ratio": {"heads": 0.25}}], "max_ratio": 0.8}
    vit = run_bounds(profile, agents, "digits", "vit", "deit_tiny_patch16_224")
    cnn = run_bounds(profile, agents, "digits", "cnn", "convnext_atto")
    assert vit.max_ratio == {"mlp": 0.8, "heads": 0.25}
    assert cnn.max_ratio == {"mlp": 0.8, "heads": 0.6}


# --- heuristic policies ------------------------------------------------------------------------


def _state(history: list[dict[str, Any]], protect: list[str]) -> dict[str, Any]:
    return {
        "target": 0.3,
        "profile": {"attention_heads": [4, 4]},
        "protect": protect,
        "bounds": {},
        "history": history,
        "trials_left": 3,
        "calibration_batches": 4,
        "min_improvement": 0.5,
    }


def test_master_heuristic_starts_from_the_isomorphic_recipe_and_stops_when_stalled() -> None:
    master = MasterAgent()
    first = master.heuristic(_state([], ["mlp"]))
    assert first.action == "continue"
    assert (first.strategy.grouping, first.strategy.importance) == ("isomorphic", "taylor")
    second = master.heuristic(_state([{"val_top1": 80.0}], ["mlp"]))
    assert second.strategy.allocation.mlp == 0.5 and second.strategy.allocation.attention == 1.0
    stalled = master.heuristic(_state([{"val_top1": 80.0}, {"val_top1": 80.2}], ["mlp"]))
    assert stalled.action == "stop"


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
    config = cfgmod.load_config(
        ROOT / "config" / "config.yaml",
        ROOT / "config" / "smoke.yaml",
        overrides={"results": str(root / "results")},
    )
    base = root / "base" / "model"
    steps.base_model(config, "vit", base, root / "base" / "metrics.json")
    steps.profile(config, base, root / "profile.json")
    return {"root": root, "config": config, "base": base, "profile": root / "profile.json"}


def plan(smoke: dict[str, Any], agents: dict[str, Any], name: str, seed: int = 0) -> dict:
    """Plan multi_agent at ratio 0.3 with ``agents`` merged into the config."""
    config = cfgmod.with_defaults(cfgmod.merge(smoke["config"], {"agents": agents}))
    cfgmod.check_config(config)
    out = smoke["root"] / name / "plan.json"
    return steps.plan(
        config, "multi_agent", "vit", 0.3, seed, smoke["profile"], out, smoke["base"], threads=1
    )


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


def test_heuristic_plan_is_the_best_trial_and_the_prune_step_rebuilds_it(smoke) -> None:
    doc = plan(smoke, {"backend": "heuristic"}, "heuristic")
    trials = doc["provenance"]["trials"]
    assert 1 <= len(trials) <= 3 and doc["provenance"]["backend"] == "heuristic"
    scored = [t for t in trials if "val_top1" in t]
    best = max(scored, key=lambda t: t["val_top1"])
    assert doc["agents"]["best_trial"] == best["trial"]
    assert doc["pruner"] == best["settings"]
    assert_in_bounds(doc)
    assert steps.planning_cost(doc["provenance"])["llm_calls"] == 0
    # The prune step carries the plan out to exactly the trial's model.
    root = smoke["root"] / "heuristic"
    report = steps.prune(
        smoke["config"], root / "plan.json", smoke["base"], root / "pruned", root / "report.json"
    )
    assert report["macs"] == doc["expected"]["macs"]
    assert report["achieved"] == pytest.approx(doc["expected"]["achieved"], abs=1e-12)
    assert abs(report["achieved"] - 0.3) <= 0.005


def test_bounds_that_leave_the_target_out_of_reach_are_relaxed_step_by_step(smoke) -> None:
    tight = {
        "match": "digits/vit",
        "max_ratio": {k: 0.05 for k in ("attention", "mlp", "residual")},
    }
    doc = plan(smoke, {"backend": "heuristic", "bounds": [tight]}, "tight")
    trials = doc["provenance"]["trials"]
    assert trials[0]["out_of_reach"] and trials[0]["bounds"]["mlp"] == 0.05
    reasons = [f["reason"] for f in doc["provenance"]["fallbacks"]]
    assert any("relaxed to the config ceiling" in r for r in reasons)
    assert doc["agents"]["bounds_level"].startswith("the config ceiling")
    assert abs(doc["expected"]["achieved"] - 0.3) <= 0.005
    assert_in_bounds(doc)


def _scripted(decisions: dict[str, Any]):
    """A server callable answering each agent (recognised by its role prompt) with a decision."""

    def answer(body: dict, headers: dict) -> Step:
        system = body["messages"][0]["content"]
        for agent, decision in decisions.items():
            if f"the {agent} agent" in system:
                return Step(json.dumps(decision), usage=(100, 20))
        return Step("{}")

    return answer


SCRIPT = {
    "profiling": {"risks": ["heads are few"], "protect": ["mlp"]},
    "master": {
        "action": "continue",
        "strategy": {
            "importance": "magnitude_l1",
            "grouping": "uniform",
            "heads": 9.0,
            "allocation": {"attention": 1.0, "mlp": 1.0, "residual": 0.5},
            "round_to": 1,
            "calibration_batches": 99,
        },
        "rationale": "try uniform L1",
    },
    "fine-tuning": {"lr": 5.0, "steps": 999, "rationale": "aggressive"},
    "evaluation": {"acceptable": True, "assessment": "fine"},
}


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


def test_llm_decisions_drive_the_pruned_model_inside_the_bounds(smoke) -> None:
    server = FaultServer(default=_scripted(SCRIPT))
    try:
        doc = plan(smoke, _openai(server, None), "scripted")
    finally:
        server.close()
    (trial,) = doc["provenance"]["trials"]
    assert trial["strategy_source"] == "llm"
    assert doc["agents"]["protect"] == ["mlp"]
    pruner = doc["pruner"]
    assert (pruner["importance"], pruner["global_pruning"]) == ("magnitude_l1", False)
    clamped = {c["field"] for c in doc["provenance"]["clamps"]}
    assert {"strategy.calibration_batches", "lr", "steps"} <= clamped
    assert trial["recovery"]["lr"] == 0.01 and trial["recovery"]["steps"] == 50
    assert_in_bounds(doc)
    exchanges = doc["provenance"]["exchanges"]
    assert {e["agent"] for e in exchanges} == {"profiling", "master", "finetuning", "evaluation"}
    assert all(e["ok"] and e["completion_tokens"] == 20 for e in exchanges)
    assert doc["provenance"]["fallbacks"] == []
    # A different decision gives a different model than the heuristic's plan.
    heuristic = plan(smoke, {"backend": "heuristic", "max_iterations": 1}, "heuristic1")
    assert heuristic["pruner"] != pruner
    assert heuristic["expected"]["params"] != doc["expected"]["params"]


FAULTS = {
    "malformed_json": lambda: FaultServer(default=Step('{"action": "continue", "strat')),
    "schema_violation": lambda: FaultServer(
        default=Step(json.dumps({"action": "go", "lr": -1, "protect": ["everything"]}))
    ),
    "http_500": lambda: FaultServer(default=Step(status=500)),
    "http_429": lambda: FaultServer(default=Step(status=429)),
    "hang": lambda: FaultServer(default=Step("{}", delay=2.0)),
}


@pytest.mark.parametrize("fault", [*FAULTS, "connection_refused"])
def test_plan_completes_under_every_fault(smoke, fault: str) -> None:
    if fault == "connection_refused":
        server = FaultServer()
        server.close()  # the port is now closed
    else:
        server = FAULTS[fault]()
    try:
        doc = plan(
            smoke,
            _openai(server, None, timeout_s=0.3, max_retries=1, max_reasks=1),
            f"fault_{fault}",
        )
    finally:
        if fault != "connection_refused":
            server.close()
    provenance = doc["provenance"]
    assert provenance["trials"] and "val_top1" in provenance["trials"][0]
    assert provenance["fallbacks"], fault
    assert {f["agent"] for f in provenance["fallbacks"]} >= {"profiling", "master"}
    failed = [e for e in provenance["exchanges"] if not e["ok"]]
    assert failed and all(e["error"] for e in failed)
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
    assert calls == 4 and len(server.requests) == calls
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
    assert {e["agent"] for e in real} == {"profiling", "master", "finetuning", "evaluation"}
    assert all(e["completion_tokens"] > 0 and e["prompt_tokens"] > 0 for e in real)
    assert not [f for f in provenance["fallbacks"] if f["reason"].startswith("invalid")]
    assert steps.planning_cost(provenance)["llm_calls"] >= 4
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
                        "rationale": "r", "achieved": 0.3, "val_top1": 90.0, "val_loss": 0.3,
                        "recovery": {"lr": 0.001, "steps": 5}, "seconds": 1.0,
                        "assessment": {"acceptable": True, "assessment": "fine"}}],
        },
    }  # fmt: skip
    page = render_transcript(doc)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("<details") == 2
    assert "invalid reply after 1 re-ask" in page and "strategy.heads" in page
