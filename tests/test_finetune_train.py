"""Head training pieces: the split, class weights, AdamW and the plateau schedule against torch's own."""

from __future__ import annotations

import numpy as np
import pytest

from porter.errors import DataError
from porter.transfer.heads import folded_layers, make_head, standardization
from porter.transfer.train import AdamW, Plateau, TrainConfig, class_weights, stratified_split, train_head


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 10)
    tr, va = stratified_split(labels, ["a", "b", "c"], 0.2, seed=3)
    assert np.bincount(labels[va]).tolist() == [10, 4, 2]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(80))
    tr2, va2 = stratified_split(labels, ["a", "b", "c"], 0.2, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(labels, ["a", "b", "c"], 0.2, seed=4)[1])


def test_split_keeps_one_example_per_class_on_each_side():
    tr, va = stratified_split(np.array([0, 0, 1, 1, 1]), ["a", "b"], 0.01, seed=0)
    assert len(va) == 2 and len(tr) == 3
    with pytest.raises(DataError, match="class 'b' has 1 usable example"):
        stratified_split(np.array([0, 0, 1]), ["a", "b"], 0.2, seed=0)


def test_class_weights_are_inverse_frequency():
    w = class_weights(np.array([0] * 30 + [1] * 10), 2)
    np.testing.assert_allclose(w, [40 / 60, 40 / 20])


def test_adamw_matches_torch():
    import torch

    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    ours = AdamW(a, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=0.01, weight_decay=0.1)
    for step in range(25):
        grads = [torch.randn_like(t) for t in a]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        for p, g in zip(b, grads):
            p.grad = g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_plateau_matches_torch():
    import torch

    losses = [1.0, 0.9, 0.95, 0.91, 0.92, 0.9, 0.93, 0.94, 0.8, 0.85, 0.86, 0.87, 0.88, 0.81, 0.9, 0.9, 0.9]
    opt = AdamW([torch.zeros(1)], lr=0.1)
    ours = Plateau(opt, factor=0.5, patience=2, min_lr=0.02)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.5, patience=2, min_lr=0.02)
    for loss in losses:
        ours.step(loss)
        ref.step(loss)
        assert opt.lr == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert opt.lr == pytest.approx(0.02)  # floored at min_lr


def test_standardization_is_folded_exactly():
    import torch

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 6)) * [1, 10, 0.1, 5, 1, 1] + [3, -2, 0, 100, 1, 7]).astype(np.float32)
    x[:, 4] = 2.5  # a constant feature: std 1, nothing to scale
    mean, std = standardization(x)
    assert std[4] == 1.0
    torch.manual_seed(0)
    head = make_head("mlp", 6, 3, hidden=5, mean=mean, std=std).eval()
    (w1, b1), (w2, b2) = folded_layers(head)
    folded = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    with torch.no_grad():
        np.testing.assert_allclose(folded, head(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-4)


def test_training_learns_and_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.standard_normal((300, 30)) + np.eye(3, 30)[y] * 2).astype(np.float32)  # overlapping: val loss has a minimum
    r = train_head(x[:240], y[:240], x[240:], y[240:], 3, TrainConfig(epochs=200, patience=5, seed=1))
    assert r.history["val_accuracy"][r.best_epoch - 1] > 0.75
    assert r.stopped_early and r.epochs_run == r.best_epoch + 5
    assert min(r.history["val_loss"]) == r.history["val_loss"][r.best_epoch - 1]
    assert r.val_probabilities.shape == (60, 3)
