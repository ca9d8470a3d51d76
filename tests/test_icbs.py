"""The iCBS pruner on a trained digits ViT: exact per-layer density, a lower calibration loss than
its own magnitude initialisation under both schedules, the pass and block counts each schedule
promises, and the method through the registry."""

from __future__ import annotations

import copy

import numba
import pytest
import torch
from agentprune import data, evaluate, train
from agentprune.config import defaults
from agentprune.pruning import catalog, unstructured
from agentprune.pruning.icbs import pruner
from agentprune.pruning.icbs.settings import ICBSConfig
from conftest import data_settings, icbs_settings, make_model, plan_context, recipe

DIGITS = data_settings(name="digits", img_size=32, val_fraction=0.15, test_fraction=0.25)


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT trained for a few epochs on digits, and calibration batches."""
    splits = data.load_splits(DIGITS)
    model = make_model("vit")
    cfg = recipe(epochs=4, lr=3e-3, batch_size=64)
    train.train(model, splits.train, cfg, seed=0, progress=False)
    batches = data.calibration_batches(splits.train, 4, 64, seed=0)
    return model.eval(), batches


def test_icbs_beats_its_magnitude_initialisation_at_exact_density(trained) -> None:
    base, batches = trained
    model = copy.deepcopy(base)
    cfg = icbs_settings(block_size=32, steps=6, restarts=2, beta_factor=1.3, calibration_batches=4)
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
    strategy = catalog.get("icbs")
    section = {**defaults("icbs"), "block_size": 16, "steps": 2, "restarts": 2, "beta_factor": 1.5}
    settings = strategy.resolve_settings({"icbs": section}, {"blocks_per_step": 2})
    context = plan_context()
    plan = strategy.plan(0.5, {}, settings, context)
    assert plan["family"] == "unstructured" and plan["pruner"]["block_size"] == 16
    assert plan["pruner"]["blocks_per_step"] == 2 and plan["pruner"]["schedule"] == "layers"
    one, report = strategy.prune(base, plan, example_inputs, batches, 0)
    two, _ = strategy.prune(base, plan, example_inputs, batches, 0)
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(a, b), n
    assert report["achieved"] == pytest.approx(evaluate.sparsity(one)["sparsity"])
    assert abs(report["achieved"] - 0.5) < 1e-3
    masks = strategy.masks(one)
    assert all(bool((m == 0).any()) for m in masks.values())


def _zeros_per_layer(model) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in unstructured.prunable_layers(model).items()}


@pytest.mark.parametrize("schedule", ["layers", "rounds"])
def test_both_schedules_keep_exact_density_and_count_their_passes(trained, schedule) -> None:
    base, batches = trained
    model = copy.deepcopy(base)
    cfg = icbs_settings(
        block_size=16,
        steps=3,
        blocks_per_step=2,
        batches_per_step=2,
        restarts=2,
        beta_factor=1.5,
        schedule=schedule,
    )
    report = pruner.icbs_prune(model, 0.6, batches, cfg, seed=1)
    layers = unstructured.prunable_layers(model)
    for name, zeros in _zeros_per_layer(model).items():
        assert zeros == round(0.6 * layers[name].weight.numel()), name
    numels = [m.weight.numel() for m in layers.values()]
    owed = [pruner.layer_steps(n, max(numels), 3) for n in numels]
    # layers: a pass per step of every layer; rounds: one pass per round, shared.
    assert report["passes"] == (sum(owed) if schedule == "layers" else max(owed))
    assert report["blocks"] == 2 * sum(owed)  # every block here has pruned and kept weights
    assert 0 < report["blocks_improved"] <= report["blocks"]
    assert report["calibration_loss"] < report["calibration_loss_init"]


def test_zero_steps_leave_the_initial_mask_and_the_solver_threads(trained) -> None:
    base, batches = trained
    model = copy.deepcopy(base)
    threads = numba.get_num_threads()
    report = pruner.icbs_prune(model, 0.5, batches, icbs_settings(steps=0), seed=0)
    assert report["blocks"] == report["passes"] == 0
    assert report["calibration_loss"] == report["calibration_loss_init"]
    assert numba.get_num_threads() == threads


def test_more_blocks_per_step_reuse_the_pass_and_lower_the_loss_further(trained) -> None:
    base, batches = trained
    losses = []
    for blocks in (1, 3):
        model = copy.deepcopy(base)
        cfg = icbs_settings(block_size=32, steps=4, blocks_per_step=blocks, beta_factor=1.3)
        report = pruner.icbs_prune(model, 0.8, batches, cfg, seed=0)
        losses.append(report["calibration_loss"])
        assert report["passes"] == report["blocks"] // blocks
    assert losses[1] < losses[0]


def test_step_batches_join_consecutive_batches_cyclically() -> None:
    batches = [(torch.full((2, 1), float(i)), torch.full((2,), i)) for i in range(3)]
    assert pruner.step_batches(batches, 1) == batches
    # k = 2 of 3 batches: steps join (0, 1), (2, 0), (1, 2), then the cycle repeats.
    joined = pruner.step_batches(batches, 2)
    assert [y.tolist() for _, y in joined] == [[0, 0, 1, 1], [2, 2, 0, 0], [1, 1, 2, 2]]
    assert [x.flatten().tolist() for x, _ in joined][1] == [2.0, 2.0, 0.0, 0.0]
    (everything,) = pruner.step_batches(batches, 5)  # at most all of them
    assert everything[1].tolist() == [0, 0, 1, 1, 2, 2]


def test_bad_icbs_settings_are_named() -> None:
    with pytest.raises(ValueError, match="icbs.hessian='diag'"):
        ICBSConfig.from_dict({**defaults("icbs"), "hessian": "diag"})
    with pytest.raises(ValueError, match="unknown keys"):
        ICBSConfig.from_dict({**defaults("icbs"), "blocksize": 3})
    with pytest.raises(ValueError, match="icbs.schedule='global'"):
        ICBSConfig.from_dict({**defaults("icbs"), "schedule": "global"})
    with pytest.raises(ValueError, match="icbs.blocks_per_step must be an integer >= 1"):
        ICBSConfig.from_dict({**defaults("icbs"), "blocks_per_step": 0})
    with pytest.raises(ValueError, match="icbs.batches_per_step must be an integer >= 1"):
        ICBSConfig.from_dict({**defaults("icbs"), "batches_per_step": 1.5})
