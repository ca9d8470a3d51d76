"""Training, evaluation and data splits on small, fast inputs (sklearn digits at 32 px)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agentprune import data, evaluate, train
from agentprune.settings import EvaluateSettings
from conftest import data_settings, make_model, recipe
from torch import nn
from torch.utils.data import TensorDataset

DIGITS = data_settings(name="digits", img_size=32, val_fraction=0.15, test_fraction=0.25)
N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits() -> data.Splits:
    return data.load_splits(DIGITS)


def split_indices(splits: data.Splits) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(splits, k).indices) for k in ("train", "val", "test")}


def labels_of(splits: data.Splits) -> np.ndarray:
    return splits.test.dataset.tensors[1].numpy()


def small_classification_set(n: int = 96, features: int = 12, classes: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


# ---------------------------------------------------------------- data


def test_digits_splits_are_disjoint_and_complete(digits):
    idx = split_indices(digits)
    assert digits.num_classes == 10 and digits.img_size == 32
    sets = {k: set(v.tolist()) for k, v in idx.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(range(N_DIGITS))
    assert len(idx["test"]) == math.ceil(0.25 * N_DIGITS)
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10


def test_digits_splits_are_deterministic(digits):
    again = data.load_splits(DIGITS)
    for k, v in split_indices(digits).items():
        np.testing.assert_array_equal(split_indices(again)[k], v)
    other = data.load_splits(data_settings(split_seed=1))
    assert not np.array_equal(split_indices(other)["test"], split_indices(digits)["test"])


def test_digits_test_split_is_stratified(digits):
    labels = labels_of(digits)
    test_labels = labels[split_indices(digits)["test"]]
    for cls in range(10):
        expected = 0.25 * int((labels == cls).sum())
        assert abs(int((test_labels == cls).sum()) - expected) <= 1, cls


def test_calibration_batches_are_seeded(digits):
    a = data.calibration_batches(digits.val, 2, 8, seed=3)
    b = data.calibration_batches(digits.val, 2, 8, seed=3)
    assert [x.shape for x, _ in a] == [(8, 3, 32, 32)] * 2
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ---------------------------------------------------------------- training


def test_train_tiny_convnext_on_digits(digits):
    model = make_model("convnext")
    before = evaluate.accuracy(model, digits.test)
    cfg = recipe(epochs=3, lr=3e-3, batch_size=64, label_smoothing=0.0)
    report = train.train(model, digits.train, cfg, seed=0, progress=False)
    assert report["steps"] == 3 * math.ceil(len(digits.train) / 64)
    losses = report["epoch_loss"]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert report["final_loss"] == losses[-1]
    assert not model.training
    after = evaluate.accuracy(model, digits.test)
    assert after["top1"] > 20.0, (before, after)
    assert after["loss"] < before["loss"]


def test_masks_keep_weights_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    mask = (torch.rand(16, 12, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    train.apply_masks(model, {"0.weight": mask})
    start = model[0].weight.detach().clone()
    cfg = recipe(epochs=3, lr=1e-2, batch_size=16, weight_decay=0.1)
    train.train(
        model, small_classification_set(), cfg, seed=0, masks={"0.weight": mask}, progress=False
    )
    weight = model[0].weight.detach()
    assert torch.equal(weight[mask == 0], torch.zeros(int((mask == 0).sum())))
    kept = mask == 1
    assert (weight[kept] != 0).all()
    assert not torch.equal(weight[kept], start[kept]), "the unmasked weights did not train"


def test_training_is_seeded():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(12, 5)
        cfg = recipe(epochs=2, lr=1e-2, batch_size=16)
        train.train(model, small_classification_set(), cfg, seed=seed, progress=False)
        return model.weight.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_lr_schedule():
    cfg = recipe(lr=1.0, warmup_fraction=0.1, min_lr_fraction=0.01)
    assert train.lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert train.lr_at(100, 100, cfg) == pytest.approx(0.01)


# ---------------------------------------------------------------- evaluation


def test_accuracy_matches_manual_computation():
    dataset = small_classification_set(n=53, features=12, classes=8, seed=2)
    torch.manual_seed(3)
    model = nn.Linear(12, 8)
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    expected_top1 = 100.0 * (logits.argmax(1) == y).float().mean().item()
    expected_top5 = 100.0 * (top5 == y[:, None]).any(1).float().mean().item()
    expected_loss = F.cross_entropy(logits, y).item()

    for batch_size in (7, 256):  # uneven last batch, and one batch
        result = evaluate.accuracy(model, dataset, batch_size=batch_size)
        assert result["top1"] == pytest.approx(expected_top1)
        assert result["top5"] == pytest.approx(expected_top5)
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert 0 < expected_top1 < expected_top5 < 100


def test_accuracy_of_a_perfect_classifier():
    # Class c is the only input with a 1 in feature c: the identity map classifies perfectly.
    x = torch.eye(6).repeat(3, 1)
    y = torch.arange(6).repeat(3)
    model = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(10 * torch.eye(6))
    result = evaluate.accuracy(model, TensorDataset(x, y), batch_size=4)
    assert result["top1"] == 100.0 and result["top5"] == 100.0


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 10)  # 40 weights, 10 biases
        self.head = nn.Linear(10, 3)  # classifier: 30 weights, 3 biases

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def test_sparsity_counts_zeros():
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.fc.weight.view(-1)[:12] = 0  # 12 of 40 prunable weights
        net.head.weight.view(-1)[:5] = 0  # classifier: not prunable
        net.fc.bias[:2] = 0
    assert evaluate.prunable_weight_names(net) == ["fc.weight"]
    result = evaluate.sparsity(net)
    assert result["sparsity"] == pytest.approx(12 / 40)
    assert result["sparsity_overall"] == pytest.approx((12 + 5 + 2) / (40 + 10 + 30 + 3))
    explicit = evaluate.sparsity(net, ["fc.weight", "head.weight"])
    assert explicit["sparsity"] == pytest.approx((12 + 5) / 70)


def test_sparsity_of_a_dense_timm_model():
    result = evaluate.sparsity(make_model("vit"))
    assert result["sparsity"] == 0.0
    assert 0.0 <= result["sparsity_overall"] < 0.05  # zero-initialised biases only


def test_digits_arrays_equal_sklearn_load_digits():
    """The fast CSV reader returns exactly what sklearn.datasets.load_digits returns."""
    from sklearn.datasets import load_digits

    images, labels = data.digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_evaluate_model_reuses_known_size_and_checks_params():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    xs = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    test_set = TensorDataset(xs, torch.arange(8) % 10)
    cfg = EvaluateSettings(batch_size=4, latency_batch=1, throughput_batch=2, warmup=1, repeats=1)
    params = sum(p.numel() for p in model.parameters())
    out = evaluate.evaluate_model(model, test_set, 4, cfg, known_size=(12345, params))
    assert out["macs"] == 12345 and out["params"] == params
    with pytest.raises(ValueError, match="architecture changed"):
        evaluate.evaluate_model(model, test_set, 4, cfg, known_size=(12345, params + 1))
