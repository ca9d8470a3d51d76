"""The iCBS pruner on a trained digits ViT: exact per-layer density, a lower calibration loss than
its own magnitude initialisation, and the method through the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from agentprune import data, evaluate, train
from agentprune.pruning import methods, unstructured
from agentprune.pruning.icbs import pruner
from agentprune.pruning.icbs.settings import ICBSConfig
from conftest import make_model, plan_context

DIGITS = {"name": "digits", "img_size": 32, "val_fraction": 0.15, "test_fraction": 0.25}


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT trained for a few epochs on digits, and calibration batches."""
    splits = data.load_splits({**DIGITS, "split_seed": 0})
    model = make_model("vit")
    cfg = train.TrainConfig(epochs=4, lr=3e-3, batch_size=64)
    train.train(model, splits.train, cfg, seed=0, progress=False)
    batches = data.calibration_batches(splits.train, 4, 64, seed=0)
    return model.eval(), batches


def test_icbs_beats_its_magnitude_initialisation_at_exact_density(trained) -> None:
    base, batches = trained
    model = copy.deepcopy(base)
    cfg = ICBSConfig(block_size=32, steps=6, restarts=2, beta_factor=1.3, calibration_batches=4)
    report = pruner.icbs_prune(model, 0.7, batches, cfg, seed=0)
    layers = unstructured.prunable_layers(model)
    for name, module in layers.items():
        zeros = int((module.weight == 0).sum())
        assert zeros == round(0.7 * module.weight.numel()), name
    # The initial mask is plain magnitude pruning at the same density.
    reference = copy.deepcopy(base)
    magnitude = unstructured.masks_from_scores(
        unstructured.magnitude_scores(unstructured.prunable_layers(reference)), 0.7, False
    )
    unstructured.apply_masks(reference, magnitude)
    assert report["calibration_loss_init"] == pytest.approx(
        pruner.calibration_loss(reference, batches), rel=1e-6
    )
    assert report["blocks_improved"] > 0
    assert report["calibration_loss"] < report["calibration_loss_init"]


def test_icbs_through_the_registry_is_deterministic(trained, example_inputs) -> None:
    base, batches = trained
    strategy = methods.get("icbs")
    context = plan_context()
    context["config"]["icbs"] = {"block_size": 16, "steps": 2, "restarts": 2, "beta_factor": 1.5}
    plan = strategy.plan(0.5, {}, {}, context)
    assert plan["family"] == "unstructured" and plan["pruner"]["block_size"] == 16
    one, report = strategy.prune(base, plan, example_inputs, batches, 0, {})
    two, _ = strategy.prune(base, plan, example_inputs, batches, 0, {})
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(a, b), n
    assert report["achieved"] == pytest.approx(evaluate.sparsity(one)["sparsity"])
    assert abs(report["achieved"] - 0.5) < 1e-3
    masks = strategy.masks(one)
    assert all(bool((m == 0).any()) for m in masks.values())


def test_bad_icbs_settings_are_named() -> None:
    with pytest.raises(ValueError, match="icbs.hessian='diag'"):
        ICBSConfig.from_dict({"hessian": "diag"})
    with pytest.raises(ValueError, match="unknown keys"):
        ICBSConfig.from_dict({"blocksize": 3})
