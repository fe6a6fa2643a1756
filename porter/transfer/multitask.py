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

from .tables import Task

RIDGE_GRID = tuple(10.0 ** e for e in range(-4, 4))  # times the number of training rows
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
    for lam in RIDGE_GRID:
        w = vt.T @ (s / (s ** 2 + lam * n) * uy) * ys
        pred = ((x_val.astype(np.float64) - mean) / std) @ w + ym
        fit = ((x_train.astype(np.float64) - mean) / std) @ w + ym
        m = regression_metrics(y_val, pred)
        curve.append({"alpha": lam, "train_rmse": regression_metrics(y_train, fit)["rmse"], "val_rmse": m["rmse"],
                      "val_r2": m["r2"]})
        if best is None or m["rmse"] < best[1]["rmse"]:
            best = (lam, m, pred)
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


def fit_joint(features: np.ndarray, rows: np.ndarray, tasks: Sequence[Task], train_idx: np.ndarray,
              val_idx: np.ndarray, *, hidden: int, weights: dict[str, float], epochs: int, patience: int,
              batch_size: int, seed: int, dropout: float = 0.0, lr: float = 1e-3,
              log: Callable[[str], None] | None = None) -> tuple[SharedTrunk, list[TaskResult], dict[str, Any]]:
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

        def losses(idx: torch.Tensor, train: bool) -> list[torch.Tensor]:
            h = torch.relu(trunk(x[idx]))
            h = drop(h) if train else h
            out = []
            for t, head, y, m in zip(tasks, heads, targets, masks):
                sel = m[idx]
                if not bool(sel.any()):
                    out.append(torch.zeros(()))
                    continue
                pred = head(h[sel])
                out.append(torch.nn.functional.cross_entropy(pred, y[idx][sel]) if t.type == "classification" else
                           torch.nn.functional.mse_loss(pred[:, 0], y[idx][sel]))
            return out

        tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        with torch.no_grad():
            initial = [float(v) for v in losses(tr, False)]
        w = [float(weights[t.name]) if t.name in weights else 1.0 / max(initial[k], 1e-6)
             for k, t in enumerate(tasks)]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        history: dict[str, list[float]] = {"loss": [], "val_loss": []}
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
                vl = float(sum(wk * lk for wk, lk in zip(w, losses(va, False))))
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
    info = {"hidden": hidden, "lr": lr, "weights": dict(zip([t.name for t in tasks], w)), "initial_losses": initial,
            "best_epoch": best_epoch, "epochs_run": epoch, "history": history,
            "seconds": round(time.perf_counter() - start, 4)}
    return shared, results, info


# --- the pipeline -----------------------------------------------------------------------------------------------

CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-3


def report_paths(output, tasks: Sequence[Task], shared: bool = False) -> dict[str, Any]:
    """The report beside ``output``: metrics, a training curve per task (its L2 / ridge strength curve), a
    confusion matrix per classification task; with a shared trunk, the joint training's loss curves instead of
    the per-task strength curves."""
    from pathlib import Path

    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths = {"metrics": out.with_name(f"{stem}.metrics.json")}
    for t in tasks:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", t.name)
        if not shared:
            paths[f"training/{t.name}"] = out.with_name(f"{stem}.{safe}.training.png")
        if t.type == "classification":
            paths[f"confusion/{t.name}"] = out.with_name(f"{stem}.{safe}.confusion.png")
    if shared:
        paths["training/shared"] = out.with_name(f"{stem}.shared.training.png")
    return paths


def finetune_tasks(source: Any, table, output, opts, start: float):
    """``porter.finetune`` on a table of several targets: one backbone pass, a head per task, one ONNX."""
    import contextlib
    from pathlib import Path

    from .. import __version__
    from ..errors import UsageError, ValidationError
    from ..graph.cuts import plan_cuts
    from ..graph.inspect import format_shape, opset_of
    from ..graph.surgery import extract_backbone, merge_head
    from ..outputs import atomic_path, check_output
    from ..runtime.predictor import Predictor
    from .api import FinetuneResult, _load_source, _logger, _prefetch_imports
    from .features import compute_features
    from .inputs import batch_dim, input_geometry, resolve_preprocess, sample_inputs
    from .report import confusion_png, metrics_json, regularization_png, series_png
    from .tables import load_table, parse_tasks, task_split
    from .train import TrainConfig

    if opts.partial or opts.augment:
        raise UsageError("--unfreeze, --train-from and --augment train one task; give one label column (or an image "
                         "folder) to use them")
    if opts.head != "linear" or (opts.lr is not None and not opts.shared_hidden):
        raise UsageError("several tasks train linear heads solved to their optimum (the probe, ridge), or a shared "
                         "trunk (--shared-hidden N, whose AdamW takes --lr); --head mlp is a single-task option")
    log = _logger(opts.progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset, tasks = load_table(Path(table), parse_tasks(opts.tasks), opts.path_column)
    timings["data"] = time.perf_counter() - t0
    weights = parse_task_weights(opts.task_weights, tasks)  # checked before any work
    if weights and not opts.shared_hidden:
        raise UsageError("--task-weight weights the joint loss of --shared-hidden; without it every task's head is "
                         "solved on its own")
    paths = report_paths(output, tasks, bool(opts.shared_hidden)) if output is not None else {}
    if output is not None:
        for p in [Path(output), *paths.values()]:
            check_output(p, opts.force)
    _prefetch_imports(report=output is not None)
    t0 = time.perf_counter()
    model, card, notes = _load_source(source, opts)
    timings["load"] = time.perf_counter() - t0
    geometry = input_geometry(model, opts, card)
    spec, note = resolve_preprocess(card, opts, geometry)
    if note:
        notes.append(note)
    cut = plan_cuts(model, "backbone" if opts.cut in (None, "auto", "search") else opts.cut)[0]
    if cut.note and cut.kind != "user":
        notes.append(cut.note)
    inferred = [t.describe() for t in tasks]
    log(f"porter: {len(dataset)} examples, {len(tasks)} tasks ({'; '.join(inferred)}) from {dataset.source}; "
        f"cut at {cut.describe()}")
    if dataset.ignored:
        notes.append(f"skipped {len(dataset.ignored)} row(s) with no label for any task: "
                     f"{', '.join(dataset.ignored[:5])}{' ...' if len(dataset.ignored) > 5 else ''}")
    t0 = time.perf_counter()
    feats = compute_features(model, [cut], dataset, geometry, spec, batch_size=opts.feature_batch_size,
                             device=opts.device, cache=opts.cache, cache_dir=opts.cache_dir, progress=opts.progress,
                             workers=opts.workers, memory_budget=opts.memory_budget)[cut.key]
    timings["features"] = time.perf_counter() - t0
    if feats.skipped:
        notes.append(f"skipped {len(feats.skipped)} unreadable file(s): "
                     f"{', '.join(s[0] for s in feats.skipped[:3])}{' ...' if len(feats.skipped) > 3 else ''}")
    rows = feats.index
    t0 = time.perf_counter()
    train_idx, val_idx = task_split(tasks, rows, opts.val_split, opts.seed)
    x = np.asarray(feats.features, np.float32)
    trunk, joint = None, None
    if opts.shared_hidden:
        trunk, results, joint = fit_joint(x, rows, tasks, train_idx, val_idx, hidden=opts.shared_hidden,
                                          weights=weights, epochs=opts.epochs, patience=opts.patience,
                                          batch_size=opts.batch_size, seed=opts.seed, dropout=opts.dropout or 0.0,
                                          lr=opts.lr or 1e-3,
                                          log=log if opts.progress else None)
    else:
        config = TrainConfig(weight_decay=opts.weight_decay, balance=opts.balance, seed=opts.seed)
        results = fit_tasks(x, rows, tasks, train_idx, val_idx, config, log if opts.progress else None)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    backbone = extract_backbone(model, cut)
    head = heads_to_onnx(results, opset=opset_of(backbone), ir_version=backbone.ir_version,
                         batch_dim=batch_dim(backbone), in_features=x.shape[1], trunk=trunk)
    merged = merge_head(backbone, head)
    sample, pos = sample_inputs(dataset, feats, geometry, spec, val_idx)

    def run(m) -> dict[str, np.ndarray]:
        return Predictor(m, device="cpu", scores="raw", cache=False, spin=False).run_batched(sample)

    fresh = run(backbone)["porter/features"]
    want = reference_outputs(results, np.asarray(fresh, np.float32), trunk)
    got = run(merged)
    check: dict[str, Any] = {"examples": int(len(sample)), "atol": CHECK_ATOL, "rtol": CHECK_RTOL, "outputs": {}}
    problems = []
    for name, w in want.items():
        g = np.asarray(got[name])
        if name.endswith("/label"):
            ok = np.array_equal(g, w)
            check["outputs"][name] = {"equal": bool(ok)}
        else:
            diff = float(np.abs(g - w).max(initial=0.0))
            ok = bool(np.all(np.abs(g - w) <= CHECK_ATOL + CHECK_RTOL * np.abs(w)))
            check["outputs"][name] = {"max_abs": diff}
        if not ok:
            problems.append(name)
    cached_diff = float(np.abs(np.asarray(fresh) - x[pos]).max(initial=0.0))
    if cached_diff > 2e-2 * max(1.0, float(np.abs(x[pos]).max(initial=0.0))):
        problems.append(f"the cached features (they differ from the backbone's by {cached_diff:.3g}; rerun with "
                        f"cache=False)")
    if problems:
        raise ValidationError(f"the merged model does not compute backbone + heads for {', '.join(problems)}")
    check["passed"] = True
    timings["merge"] = time.perf_counter() - t0

    metrics = {
        "porter_version": __version__, "source": card.source,
        "data": {"source": dataset.source, "kind": dataset.kind, "examples": len(dataset),
                 "skipped": [{"file": n, "error": e} for n, e in feats.skipped],
                 "unlabelled_rows": dataset.ignored[:100], "unlabelled_count": len(dataset.ignored)},
        "examples": {"train": int(len(train_idx)), "val": int(len(val_idx))},
        "cut": {"tensor": cut.name, "shape": format_shape(cut.shape), "reason": cut.reason,
                "pooled": list(cut.pool_axes) if cut.pool_axes else None, "features": int(x.shape[1])},
        "preprocess": spec.to_dict() if spec else None,
        "features": {"cached": feats.cached, "cache": feats.cache_path, "examples": int(len(feats.index)),
                     "seconds": round(feats.seconds, 4), "device": feats.device if not feats.cached else None},
        "tasks": [{"name": r.task.name, "type": r.task.type, "inferred": r.task.inferred,
                   "classes": list(r.task.classes) or None, "train_rows": r.train_rows, "val_rows": r.val_rows,
                   "labelled": int(r.task.labelled.sum()), "chosen": r.chosen, "curve": r.curve,
                   "validation": r.validation, "outputs": output_names(r.task), "seconds": round(r.seconds, 4)}
                  for r in results],
        "shared_trunk": joint, "check": check, "timings": {k: round(v, 4) for k, v in timings.items()}, "notes": notes,
        "seed": opts.seed, "val_split": opts.val_split,
    }
    new_card = card.with_(labels=None, preprocess=spec, cut=cut.name, tasks=card_tasks(results),
                          training={"tasks": [{"name": r.task.name, "type": r.task.type, **r.chosen,
                                               **{k: v for k, v in r.validation.items()
                                                  if k in ("accuracy", "mae", "rmse", "r2")}} for r in results],
                                    "examples": metrics["examples"], "seed": opts.seed, "data": dataset.source},
                          parity={"check": "merged model vs backbone features -> heads (on validation examples)",
                                  "passed": True, "atol": CHECK_ATOL, "rtol": CHECK_RTOL,
                                  "batch_sizes": [int(len(sample))], "outputs": check["outputs"]},
                          porter_version=__version__)
    new_card.apply_to(merged)
    merged.producer_name, merged.producer_version = "porter", __version__
    metrics["seconds"] = round(time.perf_counter() - start, 4)
    path = None
    if output is not None:
        blobs = {paths["metrics"]: metrics_json(metrics), Path(output): merged.SerializeToString()}
        for r in results:
            name = r.task.name
            if r.task.type == "classification":
                blobs[paths[f"confusion/{name}"]] = confusion_png(
                    r.validation["confusion_matrix"], r.task.classes, f"{name}: validation confusion matrix")
            if joint:  # every task trained at once: its figures sit in the shared curve
                continue
            if r.task.type == "classification":
                blobs[paths[f"training/{name}"]] = regularization_png(r.curve, r.chosen["l2"], (),
                                                                      f"{name}: linear probe")
            else:
                blobs[paths[f"training/{name}"]] = series_png(
                    [c["alpha"] for c in r.curve], {"train RMSE": [c["train_rmse"] for c in r.curve],
                                                    "validation RMSE": [c["val_rmse"] for c in r.curve]},
                    xlabel="ridge strength (x rows)", mark=r.chosen["alpha"], log_x=True, title=f"{name}: ridge")
        if joint:
            h = joint["history"]
            blobs[paths["training/shared"]] = series_png(
                range(1, len(h["loss"]) + 1), {"train (weighted)": h["loss"], "validation (weighted)": h["val_loss"]},
                xlabel="epoch", mark=joint["best_epoch"], title=f"shared trunk ({joint['hidden']} units)")
        with contextlib.ExitStack() as stack:  # all temp files written, then all renamed; a failure leaves none
            temps = {p: stack.enter_context(atomic_path(p, opts.force)) for p in blobs}
            for p, data in blobs.items():
                temps[p].write_bytes(data)
        path = Path(output)
    return FinetuneResult(merged, path, new_card, metrics, paths, time.perf_counter() - start, timings, notes,
                          feats.cached, [r.head for r in results])


def parse_task_weights(values: Sequence[str] | dict | None, tasks: Sequence[Task]) -> dict[str, float]:
    """``["age=2", "pose=0.5"]`` (or a dict) -> {task: weight}; unknown tasks and bad numbers refused."""
    from ..errors import UsageError

    if not values:
        return {}
    items = values.items() if isinstance(values, dict) else [str(v).partition("=")[::2] for v in values]
    names = {t.name for t in tasks}
    out = {}
    for name, w in items:
        if name not in names:
            raise UsageError(f"--task-weight {name}=...: no task {name!r} (tasks: {', '.join(sorted(names))})")
        try:
            out[name] = float(w)
        except (TypeError, ValueError):
            raise UsageError(f"--task-weight {name}={w}: the weight must be a number") from None
        if not out[name] >= 0 or out[name] == float("inf"):
            raise UsageError(f"--task-weight {name}={w}: the weight must be 0 or more")
    return out


def tasks_summary(m: dict[str, Any], source: str, path, seconds: float, report: dict, notes: Sequence[str]) -> str:
    where = f" -> {path}" if path else ""
    ex = m["examples"]
    lines = [f"fine-tuned {source} on {m['data']['source']}: {len(m['tasks'])} tasks, {ex['train']} train / "
             f"{ex['val']} val rows{where} in {seconds:.1f} s",
             f"  cut: {m['cut']['tensor']} {m['cut']['shape']}, {m['cut']['features']} features ({m['cut']['reason']})"]
    f = m["features"]
    lines.append(f"  features: from cache ({f['cache']})" if f["cached"] else
                 f"  features: {f['examples']} examples in {f['seconds']:.2f} s ({f['device']})")
    j = m.get("shared_trunk")
    if j:
        lines.append(f"  shared trunk: {j['hidden']} hidden units, trained jointly (AdamW), best epoch "
                     f"{j['best_epoch']}/{j['epochs_run']}; task weights "
                     + ", ".join(f"{k} {v:.3g}" for k, v in j["weights"].items()))
    for t in m["tasks"]:
        how = "inferred" if t["inferred"] else "given"
        v = t["validation"]
        if j:
            fig = (f"val_acc {v['accuracy']:.4f}, val_loss {v['loss']:.4f}" if t["type"] == "classification" else
                   f"val R² {v['r2']:.4f}, MAE {v['mae']:.4g}, RMSE {v['rmse']:.4g}")
        elif t["type"] == "classification":
            fig = (f"{len(t['classes'])} classes; linear probe L2 {t['chosen']['l2']:.3g}; val_acc {v['accuracy']:.4f}, "
                   f"val_loss {v['loss']:.4f}")
        else:
            fig = f"ridge alpha {t['chosen']['alpha']:.3g}; val R² {v['r2']:.4f}, MAE {v['mae']:.4g}, RMSE {v['rmse']:.4g}"
        lines.append(f"  task {t['name']} ({t['type']}, {how}): {t['train_rows']} train / {t['val_rows']} val "
                     f"labelled rows; {fig}")
    c = m["check"]
    lines.append(f"  check: merged model == backbone + heads on {c['examples']} validation examples "
                 f"({len(c['outputs'])} outputs)")
    if report:
        lines.append("  report: " + ", ".join(str(p) for p in report.values()))
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
