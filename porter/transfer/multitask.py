"""Several heads on one backbone's features: classification (the linear probe, per task) and regression (ridge,
per task), exported as one ONNX head with an output group per task.

Each task trains on the rows it labels (a blank cell masks a row out of that task only). Classification: the probe
of ``probe.py`` (L2 chosen on validation, refit on train + validation). Regression: ridge regression on
standardized features and a standardized target, its strength chosen on validation over a log grid by the SVD
closed form, refit on train + validation; the target's scaling is folded into the exported layer, so ``<task>/value``
is in the column's units. Heads share the cached features, so N tasks cost one backbone pass and N small solves.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import JointTraining
from .tables import Task

RIDGE_GRID = tuple(10.0 ** e for e in range(-4, 4))  # times the number of training rows
RIDGE_FLOOR = 1e-8  # a best strength at the grid's low edge is followed down, a decade at a time, to here
HEAD_INPUT = "porter/head/features"


@dataclass
class RegressionHead:
    mean: np.ndarray  # feature standardization
    std: np.ndarray
    weight: np.ndarray  # F, for standardized features, in target units (the scaling folded in)
    bias: float
    alpha: float
    curve: list[dict[str, float]] = field(default_factory=list)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.weight + self.bias


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = np.asarray(pred, np.float64) - np.asarray(y, np.float64)
    var = float(np.var(y)) if len(y) else 0.0
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": float(1 - (err ** 2).mean() / var) if var > 0 else 0.0, "examples": int(len(y))}


def fit_ridge(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> tuple[RegressionHead, dict]:
    """(the head refit on train + validation at the strength with the lowest validation RMSE, the validation
    figures of the train-only fit)."""
    from .heads import standardization

    def solve(x, y):
        mean, std = standardization(x)
        xs = (x.astype(np.float64) - mean) / std
        ym, ys = float(y.mean()), float(y.std()) or 1.0
        u, s, vt = np.linalg.svd(xs, full_matrices=False)
        return mean, std, ym, ys, u, s, vt, u.T @ ((y - ym) / ys)

    mean, std, ym, ys, u, s, vt, uy = solve(x_train, y_train)
    n = len(x_train)
    curve, best = [], None
    grid = list(RIDGE_GRID)
    while grid:
        lam = grid.pop(0)
        w = vt.T @ (s / (s ** 2 + lam * n) * uy) * ys
        pred = ((x_val.astype(np.float64) - mean) / std) @ w + ym
        fit = ((x_train.astype(np.float64) - mean) / std) @ w + ym
        m = regression_metrics(y_val, pred)
        curve.append({"alpha": lam, "train_rmse": regression_metrics(y_train, fit)["rmse"], "val_rmse": m["rmse"],
                      "val_r2": m["r2"]})
        if best is None or m["rmse"] < best[1]["rmse"]:
            best = (lam, m, pred)
        if not grid and best[0] == min(c["alpha"] for c in curve) and best[0] / 10 >= RIDGE_FLOOR:
            grid.append(best[0] / 10)  # the weakest strength won: the optimum may lie below the grid
    curve.sort(key=lambda c: c["alpha"])
    lam, val_metrics, val_pred = best
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    mean, std, ym, ys, u, s, vt, uy = solve(x_all, y_all)
    w = vt.T @ (s / (s ** 2 + lam * len(x_all)) * uy) * ys
    return RegressionHead(mean.astype(np.float64), std.astype(np.float64), w, ym, lam, curve), \
        {**val_metrics, "predictions": val_pred}


@dataclass
class SharedTrunk:
    """``--shared-hidden``: standardize, Linear(features, hidden), ReLU -- shared by every task's layer."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # hidden x features
    bias: np.ndarray


@dataclass
class JointHead:
    """A task's layer on the trunk's output: W (classes or 1 x hidden), b; a regression's scaling folded in."""

    weight: np.ndarray
    bias: np.ndarray

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.weight.T.astype(np.float64) + self.bias


@dataclass
class TaskResult:
    task: Task
    head: Any  # torch linear head (classification) or RegressionHead
    train_rows: int
    val_rows: int
    validation: dict[str, Any]  # accuracy + per-class + confusion, or mae / rmse / r2
    chosen: dict[str, float]  # {"l2": ...} or {"alpha": ...}
    curve: list[dict[str, float]]
    seconds: float


def fit_tasks(features: np.ndarray, rows: np.ndarray, tasks: Sequence[Task], train_idx: np.ndarray,
              val_idx: np.ndarray, config, log: Callable[[str], None] | None = None) -> list[TaskResult]:
    """One head per task on ``features`` (row k is table row ``rows[k]``), each on the rows it labels."""
    from ..errors import DataError
    from .report import classification_metrics
    from .train import train_head

    results = []
    for t in tasks:
        start = time.perf_counter()
        labelled = t.labelled[rows]
        tr, va = train_idx[labelled[train_idx]], val_idx[labelled[val_idx]]
        if len(tr) < 2 or len(va) < 1:
            raise DataError(f"task {t.name!r} labels {len(tr)} training and {len(va)} validation rows; it needs at "
                            f"least 2 and 1 (label more rows, or lower --val-split)")
        if t.type == "classification":
            y = t.labels[rows]
            missing = [t.classes[c] for c in range(len(t.classes)) if not (y[tr] == c).any()]
            if missing:
                raise DataError(f"task {t.name!r}: class {missing[0]!r} has no labelled training row")
            r = train_head(features[tr], y[tr], features[va], y[va], len(t.classes), config)
            val = classification_metrics(y[va], r.val_probabilities.argmax(1), t.classes)
            val["loss"] = r.val_loss
            head, chosen, curve = r.head, r.chosen, r.curve
        else:
            y = t.values[rows]
            head, val = fit_ridge(features[tr], y[tr], features[va], y[va])
            val.pop("predictions")
            chosen, curve = {"alpha": head.alpha}, head.curve
        results.append(TaskResult(t, head, int(len(tr)), int(len(va)), val, chosen, curve,
                                  time.perf_counter() - start))
        if log:
            fig = (f"val_acc {val['accuracy']:.4f}" if t.type == "classification" else
                   f"val R² {val['r2']:.4f}, RMSE {val['rmse']:.4g}")
            log(f"porter: task {t.name} ({t.type}): {len(tr)} train / {len(va)} val rows, {fig}")
    return results


def output_names(task: Task) -> list[str]:
    return [f"{task.name}/probabilities", f"{task.name}/label"] if task.type == "classification" else \
        [f"{task.name}/value"]


def heads_to_onnx(results: Sequence[TaskResult], *, opset: int, ir_version: int, batch_dim: str | int | None,
                  in_features: int, trunk: "SharedTrunk | None" = None):
    """One ONNX head: ``HEAD_INPUT`` -> per task ``<task>/probabilities`` + ``<task>/label`` or ``<task>/value``;
    with a shared trunk, standardize -> Gemm -> Relu once, every task's layer on its output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .heads import head_layers

    nodes, inits, outputs = [], [], []

    def standardize(p: str, mean, std) -> str:
        inits.extend([numpy_helper.from_array(np.asarray(mean, np.float32), f"{p}/mean"),
                      numpy_helper.from_array(np.asarray(std, np.float32), f"{p}/std")])
        nodes.extend([helper.make_node("Sub", [HEAD_INPUT, f"{p}/mean"], [f"{p}/centred"]),
                      helper.make_node("Div", [f"{p}/centred", f"{p}/std"], [f"{p}/standardized"])])
        return f"{p}/standardized"

    shared = None
    if trunk is not None:
        x = standardize("porter/head/trunk", trunk.mean, trunk.std)
        inits += [numpy_helper.from_array(trunk.weight, "porter/head/trunk/W"),
                  numpy_helper.from_array(trunk.bias, "porter/head/trunk/b")]
        nodes += [helper.make_node("Gemm", [x, "porter/head/trunk/W", "porter/head/trunk/b"], ["porter/head/trunk/h"],
                                   transB=1),
                  helper.make_node("Relu", ["porter/head/trunk/h"], ["porter/head/trunk/relu"])]
        shared = "porter/head/trunk/relu"
    for k, r in enumerate(results):
        t = r.task
        p = f"porter/head/{k}_{re.sub(r'[^A-Za-z0-9_]', '_', t.name)}"
        if shared is not None:
            layers, x = [(r.head.weight, r.head.bias)], shared
        elif t.type == "classification":
            mean, std, layers = head_layers(r.head)
            x = standardize(p, mean, std)
        else:
            layers = [(r.head.weight.astype(np.float32)[None, :], np.array([r.head.bias], np.float32))]
            x = standardize(p, r.head.mean, r.head.std)
        for i, (w, b) in enumerate(layers):
            inits += [numpy_helper.from_array(w, f"{p}/W{i}"), numpy_helper.from_array(b, f"{p}/b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"{p}/W{i}", f"{p}/b{i}"], [f"{p}/dense{i}"], transB=1))
            x = f"{p}/dense{i}"
            if i < len(layers) - 1:
                nodes.append(helper.make_node("Relu", [x], [x + "/relu"]))
                x += "/relu"
        if t.type == "classification":
            prob, label = output_names(t)
            nodes += [helper.make_node("Softmax", [x], [prob], axis=1),
                      helper.make_node("ArgMax", [x], [label], axis=1, keepdims=0)]
            outputs += [helper.make_tensor_value_info(prob, TensorProto.FLOAT, [batch_dim, len(t.classes)]),
                        helper.make_tensor_value_info(label, TensorProto.INT64, [batch_dim])]
        else:
            (value,) = output_names(t)
            inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{p}/flat"))
            nodes.append(helper.make_node("Reshape", [x, f"{p}/flat"], [value]))
            outputs.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, [batch_dim]))
    graph = helper.make_graph(nodes, "porter_tasks",
                              [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, [batch_dim, in_features])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                              producer_name="porter")
    onnx.checker.check_model(model)
    return model


def reference_outputs(results: Sequence[TaskResult], features: np.ndarray,
                      trunk: SharedTrunk | None = None) -> dict[str, np.ndarray]:
    """What every output should be, computed from the heads directly (torch / numpy), for the merge check."""
    from .heads import predict_proba

    out = {}
    if trunk is not None:
        z = (np.asarray(features, np.float64) - trunk.mean) / trunk.std
        hidden = np.maximum(z @ trunk.weight.T.astype(np.float64) + trunk.bias, 0.0)
        for r in results:
            y = r.head.apply(hidden)
            if r.task.type == "classification":
                e = np.exp(y - y.max(1, keepdims=True))
                out[f"{r.task.name}/probabilities"] = e / e.sum(1, keepdims=True)
                out[f"{r.task.name}/label"] = y.argmax(1)
            else:
                out[f"{r.task.name}/value"] = y[:, 0]
        return out
    for r in results:
        if r.task.type == "classification":
            prob = predict_proba(r.head, features)
            out[f"{r.task.name}/probabilities"] = prob
            out[f"{r.task.name}/label"] = prob.argmax(1)
        else:
            out[f"{r.task.name}/value"] = r.head.predict(features)
    return out


def card_tasks(results: Sequence[TaskResult]) -> tuple[dict[str, Any], ...]:
    tasks = []
    for r in results:
        t = r.task
        d: dict[str, Any] = {"name": t.name, "type": t.type, "outputs": output_names(t)}
        if t.type == "classification":
            d["labels"] = list(t.classes)
        else:
            y = t.values[np.isfinite(t.values)]
            d["units"] = {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}
        tasks.append(d)
    return tuple(tasks)


def _figure_name(t: Task) -> str:
    return "accuracy" if t.type == "classification" else "r2"


def fit_joint(features: np.ndarray, rows: np.ndarray, tasks: Sequence[Task], train_idx: np.ndarray,
              val_idx: np.ndarray, *, hidden: int, weights: dict[str, float], epochs: int, patience: int,
              batch_size: int, seed: int, dropout: float = 0.0, lr: float = 1e-3,
              log: Callable[[str], None] | None = None) -> tuple[SharedTrunk, list[TaskResult], JointTraining]:
    """The shared trunk and every task's layer trained together (AdamW, ``lr`` default 1e-3, weight decay 1e-4): the loss is
    the weighted sum of the tasks' masked losses (cross-entropy; MSE on the standardized target), each weight
    ``weights.get(task)`` or, by default, 1 / that task's initial loss (no task drowns the others); early stopping
    on the same weighted sum on validation, the best epoch restored."""
    import copy
    import math

    import torch

    from ..errors import DataError
    from .heads import standardization
    from .report import classification_metrics

    start = time.perf_counter()
    mean, std = standardization(features[train_idx])
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    targets, masks, scales = [], [], []
    for t in tasks:
        if t.type == "classification":
            y = torch.from_numpy(t.labels[rows].astype(np.int64))
            targets.append(y), masks.append(y >= 0), scales.append(None)
        else:
            v = t.values[rows]
            ok = np.isfinite(v)
            ym, ys = float(v[train_idx][ok[train_idx]].mean()), float(v[train_idx][ok[train_idx]].std()) or 1.0
            targets.append(torch.from_numpy(np.where(ok, (v - ym) / ys, 0.0).astype(np.float32)))
            masks.append(torch.from_numpy(ok)), scales.append((ym, ys))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = torch.nn.Linear(x.shape[1], hidden)
        heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(t.classes) if t.type == "classification" else 1)
                                    for t in tasks)
        drop = torch.nn.Dropout(dropout)
        params = list(trunk.parameters()) + list(heads.parameters())

        def outputs(idx: torch.Tensor, train: bool) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
            """Per task: (prediction, target) on the rows of ``idx`` it labels, None where it labels none."""
            h = torch.relu(trunk(x[idx]))
            h = drop(h) if train else h
            out = []
            for head, y, m in zip(heads, targets, masks):
                sel = m[idx]
                out.append((head(h[sel]), y[idx][sel]) if bool(sel.any()) else None)
            return out

        def task_loss(t: Task, pair) -> torch.Tensor:
            if pair is None:
                return torch.zeros(())
            pred, y = pair
            return (torch.nn.functional.cross_entropy(pred, y) if t.type == "classification" else
                    torch.nn.functional.mse_loss(pred[:, 0], y))

        def losses(idx: torch.Tensor, train: bool) -> list[torch.Tensor]:
            return [task_loss(t, pair) for t, pair in zip(tasks, outputs(idx, train))]

        def figure(t: Task, pair) -> float | None:  # accuracy, or R² (the same on the standardized target)
            if pair is None:
                return None
            pred, y = pair
            if t.type == "classification":
                return float((pred.argmax(1) == y).double().mean())
            var = float(((y - y.mean()) ** 2).mean())
            return 1.0 - float(((pred[:, 0] - y) ** 2).mean()) / var if var > 0 else None

        tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        with torch.no_grad():
            initial = [float(v) for v in losses(tr, False)]
        w = [float(weights[t.name]) if t.name in weights else 1.0 / max(initial[k], 1e-6)
             for k, t in enumerate(tasks)]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        history: dict[str, list[float]] = {"loss": [], "val_loss": []}
        per_task = {t.name: {"val_loss": [], "val_" + _figure_name(t): []} for t in tasks}  # unweighted, per epoch
        best, best_state, best_epoch, since, epoch = math.inf, None, 0, 0, 0
        for epoch in range(1, epochs + 1):
            trunk.train(), heads.train(), drop.train()
            perm = tr[torch.randperm(len(tr), generator=gen)]
            for i in range(0, len(perm), batch_size):
                opt.zero_grad()
                loss = sum(wk * lk for wk, lk in zip(w, losses(perm[i:i + batch_size], True)))
                loss.backward()
                opt.step()
            trunk.eval(), heads.eval(), drop.eval()
            with torch.no_grad():
                tl = float(sum(wk * lk for wk, lk in zip(w, losses(tr, False))))
                val = outputs(va, False)
                vls = [float(task_loss(t, pair)) for t, pair in zip(tasks, val)]
                vl = float(sum(wk * lk for wk, lk in zip(w, vls)))
                for t, pair, lk in zip(tasks, val, vls):  # None: no labelled validation row for this task
                    per_task[t.name]["val_loss"].append(None if pair is None else lk)
                    per_task[t.name]["val_" + _figure_name(t)].append(figure(t, pair))
            history["loss"].append(tl), history["val_loss"].append(vl)
            if not math.isfinite(tl):
                raise DataError(f"joint training diverged at epoch {epoch}")
            if vl < best - max(1e-7, 1e-4 * abs(best)) if math.isfinite(best) else True:
                best, best_epoch, since = vl, epoch, 0
                best_state = copy.deepcopy((trunk.state_dict(), heads.state_dict()))
            else:
                since += 1
                if since >= patience:
                    break
        trunk.load_state_dict(best_state[0]), heads.load_state_dict(best_state[1])
    shared = SharedTrunk(mean.astype(np.float32), std.astype(np.float32),
                         trunk.weight.detach().numpy().copy(), trunk.bias.detach().numpy().copy())
    results = []
    for t, head, scale in zip(tasks, heads, scales):
        W, b = head.weight.detach().numpy().astype(np.float64), head.bias.detach().numpy().astype(np.float64)
        if scale is not None:  # back to the column's units
            W, b = W * scale[1], b * scale[1] + scale[0]
        jh = JointHead(W.astype(np.float32), b.astype(np.float32))
        results.append(TaskResult(t, jh, 0, 0, {}, {"hidden": hidden, "weight": w[len(results)]}, [], 0.0))
    ref = reference_outputs(results, features[val_idx], shared)
    for r in results:
        t = r.task
        lab = t.labelled[rows]
        tr_k, va_k = train_idx[lab[train_idx]], val_idx[lab[val_idx]]
        sel = lab[val_idx]
        if t.type == "classification":
            y = t.labels[rows][va_k]
            prob = ref[f"{t.name}/probabilities"][sel]
            r.validation = classification_metrics(y, prob.argmax(1), t.classes)
            r.validation["loss"] = float(-np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, 1)).mean())
        else:
            r.validation = regression_metrics(t.values[rows][va_k], ref[f"{t.name}/value"][sel])
        r.train_rows, r.val_rows = int(len(tr_k)), int(len(va_k))
        if log:
            fig = (f"val_acc {r.validation['accuracy']:.4f}" if t.type == "classification" else
                   f"val R² {r.validation['r2']:.4f}, RMSE {r.validation['rmse']:.4g}")
            log(f"porter: task {t.name} ({t.type}, shared trunk): {fig}")
    # each task's own best epoch on validation, beside the joint one the shipped model keeps
    own_best = {}
    for t in tasks:
        h, key = per_task[t.name], "val_" + _figure_name(t)
        seen = [e for e, v in enumerate(h["val_loss"]) if v is not None]
        e = min(seen, key=lambda k: h["val_loss"][k]) if seen else None
        own_best[t.name] = {"epoch": None if e is None else e + 1, "val_loss": None if e is None else h["val_loss"][e],
                            key: None if e is None else h[key][e],
                            "at_kept_epoch": {"val_loss": h["val_loss"][best_epoch - 1], key: h[key][best_epoch - 1]}}
    history["tasks"] = per_task
    info = JointTraining(hidden=hidden, lr=lr, weights=dict(zip([t.name for t in tasks], w)), initial_losses=initial,
                         best_epoch=best_epoch, epochs_run=epoch, history=history, task_best=own_best,
                         seconds=round(time.perf_counter() - start, 4))
    return shared, results, info
