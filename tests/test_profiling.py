"""Profiling: MACs breakdown, dependency/isomorphic groups, sensitivity kinds and safety bounds."""

from __future__ import annotations

import math

import pytest
from agentprune import profiling
from agentprune.pruning import structured
from agentprune.settings import ProfileSettings
from conftest import macs

CFG = ProfileSettings(
    sensitivity_ratios=[0.1, 0.5],
    calibration_batches=2,
    batch_size=64,
    max_loss_increase=0.5,
    bound_floor=0.05,
    bound_ceiling=0.9,
)


@pytest.fixture(scope="module")
def vit_profile(vit_factory, example_inputs, calib):
    return profiling.profile_model(vit_factory(), example_inputs, calib, CFG)


def test_breakdown_adds_up_to_total(vit_profile, vit_factory, example_inputs):
    total = macs(vit_factory(), example_inputs)
    assert vit_profile["macs"] == total
    assert sum(vit_profile["breakdown"].values()) == total
    assert all(isinstance(v, int) for v in vit_profile["breakdown"].values())


def test_vit_breakdown_kinds(vit_profile):
    breakdown = vit_profile["breakdown"]
    for kind in ("attention_qkv", "attention_proj", "mlp", "attention_matmul"):
        assert breakdown.get(kind, 0) > 0, kind
    # 2 blocks x 16 tokens x 64 -> 192 qkv; proj is a third of qkv; matmuls 2 x 17^2 x 64 per block.
    assert breakdown["attention_qkv"] == 3 * breakdown["attention_proj"]
    assert breakdown["attention_matmul"] == 2 * (2 * 17 * 17 * 64)
    assert breakdown["other"] >= 0


def test_convnext_breakdown_adds_up(convnext_factory, example_inputs):
    model = convnext_factory()
    breakdown = profiling.macs_breakdown(model, example_inputs)
    assert sum(breakdown.values()) == macs(model, example_inputs)
    assert breakdown["mlp"] > 0 and breakdown["conv_stages"] > 0
    assert "attention_matmul" not in breakdown


def test_groups(vit_profile):
    assert vit_profile["dependency_groups"] >= vit_profile["isomorphic_groups"] >= 1
    assert len(vit_profile["groups"]) == vit_profile["dependency_groups"]
    kinds = {g["kind"] for g in vit_profile["groups"]}
    assert {"attention", "mlp", "residual"} <= kinds
    assert all(g["channels"] > 0 for g in vit_profile["groups"])
    assert vit_profile["num_heads"] == [4, 4]


def test_sensitivity(vit_profile):
    sens = vit_profile["sensitivity"]
    assert sens["errors"] == []
    assert math.isfinite(sens["base_loss"])
    assert {"attention", "mlp", "residual", "heads"} <= set(sens["kinds"])
    for kind, info in sens["kinds"].items():
        assert info["ratios"] == CFG.sensitivity_ratios, kind
        assert len(info["loss"]) == len(info["loss_increase"]) == 2, kind
        for loss, increase in zip(info["loss"], info["loss_increase"]):
            assert math.isfinite(loss), kind
            assert increase == pytest.approx(loss - sens["base_loss"])


def test_safety_bounds_per_kind(vit_profile):
    bounds = vit_profile["safety_bounds"]["max_ratio"]
    assert set(bounds) == set(vit_profile["sensitivity"]["kinds"])
    assert all(CFG.bound_floor <= b <= CFG.bound_ceiling for b in bounds.values())
    assert "0.5" in vit_profile["safety_bounds"]["rule"]


def test_prune_kind_heads_removes_heads(vit_factory, example_inputs):
    pruned = profiling.prune_kind(vit_factory(), "heads", 0.5, [], example_inputs)
    for attn in structured.attention_modules(pruned):
        assert attn.num_heads == 2
        assert attn.head_dim == 16
        assert attn.qkv.out_features == 3 * 2 * 16


# safety_bound(ratios, deltas, max_increase, floor, ceiling)


def test_safety_bound_interpolates_first_crossing():
    bound = profiling.safety_bound([0.1, 0.3, 0.5], [0.1, 0.3, 0.9], 0.5, 0.0, 1.0)
    assert bound == pytest.approx(0.3 + 0.2 * (0.2 / 0.6))  # 0.3667


def test_safety_bound_interpolates_from_origin():
    # (0, 0) -> (0.4, 1.0): the loss increase reaches 0.25 at ratio 0.1.
    assert profiling.safety_bound([0.4], [1.0], 0.25, 0.0, 1.0) == pytest.approx(0.1)


def test_safety_bound_sorts_points():
    unsorted = profiling.safety_bound([0.5, 0.1, 0.3], [0.9, 0.1, 0.3], 0.5, 0.0, 1.0)
    assert unsorted == pytest.approx(0.3 + 0.2 * (0.2 / 0.6))


def test_safety_bound_floor():
    # Crossing at 0.1 * 0.5 / 2.0 = 0.025, clipped up to the floor.
    assert profiling.safety_bound([0.1, 0.5], [2.0, 3.0], 0.5, 0.05, 0.9) == pytest.approx(0.05)


def test_safety_bound_ceiling_when_never_exceeded():
    assert profiling.safety_bound([0.1, 0.5], [0.01, 0.2], 0.5, 0.05, 0.9) == pytest.approx(0.9)
    assert profiling.safety_bound([0.1, 0.5], [0.01, 0.2], 0.5, 0.05, 0.7) == pytest.approx(0.7)


def test_safety_bound_ceiling_clips_interpolation():
    # Crossing at 0.5 + 0.5 * (0.5 - 0.1) / (1.0 - 0.1) = 0.7222, above a 0.6 ceiling.
    assert profiling.safety_bound([0.5, 1.0], [0.1, 1.0], 0.5, 0.05, 0.6) == pytest.approx(0.6)


def test_safety_bound_failed_measurement():
    # A kind whose pruning failed records inf: the bound stops before it.
    bound = profiling.safety_bound([0.1, 0.5], [0.1, float("inf")], 0.5, 0.0, 1.0)
    assert bound == pytest.approx(0.1)


def test_safety_bound_non_monotone_stops_at_first_crossing():
    # Noisy losses: 0.1 already exceeds the limit; a lower increase at 0.5 must not lift the bound.
    bound = profiling.safety_bound([0.1, 0.5], [0.6, 0.4], 0.5, 0.0, 0.9)
    assert bound == pytest.approx(0.1 * 0.5 / 0.6)
