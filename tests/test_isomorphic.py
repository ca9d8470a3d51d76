"""The ``isomorphic`` baseline as published (Isomorphic-Pruning prune.py, scripts/pruning/*.sh).

Unit checks of the recipe (published rows -> pruner settings, with sources), of the search pieces it
relies on (the GMACs window, the search started at the recipe's ratio, the head and head-dim ratios
handed to Torch-Pruning, block removal, the top-up's importance), then the published DeiT-T and
DeiT-S rows on random-init timm models at 224 px in both modes: params within 1 % of the published
params and MACs within 0.5 % of the published GMACs. DeiT-B and ConvNeXt-B (a minute or more each on
2 CPU cores) are in benchmarks/bench_isomorphic.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from agentprune import data, models, resolve
from agentprune.config import defaults
from agentprune.pruning import catalog, methods, structured
from agentprune.pruning.methods import RecipeSettings
from agentprune.pruning.registry import PlanContext
from agentprune.pruning.settings import PrunerSettings, PruningError
from agentprune.settings import ConfigError
from conftest import IMG_SIZE, NUM_CLASSES, make_model, method_settings, plan_context
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text(encoding="utf-8"))
ROWS = PAPER["method_settings"]["isomorphic"]["published"]
REFERENCES = {(r["model"], r["macs_g"]): r for r in PAPER["paper"]["references"]}
# architecture (timm name without its pretrained tag) -> the paper's model name
MODEL_OF = {methods.architecture(m["timm"]): m["name"] for m in PAPER["models"]}
# The MACs search of prune_to_target as the plan step sets it: the schema's `prune` defaults.
PRUNE = defaults("prune")
SEARCH = {
    "tolerance": PRUNE["tolerance"],
    "max_steps": PRUNE["max_search_steps"],
    "gmacs_tolerance": PRUNE["gmacs_tolerance"],
}


def _row(timm_name: str, gmacs: float) -> dict[str, Any]:
    return next(r for r in ROWS if r["timm"] == timm_name and r["target_gmacs"] == gmacs)


def _context(timm_name: str, gmacs: float | None) -> PlanContext:
    """A plan context for one model of the given timm name, with its GMACs target."""
    return plan_context(timm=timm_name, target_gmacs=gmacs)


def _settings(overrides: dict[str, Any] | None = None) -> RecipeSettings:
    """The isomorphic recipe's typed settings with ``method_settings.isomorphic`` overrides."""
    return method_settings("isomorphic", overrides)


# --------------------------------------------------------------------------- published rows


def test_deit_tiny_row_becomes_the_script_ratios_in_proportion():
    settings, sources = methods.published_settings(_row("deit_tiny_distilled_patch16_224", 0.62))
    assert settings["pruning_ratio"] == 0.25
    assert settings["head_ratio_scale"] == pytest.approx(1.2)  # --head-pruning-ratio 0.3
    assert settings["head_dim_ratio_scale"] == pytest.approx(1.2)  # --head-dim-pruning-ratio 0.3
    assert settings["prune_num_heads"] is True
    assert settings["round_to"] == 2  # prune.py's --round-to default, not in the script
    assert settings["remove_blocks"] == {}
    assert sources["pruning_ratio"] == "scripts/pruning/deit_0.6G.sh --pruning-ratio 0.25"
    assert sources["round_to"] == "prune.py default of --round-to"
    # At the published knob the rebuilt ratios are the published ones, to the bit.
    assert structured.scaled(0.25, settings["head_ratio_scale"]) == 0.3
    assert int(64 * (1 - structured.scaled(0.25, settings["head_dim_ratio_scale"]))) == 44


def test_convnext_rows_round_to_2_and_remove_18_blocks_of_stages_minus_2():
    small, _ = methods.published_settings(_row("convnext_base", 8.48))
    assert (small["pruning_ratio"], small["round_to"], small["remove_blocks"]) == (0.26, 2, {})
    assert small["prune_num_heads"] is False and small["head_dim_ratio_scale"] is None
    tiny, sources = methods.published_settings(_row("convnext_base", 4.19))
    assert tiny["remove_blocks"] == {"stages.-2.blocks": 18}
    assert sources["remove_layers"] == "scripts/pruning/convnext_4.2G.sh --remove-layers 18"


def test_every_reference_row_has_its_published_recipe():
    """The six Isomorphic-Pruning rows of paper.references and the six recipes pair up."""
    pairs = {(MODEL_OF[methods.architecture(r["timm"])], r["target_gmacs"]) for r in ROWS}
    assert pairs == set(REFERENCES)
    for row in ROWS:
        PrunerSettings.from_dict(
            {**methods.Isomorphic.recipe, **methods.published_settings(row)[0]}
        )


def test_rows_match_by_architecture_and_target():
    assert methods.published_row(ROWS, "convnext_base.fb_in1k", 8.48)["script"].endswith("8.5G.sh")
    assert methods.published_row(ROWS, "convnext_base", 8.5) is None
    assert methods.published_row(ROWS, "deit_tiny_patch16_224", 0.62) is None  # not distilled
    assert methods.published_row(ROWS, "convnext_base", None) is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"timm": "x", "target_gmacs": 1, "script": "s", "pruning_ratio": 0.5, "ratio": 1},
            "'ratio'",
        ),
        ({"timm": "x", "target_gmacs": 1, "script": "s"}, "lacks 'pruning_ratio'"),
        (
            {"timm": "x", "target_gmacs": 1, "script": "s", "pruning_ratio": 1.5},
            "not in \\(0, 1\\)",
        ),
    ],
)
def test_bad_rows_are_one_line(row, message):
    with pytest.raises(PruningError, match=message) as info:
        methods.published_row([row], "x", 1.0)
    assert "published[0]" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- plans


def test_plan_carries_the_row_its_sources_and_the_gmacs_target():
    timm_name = "deit_small_distilled_patch16_224"
    plan = catalog.get("isomorphic").plan(
        0.739, {}, _settings({"published": ROWS, "mode": "as_published"}), _context(timm_name, 1.21)
    )
    assert plan["target"] == {"metric": "macs_fraction_removed", "value": 0.739, "gmacs": 1.21}
    assert plan["search"]["mode"] == "as_published"
    pruner = plan["pruner"]
    assert (pruner["pruning_ratio"], pruner["head_ratio_scale"]) == (0.5, 1.0)
    assert pruner["head_dim_ratio_scale"] == pytest.approx(0.2)  # 0.1 / 0.5
    assert (pruner["importance"], pruner["isomorphic"], pruner["global_pruning"]) == (
        "taylor",
        True,
        True,
    )
    assert pruner["attention_scale"] == "recompute" and pruner["round_to"] == 2
    recipe = plan["provenance"]["recipe"]
    assert recipe["published_row"] == _row(timm_name, 1.21)
    assert recipe["sources"]["head_dim_pruning_ratio"].endswith("--head-dim-pruning-ratio 0.1")
    assert "--pruning-type taylor" in recipe["sources"]["importance"]


def test_plan_without_a_row_uses_the_deit_b_proportions():
    plan = catalog.get("isomorphic").plan(0.3, {}, _settings({"published": ROWS}), plan_context())
    pruner = plan["pruner"]
    assert (pruner["head_ratio_scale"], pruner["head_dim_ratio_scale"]) == (1.0, 0.5)
    assert pruner["pruning_ratio"] is None and plan["search"]["mode"] == "macs_targeted"
    assert plan["provenance"]["recipe"]["published_row"] is None


@pytest.mark.parametrize(
    ("gmacs", "message"),
    [(None, "for a ratio target"), (0.7, "deit_tiny_distilled_patch16_224 at 0.7 GMACs")],
)
def test_as_published_needs_a_row(gmacs, message):
    ctx = _context("deit_tiny_distilled_patch16_224", gmacs)
    settings = _settings({"published": ROWS, "mode": "as_published"})
    with pytest.raises(PruningError, match=message):
        catalog.get("isomorphic").plan(0.5, {}, settings, ctx)


def test_unknown_mode_is_named():
    """An unknown mode fails when the settings are resolved (the config check), not at plan."""
    with pytest.raises(ConfigError, match="'fast' is not one of") as info:
        _settings({"mode": "fast"})
    assert "'method_settings.isomorphic.mode'" in str(info.value)
    assert "\n" not in str(info.value)


def test_gmacs_target_is_recovered_from_the_ratio_wildcard():
    config = {
        "models": [
            {"name": "m", "targets_gmacs": [4.16, 2.61], "base_gmacs": 17.6791},
            {"name": "ratios", "targets_gmacs": [], "base_gmacs": None},
        ]
    }
    assert resolve.target_gmacs(config, "m", 0.7647) == 4.16
    assert resolve.target_gmacs(config, "m", 0.8524) == 2.61
    assert resolve.target_gmacs(config, "m", 0.5) is None
    assert resolve.target_gmacs(config, "ratios", 0.3) is None


# --------------------------------------------------------------------------- search pieces


def test_gmacs_window_ignores_the_fractional_tolerance():
    window = structured.Window.of(0.5, 0.2, 1_000_000_000, 0.4, 0.005)
    assert window.target == pytest.approx(0.6) and window.target_macs == 400_000_000
    assert window.tolerance == pytest.approx(0.002)  # 0.5 % of 0.4 G, of 1 G base
    assert window.report(1_000_000_000)["macs_window"] == [398_000_000, 402_000_000]
    with pytest.raises(PruningError, match="1.2 GMACs is not below the base model's 1.0000"):
        structured.Window.of(0.5, 0.2, 1_000_000_000, 1.2, 0.005)


def test_search_from_a_start_that_overshoots_scans_down():
    tried: list[float] = []

    def trial(ratio):
        tried.append(ratio)
        return f"m{ratio}", ratio**2  # reduction grows like the square of the ratio

    found = structured.search_ratio(trial, 0.2025, 0.0005, 0.02, 0.9, 1e-6, 30, start=0.5)
    assert tried[:2] == [0.5, 0.48] and abs(found.reduction - 0.2025) <= 0.0005
    assert found.ratio == pytest.approx(math.sqrt(found.reduction))
    assert all(0.44 <= r <= 0.5 for r in tried[2:])  # bracketed below 0.46, never from 0


def test_search_from_a_start_that_lands_tries_nothing_else():
    tried: list[float] = []

    def trial(ratio):
        tried.append(ratio)
        return "m", 0.3

    found = structured.search_ratio(trial, 0.301, 0.002, 0.1, 0.9, 1e-4, 30, start=0.25)
    assert tried == [0.25] and found.ratio == 0.25


def test_one_head_dim_scope_over_every_qkv(vit_factory):
    model = vit_factory()
    settings = PrunerSettings(head_dim_ratio_scale=0.5)
    entry = structured.head_dim_ratio_dict(model, settings, 0.3)
    assert list(entry.values()) == [0.15]
    assert list(entry) == [tuple(a.qkv for a in structured.attention_modules(model))]
    clash = PrunerSettings(head_dim_ratio_scale=0.5, scope_ratios={"*attn.qkv": 1.0})
    with pytest.raises(PruningError, match="keep one"):
        structured.head_dim_ratio_dict(model, clash, 0.3)


def test_head_ratio_is_scaled_clamped_and_zero_without_heads(vit_factory):
    model = vit_factory()  # 2 layers x 4 heads
    settings = PrunerSettings(prune_num_heads=True, head_ratio_scale=1.2, max_head_ratio=0.9)
    assert structured.head_pruning_ratio(model, settings, 0.25) == 0.3
    assert structured.head_pruning_ratio(model, settings, 0.8) == 0.9
    # Torch-Pruning removes 8 - int(8 x (1 - r)) heads: a ratio a float hair above 0 removes
    # none, and its pruner would then have no head threshold.
    assert structured.head_pruning_ratio(model, settings, 1e-18) == 0.0
    assert structured.head_pruning_ratio(model, PrunerSettings(head_ratio_scale=1.0), 0.5) == 0.0


def test_published_scale_follows_the_pruned_head_dim(example_inputs, calib):
    settings = PrunerSettings.from_dict(
        {**methods.Isomorphic.recipe, "pruning_ratio": 0.5, "calibration_batches": 2}
    )
    model, report = structured.prune_to_target(
        make_model("vit"), settings, 0.4, example_inputs, calib, 0, mode="as_published", **SEARCH
    )
    assert report["trials"] == [{"stage": "global", "ratio": 0.5, "achieved": report["achieved"]}]
    assert report["search"]["ratio"] == 0.5 and report["search"]["topup"] is None
    attns = structured.attention_modules(model)
    assert sum(a.head_dim for a in attns) < 2 * 16  # a quarter of the head dims ranked together
    for attn in attns:
        assert attn.head_dim % 2 == 0  # round_to 2
        assert attn.scale == attn.head_dim**-0.5


def test_gmacs_target_lands_within_half_a_percent_whatever_the_tolerance(example_inputs, calib):
    base = make_model("vit")
    base_macs = structured.count_macs(base, example_inputs)[0]
    gmacs = 0.6 * base_macs / 1e9
    settings = PrunerSettings.from_dict({**catalog.get("taylor").recipe, "calibration_batches": 2})
    # A 0.2 fractional tolerance would accept anything from 0.2 to 0.6 of the MACs removed.
    search = {**SEARCH, "tolerance": 0.2}
    model, report = structured.prune_to_target(
        base, settings, 0.4, example_inputs, calib, 0, target_gmacs=gmacs, **search
    )
    macs = structured.count_macs(model, example_inputs)[0]
    assert abs(macs - gmacs * 1e9) <= 0.005 * gmacs * 1e9
    assert report["search"]["target_macs"] == int(gmacs * 1e9)
    assert report["within_tolerance"] is True


def test_topup_ranks_with_the_methods_own_importance(monkeypatch, example_inputs, calib):
    """The tiny ViT at 0.3 jumps over the window on whole heads and needs the top-up; it must ask
    for Taylor scores (the old top-up switched to L2 magnitude) and say so in the report."""
    asked: list[str] = []
    real = structured._base_importance
    monkeypatch.setattr(structured, "_base_importance", lambda n: asked.append(n) or real(n))
    plan = catalog.get("isomorphic").plan(0.3, {}, _settings(), plan_context())
    _, report = catalog.get("isomorphic").prune(make_model("vit"), plan, example_inputs, calib, 0)
    topup = report["search"]["topup"]
    assert topup is not None and set(asked) == {"taylor"} and len(asked) == 2
    settings = PrunerSettings.from_dict(plan["pruner"])
    assert {k: v for k, v in topup.items() if k != "ratio"} == structured.topup_ranking(settings)
    assert topup["importance"] == "taylor" and topup["isomorphic"] is True
    chosen = [t for t in report["trials"] if t["stage"] == "topup" and t["ratio"] == topup["ratio"]]
    assert chosen and chosen[0]["achieved"] == pytest.approx(report["achieved"], abs=1e-12)


# --------------------------------------------------------------------------- block removal


def _convnext_with_grads() -> nn.Module:
    model = make_model("convnext")  # depths (1, 1, 2, 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    # Block 0 of stage 2 scores 0 (zero gradients): it is the one that goes.
    for p in model.stages[2].blocks[0].parameters():
        p.grad.zero_()
    return model


def test_remove_blocks_drops_the_lowest_scored_block_of_stages_minus_2():
    model = _convnext_with_grads()
    kept = model.stages[2].blocks[1]
    structured.remove_blocks(model, {"stages.-2.blocks": 1})
    assert len(model.stages[2].blocks) == 1 and model.stages[2].blocks[0] is kept
    assert structured.depth_overrides(model, ["stages.-2.blocks"]) == {"depths": [1, 1, 1, 1]}
    with pytest.raises(PruningError, match="has 1 blocks; cannot remove 1"):
        structured.remove_blocks(model, {"stages.2.blocks": 1})


def test_block_score_is_the_mean_over_parameters_of_mean_abs_weight_times_grad():
    block = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(torch.tensor([[1.0, -3.0]]))
        block[1].weight.copy_(torch.tensor([[2.0]]))
    block[0].weight.grad = torch.tensor([[0.5, 1.0]])  # |w g| = 0.5, 3 -> mean 1.75
    block[1].weight.grad = torch.tensor([[0.25]])  # 0.5
    assert structured.block_importance(block) == pytest.approx((1.75 + 0.5) / 2)


def test_removal_needs_taylor_and_a_known_block_path():
    with pytest.raises(PruningError, match="needs importance 'taylor'"):
        PrunerSettings.from_dict({"importance": "magnitude_l2", "remove_blocks": {"blocks": 1}})
    with pytest.raises(PruningError, match="neither 'blocks'"):
        PrunerSettings.from_dict({"importance": "taylor", "remove_blocks": {"layers": 1}})


def test_pruned_convnext_without_blocks_saves_and_loads(tmp_path, example_inputs, calib):
    settings = PrunerSettings.from_dict(
        {
            **methods.Isomorphic.recipe,
            "pruning_ratio": 0.25,
            "remove_blocks": {"stages.-2.blocks": 1},
            "calibration_batches": 2,
        }
    )
    model, report = structured.prune_to_target(
        make_model("convnext"),
        settings,
        0.5,
        example_inputs,
        calib,
        0,
        mode="as_published",
        **SEARCH,
    )
    assert report["overrides"] == {"depths": [1, 1, 1, 1]}
    name, overrides = "convnext_atto", {"dims": (24, 48, 96, 192), "depths": (1, 1, 2, 1)}
    # The prune step saves the pruned model with the report's overrides on top of the base's.
    models.save(model, tmp_path / "pruned", name, NUM_CLASSES, {**overrides, **report["overrides"]})
    loaded, _ = models.load(tmp_path / "pruned")
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# --------------------------------------------------------------------------- published DeiT rows


@pytest.fixture(scope="module")
def deit_runs():
    """``run(timm_name, gmacs, mode)``: plan + prune of a random-init model, memoised."""
    cache: dict[tuple, tuple[dict, dict]] = {}
    gen = torch.Generator().manual_seed(0)
    calib = [
        (torch.randn(4, 3, 224, 224, generator=gen), torch.randint(0, 1000, (4,), generator=gen))
    ]

    def run(timm_name: str, gmacs: float, mode: str) -> tuple[dict, dict, nn.Module]:
        key = (timm_name, gmacs, mode)
        if key not in cache:
            torch.manual_seed(0)
            base = models.create(timm_name, 1000, {})
            strategy = catalog.get("isomorphic")
            ctx = _context(timm_name, gmacs)
            plan = strategy.plan(0.5, {}, _settings({"published": ROWS, "mode": mode}), ctx)
            model, report = strategy.prune(base, plan, data.example_inputs(224), calib, 0)
            cache[key] = (plan, report, model)
        return cache[key]

    return run


DEIT_ROWS = [("deit_tiny_distilled_patch16_224", 0.62), ("deit_small_distilled_patch16_224", 1.21)]


@pytest.mark.parametrize("mode", ["as_published", "macs_targeted"])
@pytest.mark.parametrize(
    ("timm_name", "gmacs"), DEIT_ROWS, ids=["deit_tiny-0.62G", "deit_small-1.21G"]
)
def test_published_deit_rows_reproduce_macs_and_params(deit_runs, timm_name, gmacs, mode):
    _, report, _ = deit_runs(timm_name, gmacs, mode)
    published = REFERENCES[(MODEL_OF[timm_name], gmacs)]
    assert report["params"] / 1e6 == pytest.approx(published["params_m"], rel=0.01)
    assert report["macs"] / 1e9 == pytest.approx(gmacs, rel=0.005)
    assert report["search"]["mode"] == mode and report["within_tolerance"] is True


def test_as_published_deit_tiny_has_the_script_structure(deit_runs):
    _, report, model = deit_runs("deit_tiny_distilled_patch16_224", 0.62, "as_published")
    assert report["search"]["ratio"] == 0.25 and len(report["trials"]) == 1
    attns = structured.attention_modules(model)
    assert model.patch_embed.proj.out_channels == 144  # 192 x (1 - 0.25)
    assert sum(a.num_heads for a in attns) == 25  # 36 - (36 - int(36 x 0.7)) heads
    # 768 head dims ranked together, 537 kept, each layer then rounded down to an even count.
    head_dims = [a.head_dim for a in attns]
    assert all(d % 2 == 0 for d in head_dims) and 537 - 12 <= sum(head_dims) <= 537
    assert all(a.scale == a.head_dim**-0.5 for a in attns)
    hidden = sum(b.mlp.fc1.out_features for b in model.blocks)
    assert 6912 - 12 <= hidden <= 6912  # 9216 x 0.75, even per layer
