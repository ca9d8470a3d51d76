"""Unstructured baselines: exact densities, Wanda's scores, masks through fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from agentprune import evaluate, train
from agentprune.pruning import catalog, unstructured
from conftest import ARCHS, make_model, method_settings, plan_context, recipe
from torch import nn
from torch.utils.data import TensorDataset


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_every_layer_hits_the_density_exactly(arch, method, sparsity, example_inputs, calib):
    base = make_model(arch)
    strategy = catalog.get(method)
    plan = strategy.plan(sparsity, {}, method_settings(method), plan_context())
    assert plan["family"] == "unstructured" and plan["target"]["value"] == sparsity
    model, report = strategy.prune(base, plan, example_inputs, calib, 0)
    layers = unstructured.prunable_layers(model)
    for name, module in layers.items():
        zeros = int((module.weight == 0).sum())
        assert zeros == round(sparsity * module.weight.numel()), name
        assert module.weight.shape == dict(base.named_modules())[name].weight.shape
    assert report["achieved"] == pytest.approx(evaluate.sparsity(model)["sparsity"])
    assert abs(report["achieved"] - sparsity) < 1e-3
    # The classifier is never pruned.
    head = model.get_classifier()
    assert int((head.weight == 0).sum()) == 0


def test_wanda_scores_are_weight_times_input_norm_per_row() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 6), torch.zeros(5, dtype=torch.long)) for _ in range(2)]
    layers = {"0": model[0]}
    scores = unstructured.wanda_scores(model, layers, batches)["0"]
    x = torch.cat([b[0] for b in batches])
    expected = model[0].weight.abs() * x.norm(dim=0)[None, :]
    torch.testing.assert_close(scores, expected)
    mask = unstructured.mask_from_scores(scores, 0.5, per_row=True)
    assert (mask.sum(dim=1) == 3).all()  # every row keeps half of its 6 inputs
    kept = torch.where(mask.bool(), scores, torch.full_like(scores, float("inf")))
    dropped = torch.where(mask.bool(), torch.full_like(scores, -float("inf")), scores)
    assert (dropped.max(dim=1).values <= kept.min(dim=1).values).all()


def test_wanda_conv_norms_follow_unfolded_patches_and_groups() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # two outputs per input channel
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 5, 5)
    norms = unstructured.input_norms(model, {"0": conv}, [(x, torch.zeros(2))])["0"]
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # (2, 4*9, 25)
    per_feature = cols.pow(2).sum(dim=(0, 2)).sqrt().view(4, 1, 3, 3)
    torch.testing.assert_close(norms, per_feature.repeat_interleave(2, dim=0))


def test_per_row_masks_spread_the_remainder_and_stay_exact() -> None:
    score = torch.rand(7, 5, generator=torch.Generator().manual_seed(3))
    mask = unstructured.mask_from_scores(score, 0.3, per_row=True)  # round(10.5) = 10 of 35
    assert int((mask == 0).sum()) == 10
    assert set((mask == 0).sum(dim=1).tolist()) <= {1, 2}


def test_masks_survive_fine_tuning(example_inputs, calib) -> None:
    base = make_model("vit")
    strategy = catalog.get("magnitude")
    plan = strategy.plan(0.7, {}, method_settings("magnitude"), plan_context())
    model, _ = strategy.prune(base, plan, example_inputs, calib, 0)
    masks = strategy.masks(model)
    before = {n: (p == 0).clone() for n, p in model.named_parameters() if n in masks}
    xs = torch.cat([x for x, _ in calib])
    ys = torch.cat([y for _, y in calib])
    cfg = recipe(epochs=2, lr=1e-2, batch_size=4)
    trained = copy.deepcopy(model)
    train.train(trained, TensorDataset(xs, ys), cfg, seed=0, masks=masks, progress=False)
    params = dict(trained.named_parameters())
    for name, zero in before.items():
        assert bool((params[name][zero] == 0).all()), name
    changed = any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in params.items())
    assert changed  # the unmasked weights did train
