"""Head training pieces: the split, class weights, AdamW and the plateau schedule against torch's own."""

from __future__ import annotations

import numpy as np
import pytest

from porter.errors import DataError
from porter.transfer.heads import make_head, standardization
from porter.transfer.train import TrainConfig, TrainResult, class_weights, pick_by_validation, stratified_split, train_head


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


def test_onnx_head_matches_the_torch_head_even_on_tiny_feature_spreads():
    """Standardization stays explicit in the ONNX head: folded into the weights, a nearly constant feature
    (std 3e-4) with a weight of 25 made float32 miss the probabilities by 6e-4."""
    import onnxruntime as ort
    import torch

    from porter.transfer.heads import head_to_onnx, predict_proba

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    x[:, 1] = 0.3 + 3e-4 * rng.standard_normal(64)  # nearly constant
    x[:, 4] = 2.5  # constant: std 1, nothing to scale
    mean, std = standardization(x)
    assert std[4] == 1.0
    for kind in ("linear", "mlp"):
        torch.manual_seed(0)
        head = make_head(kind, 6, 3, hidden=5, mean=mean, std=std).eval()
        with torch.no_grad():
            head.net[0].weight[:, 1] = 25.0
        sess = ort.InferenceSession(head_to_onnx(head, opset=17, ir_version=8).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        prob, label = sess.run(None, {sess.get_inputs()[0].name: x})
        want = predict_proba(head, x)
        np.testing.assert_allclose(prob, want, atol=1e-5)  # folded: 6e-4
        np.testing.assert_array_equal(label, want.argmax(1))


def test_training_learns_and_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.standard_normal((300, 30)) + np.eye(3, 30)[y] * 2).astype(np.float32)  # overlapping: val loss has a minimum
    r = train_head(x[:240], y[:240], x[240:], y[240:], 3, TrainConfig(epochs=200, patience=5, seed=1, lr=1e-2,
                                                                       weight_decay=1e-4))
    assert r.method == "adamw" and r.chosen == {"lr": 1e-2, "weight_decay": 1e-4}
    assert r.history["val_accuracy"][r.best_epoch - 1] > 0.75
    assert r.stopped_early and r.epochs_run == r.best_epoch + 5
    assert min(r.history["val_loss"]) == r.history["val_loss"][r.best_epoch - 1]
    assert r.val_probabilities.shape == (60, 3)


def overlapping(n=400, d=30, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = (rng.standard_normal((n, d)) * np.linspace(0.5, 3, d) + np.eye(k, d)[y] * 1.5 + 4).astype(np.float32)
    return x, y


def test_probe_solves_the_same_problem_as_sklearn():
    """At a given L2 strength the probe's solution is scikit-learn's LogisticRegression(C = 1 / (n * l2))."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from porter.transfer.heads import standardization
    from porter.transfer.probe import solve

    x, y = overlapping()
    mean, std = standardization(x)
    xs = ((x - mean) / std).astype(np.float64)
    for l2, weights in ((1e-2, None), (1e-3, class_weights(y, 3))):
        w, b, _ = solve(xs, y, 3, l2, weights=weights, tolerance_grad=1e-10, max_iter=5000)
        sk = LogisticRegression(C=1.0 / (len(x) * l2), tol=1e-12, max_iter=10000,
                                class_weight=None if weights is None else dict(enumerate(weights))).fit(xs, y)
        np.testing.assert_allclose(w, sk.coef_, atol=2e-5 * np.abs(sk.coef_).max())
        np.testing.assert_allclose(b - b.mean(), sk.intercept_ - sk.intercept_.mean(), atol=1e-4)
        probs = torch.softmax(torch.as_tensor(xs @ w.T + b), 1).numpy()
        np.testing.assert_allclose(probs, sk.predict_proba(xs), atol=1e-5)


def test_probe_chooses_the_l2_strength_on_validation_and_refits():
    from porter.transfer.heads import predict_proba

    x, y = overlapping(n=300, d=200)  # few examples, many features: unregularized overfits
    r = train_head(x[:200], y[:200], x[200:], y[200:], 3, TrainConfig())
    assert r.method == "lbfgs" and r.refit
    curve = {p["l2"]: p for p in r.curve}
    assert len(curve) >= 9  # 7 decades + 2 half decades around the best
    assert r.chosen["l2"] == min(curve.values(), key=lambda p: p["val_loss"])["l2"]
    assert r.val_loss == curve[r.chosen["l2"]]["val_loss"]
    assert curve[min(curve)]["val_loss"] > r.val_loss and curve[max(curve)]["val_loss"] > r.val_loss  # an interior optimum
    assert r.val_accuracy > 0.6
    # deterministic: the same features give the same head, bit for bit
    again = train_head(x[:200], y[:200], x[200:], y[200:], 3, TrainConfig(seed=5))
    np.testing.assert_array_equal(predict_proba(r.head, x), predict_proba(again.head, x))
    # a given strength is used as is
    fixed = train_head(x[:200], y[:200], x[200:], y[200:], 3, TrainConfig(weight_decay=0.5))
    assert fixed.chosen == {"l2": 0.5} and [p["l2"] for p in fixed.curve] == [0.5]


def test_mlp_chooses_lr_and_weight_decay_from_a_grid():
    from porter.transfer.train import MLP_LR_GRID, MLP_WEIGHT_DECAY_GRID

    x, y = overlapping(n=300, d=20)
    r = train_head(x[:240], y[:240], x[240:], y[240:], 3, TrainConfig(head="mlp", hidden=16, epochs=40, patience=5))
    assert r.method == "adamw" and len(r.curve) == len(MLP_LR_GRID) * len(MLP_WEIGHT_DECAY_GRID)
    assert r.val_loss == min(p["val_loss"] for p in r.curve)
    assert {r.chosen["lr"]} <= set(MLP_LR_GRID) and r.val_accuracy > 0.6
    one = train_head(x[:240], y[:240], x[240:], y[240:], 3, TrainConfig(head="mlp", hidden=16, epochs=5, lr=1e-3))
    assert len(one.curve) == len(MLP_WEIGHT_DECAY_GRID) and {p["lr"] for p in one.curve} == {1e-3}


def _result(probs, val_loss):
    return TrainResult(None, "lbfgs", 0.0, 1.0, val_loss, 1.0, {}, [], None, 0.0, val_probabilities=np.asarray(probs))


def test_pick_by_validation_needs_more_than_one_standard_error():
    y = np.zeros(200, np.int64)
    base = np.tile([0.8, 0.2], (200, 1))  # per-example loss 0.223
    mixed = np.where(np.arange(200)[:, None] % 2 == 0, [0.9, 0.1], [0.72, 0.28])  # mean 0.217: lower, within noise
    sharp = np.tile([0.95, 0.05], (200, 1))  # 0.051: clearly lower
    nll = lambda p: float(-np.log(p[:, 0]).mean())  # noqa: E731
    results = [_result(p, nll(p)) for p in (base, mixed, sharp)]
    assert nll(mixed) < nll(base)
    best, errors = pick_by_validation(results[:2], y)
    assert best == 0 and errors[0] == 0.0 and nll(base) - nll(mixed) < errors[1]
    best, _ = pick_by_validation(results, y)
    assert best == 2


def test_loss_margin_is_the_one_standard_error_rule():
    from porter.transfer.train import loss_margin

    y = np.array([0, 1, 0, 1])
    base = np.array([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])
    better = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])  # every example better by the same amount
    margin, se = loss_margin(better, base, y)
    assert se == 0.0 and margin == pytest.approx(np.log(0.6) - np.log(0.9))  # clearly better: margin < 0
    noisy = np.array([[0.99, 0.01], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])  # better on some, worse on others
    d = -np.log([0.99, 0.5, 0.2, 0.6]) + np.log([0.6, 0.6, 0.6, 0.6])
    margin, se = loss_margin(noisy, base, y)
    assert se == pytest.approx(d.std(ddof=1) / 2) and margin == pytest.approx(d.mean() + se) and margin > 0


def test_the_probe_objective_has_the_gradient_of_its_loss():
    """LogisticObjective's hand-written gradient is its loss's, class weights included (central differences)."""
    from porter.transfer.probe import LogisticObjective

    x, y = overlapping(n=60, d=5, k=3)
    objective = LogisticObjective((x - x.mean(0)) / x.std(0), y, 3, class_weights(y, 3) * np.array([1.0, 2.0, 0.5]))
    theta = np.random.default_rng(1).standard_normal(3 * 5 + 3)
    loss, grad = objective.value_and_grad(theta, 0.1)
    eps = 1e-6
    numeric = [(objective.value_and_grad(theta + eps * e, 0.1)[0] - objective.value_and_grad(theta - eps * e, 0.1)[0])
               / (2 * eps) for e in np.eye(len(theta))]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    # and the loss is the weighted mean cross-entropy + (l2 / 2) ||W||^2 computed directly
    w, b = theta[:15].reshape(3, 5), theta[15:]
    logits = objective.x @ w.T + b
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(60), y]
    assert loss == pytest.approx(float((objective.scale * ce).sum() + 0.05 * (w * w).sum()), rel=1e-12)


def test_path_start_continues_the_regularization_path():
    from porter.transfer.probe import path_start

    a, b = (np.full((2, 3), 1.0), np.zeros(2)), (np.full((2, 3), 2.0), np.ones(2))
    assert path_start({}, 0.1) == []
    assert len(path_start({1.0: a}, 0.1)) == 1  # one solution: no path to continue
    nearest, extrapolated = path_start({1.0: a, 0.1: b}, 0.01)  # a decade on: 2 * b - a
    assert nearest is b and np.array_equal(extrapolated[0], np.full((2, 3), 3.0))
    _, between = path_start({1.0: a, 0.01: b}, 0.1)  # half way in log(l2): the mean
    np.testing.assert_allclose(between[0], np.full((2, 3), 1.5))
    assert path_start({1.0: a, 0.1: b}, 0.0) == [b]  # l2 = 0 has no log: the nearest solution only
