"""Partial fine-tuning, the second step of linear probe -> fine-tune (LP-FT): the tail's layers and the head train
together, starting from the converged head, at a small learning rate, with normalization frozen.

The features at the tail's start are computed once by ONNX Runtime and cached (memory-mapped when large); the
tail runs in torch (``tail_module.TailModule``), proven equal to ONNX Runtime on real examples before training.
Early stopping on the validation loss restores the best epoch; epoch 0 is the head-only model, so a tail that
doesn't help is left as it was.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import DataError, UsageError, ValidationError
from .metrics import PartialRecord, Scores, TailLayer

if TYPE_CHECKING:
    import onnx
    import torch

    from ..graph.cuts import Cut
    from ..graph.tail import Tail
    from .features import InputGeometry

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_LR = 1e-4  # a tenth of the AdamW head's lowest default (1e-3): the pretrained layers move gently
TRANSLATION_TOLERANCE = 1e-4  # torch tail vs ONNX Runtime, scaled by the features' magnitude
EVAL_BATCH = 256


class Rows:
    """Rows gathered from several (array, positions) parts -- the cached originals and their augmented views --
    without concatenating them: the arrays may be memory-mapped and larger than memory."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.parts = [(a, np.asarray(p, np.int64)) for a, p in parts]
        self.offsets = np.cumsum([0] + [len(p) for _, p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        out = None
        for k, (array, rows) in enumerate(self.parts):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            mask = (positions >= lo) & (positions < hi)
            if not mask.any():
                continue
            wanted = rows[positions[mask] - lo]
            order = np.argsort(wanted, kind="stable")  # read a memory map forwards
            block = np.empty((len(wanted), array.shape[1]), np.float32)
            block[order] = array[wanted[order]]
            if out is None:
                out = np.empty((len(positions), array.shape[1]), np.float32)
            out[mask] = block
        return out if out is not None else np.zeros((0, 0), np.float32)


def example_shape(model: "onnx.ModelProto", tail: "Tail", g: "InputGeometry") -> tuple[int, ...]:
    """The per-example shape of the tail's start tensor, the model's input fixed to what finetune feeds."""
    shape = tail.start_shape
    if shape is not None and len(shape) > 1 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return tuple(shape[1:])
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = list(g.dims)
    if g.kind == "image" and g.size is not None and g.layout in ("NCHW", "NHWC"):
        dims = [1, g.channels, *g.size] if g.layout == "NCHW" else [1, *g.size, g.channels]
    dims = [1] + [d if isinstance(d, int) and d > 0 else None for d in dims[1:]]
    for d, v in zip(fixed.graph.input[0].type.tensor_type.shape.dim, dims):
        if v is not None:
            d.Clear()
            d.dim_value = v
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.name == tail.start:
                found = tuple(d.dim_value if d.HasField("dim_value") else None
                              for d in v.type.tensor_type.shape.dim)
                if len(found) > 1 and all(found[1:]):
                    return tuple(int(d) for d in found[1:])
    except Exception:  # noqa: BLE001 - reported below
        pass
    raise UsageError(f"the shape of {tail.start!r} (the tail's start) can't be inferred; give --train-from a tensor "
                     f"of known shape or --image-size")


@dataclass
class PartialResult:
    module: Any  # the trained TailModule (the head-only state when it didn't help)
    head: Any  # the trained head
    improved: bool
    history: dict[str, list[float]]  # per epoch, epoch 0 (head only) first
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    lr: float
    head_only: dict[str, float]  # val_loss, val_accuracy at epoch 0
    final: dict[str, float]  # loss, accuracy, val_loss, val_accuracy of the kept epoch
    val_probabilities: np.ndarray = field(repr=False, default=None)
    translation_diff: float = 0.0
    seconds: float = 0.0
    net: Any = field(default=None, repr=False)  # the TailNet: tail + head on the tail's input
    precision: str = "fp32"  # of the training steps
    refit: bool = False  # the head refit on train + validation after the tail was chosen (refit_head)
    within_noise: bool = False  # an epoch beat the head alone, by less than one standard error: head-only kept


class TailNet:
    """tail -> the cut's pooling and flattening -> head, as one callable on cached start features."""

    def __init__(self, module, head, shape: Sequence[int], pool_axes: Sequence[int] | None):
        self.module, self.head, self.shape = module, head, tuple(shape)
        self.pool_axes = tuple(pool_axes) if pool_axes else None
        if len(self.shape) == 3:  # image maps: channels-last weights keep every activation channels-last, even after
            import torch  # a 1-channel input, whose layout torch can't tell (NCHW pooling ran 3-6x slower, measured)

            for t in [*module.parameters(), *module.buffers()]:
                if t.dim() == 4:  # same tensors (the optimizer keeps them); rank 5 has no channels-last
                    t.data = t.data.contiguous(memory_format=torch.channels_last)

    def features(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        x = x.reshape(-1, *self.shape)
        if x.dim() == 4:  # oneDNN's convolutions run channels-last without reordering (~10% per step, measured)
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.module(x)
        if self.pool_axes:
            y = y.mean(dim=self.pool_axes)
        return y.reshape(len(y), -1)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.head(self.features(x))

    def parameters(self) -> list:
        return list(self.module.parameters()) + list(self.head.parameters())

    def state(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.module.state_dict()), copy.deepcopy(self.head.state_dict())

    def load(self, state: tuple[dict, dict]) -> None:
        self.module.load_state_dict(state[0])
        self.head.load_state_dict(state[1])

    def probabilities(self, rows: Rows, positions: np.ndarray | None = None) -> np.ndarray:
        import torch

        return self._batched(rows, positions, lambda x: torch.softmax(self(x), dim=1))

    def feature_rows(self, rows: Rows) -> np.ndarray:
        """The cut's features the tail computes from these cached start features (what the head reads)."""
        return self._batched(rows, None, self.features)

    def _batched(self, rows: Rows, positions: np.ndarray | None, fn) -> np.ndarray:
        import torch

        positions = np.arange(len(rows)) if positions is None else positions
        out = []
        with torch.no_grad():
            for i in range(0, len(positions), EVAL_BATCH):
                out.append(fn(torch.from_numpy(rows.take(positions[i:i + EVAL_BATCH]))).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def training_rows(planned: "PlannedTail", by_cut: dict, by_view: dict, train_idx: np.ndarray
                  ) -> tuple[Rows, np.ndarray]:
    """(rows, labels) the tail and head train on: the training split's start features, then its augmented views'."""
    start = by_cut[planned.cut.key]
    parts, labels = [(start.features, train_idx)], [start.labels[train_idx]]
    if planned.cut.key in by_view:
        views = by_view[planned.cut.key]
        parts.append((views.features, np.arange(len(views.index))))
        labels.append(views.labels)
    return Rows(parts), np.concatenate(labels)


def refit_head(result: "PartialResult", head_only: Any, fit: Callable[..., Any], by_cut: dict, by_view: dict,
               planned: "PlannedTail", train_idx: np.ndarray, val_idx: np.ndarray) -> None:
    """The shipped head, refit on train + validation as head-only's is (fine-tuning chose the tail on validation
    with a head fitted on train only). A tail that didn't help ships ``head_only`` (the head-only model's refit
    head, so the model is head-only's exactly); a trained tail gets the probe refit at its chosen strength on the
    features it now computes. ``fit(x_train, y_train, x_val, y_val)`` returns that head."""
    from .heads import as_torch

    if not result.improved:
        result.head = result.net.head = as_torch(head_only)
        result.refit = True
        return
    start = by_cut[planned.cut.key]
    train_rows, y_train = training_rows(planned, by_cut, by_view, train_idx)
    head = fit(result.net.feature_rows(train_rows), y_train,
               result.net.feature_rows(Rows([(start.features, val_idx)])), start.labels[val_idx])
    result.head = result.net.head = as_torch(head)
    result.refit = True


def check_translation(net: TailNet, start_rows: np.ndarray, cut_rows: np.ndarray) -> float:
    """Max |torch tail - ONNX Runtime| over these examples' cut features, scaled; raises past the tolerance."""
    import torch

    with torch.no_grad():
        got = net.features(torch.from_numpy(np.ascontiguousarray(start_rows, np.float32))).numpy()
    if got.shape != cut_rows.shape:
        raise ValidationError(f"porter's torch translation of the tail gives features of shape {list(got.shape)}, "
                              f"ONNX Runtime {list(cut_rows.shape)}; give a smaller --unfreeze")
    scale = max(1.0, float(np.abs(cut_rows).max(initial=0.0)))
    diff = float(np.abs(got - cut_rows).max(initial=0.0)) / scale
    if not math.isfinite(diff) or diff > TRANSLATION_TOLERANCE:
        raise ValidationError(f"porter's torch translation of the tail differs from ONNX Runtime by {diff:.3g} "
                              f"(scaled; tolerance {TRANSLATION_TOLERANCE}); give a smaller --unfreeze or a later "
                              f"--train-from")
    return diff


def bf16_training(precision: str) -> bool:
    """Whether training steps run under bf16 autocast: ``auto`` where the CPU computes bf16 natively (AMX or
    AVX512-BF16: measured 2.5x faster on a 3x3 conv's forward + backward), fp32 elsewhere (emulated bf16 is slower).
    Weights, optimizer state and every evaluation stay fp32."""
    if precision == "auto":
        from ..runtime.session import cpu_flags

        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return precision == "bf16"


def train_tail(net: TailNet, train: Rows, y_train: np.ndarray, val: Rows, y_val: np.ndarray, *, lr: float,
               epochs: int, patience: int, batch_size: int, seed: int, class_weights: np.ndarray | None = None,
               bf16: bool = False, log: Callable[[str], None] | None = None) -> PartialResult:
    """AdamW on the tail and the head together; the best epoch by validation loss is kept (0: the head alone) if it
    beats the head alone by more than one standard error."""
    import torch

    from .train import loss_margin

    start = time.perf_counter()
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    yv = torch.from_numpy(np.asarray(y_val, np.int64))
    weight = torch.from_numpy(class_weights) if class_weights is not None else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}

    def evaluate(rows: Rows, y: torch.Tensor) -> tuple[float, float, np.ndarray]:
        p = torch.from_numpy(net.probabilities(rows))
        logp = torch.log(p.clamp_min(1e-12))
        loss = float(torch.nn.functional.nll_loss(logp, y, weight=weight))
        return loss, float((p.argmax(1) == y).float().mean()), p.numpy()

    def record(epoch: int, train_scores: tuple[float, float] | None = None) -> np.ndarray:
        """Validation loss and accuracy after the epoch; the training figures are the epoch's running mean (as
        Keras reports them: a second pass over the training rows would cost a third of the epoch again)."""
        net.module.eval()
        net.head.eval()
        tr_loss, tr_acc = train_scores if train_scores is not None else evaluate(train, yt)[:2]
        va_loss, va_acc, va_prob = evaluate(val, yv)
        for k, v in (("loss", tr_loss), ("accuracy", tr_acc), ("val_loss", va_loss), ("val_accuracy", va_acc)):
            history[k].append(v)
        if log:
            log(f"fine-tune epoch {epoch:3d}/{epochs}  loss {tr_loss:.4f}  acc {tr_acc:.4f}  val_loss {va_loss:.4f}  "
                f"val_acc {va_acc:.4f}")
        return va_prob

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        best_prob = head_only_prob = record(0)
        head_only_state = net.state()
        best_loss, best_epoch, best_state, since = history["val_loss"][0], 0, head_only_state, 0
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        n, bs = len(train), max(1, min(batch_size, len(train)))
        epoch = 0
        for epoch in range(1, epochs + 1):
            net.module.train()  # no tail layer behaves differently in training: normalization is frozen by design
            net.head.train()  # the head's dropout, if any
            perm = torch.randperm(n, generator=gen).numpy()
            total_loss = correct = 0.0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = net(torch.from_numpy(train.take(idx)))
                loss = loss_fn(logits.float(), yt[idx])
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += float((logits.argmax(1) == yt[idx]).sum())
            prob = record(epoch, (total_loss / n, correct / n))
            if not math.isfinite(history["loss"][-1]):
                raise DataError(f"partial fine-tuning diverged at epoch {epoch}; give a lower --finetune-lr")
            va_loss = history["val_loss"][-1]
            if va_loss < best_loss - max(1e-7, 1e-4 * abs(best_loss)):
                best_loss, best_epoch, best_state, best_prob, since = va_loss, epoch, net.state(), prob, 0
            else:
                since += 1
                if since >= patience:
                    break
        # the one-standard-error rule, as for cuts: on a few hundred validation examples the lowest loss of 30
        # epochs beats the head alone by chance; the tail is kept only if it is better by more than that
        margin = loss_margin(best_prob, head_only_prob, y_val)[0] if best_epoch else 0.0
        within_noise = best_epoch > 0 and margin >= 0
        if within_noise:
            best_epoch, best_state, best_prob = 0, head_only_state, head_only_prob
        net.load(best_state)
        net.module.eval()
        net.head.eval()
    final = {k: history[k][best_epoch] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    if log:
        kept = (f"kept epoch {best_epoch} (val_loss {final['val_loss']:.4f}, val_acc {final['val_accuracy']:.4f})"
                if best_epoch else
                "the best epoch beat the head alone by less than one standard error of the validation loss; kept "
                "the head-only model" if within_noise else
                "no epoch beat the head alone on validation loss; kept the head-only model")
        log(f"fine-tune: {kept}")
    return PartialResult(net.module, net.head, best_epoch > 0, history, best_epoch, epoch, epoch < epochs, lr,
                         {"val_loss": history["val_loss"][0], "val_accuracy": history["val_accuracy"][0]}, final,
                         best_prob, seconds=time.perf_counter() - start, within_noise=within_noise)


def tail_cut(tail: "Tail") -> "Cut":
    """The cut features are cached at for the tail: its start tensor, unpooled (flattened per example)."""
    from ..graph.cuts import Cut

    return Cut(tail.start, tail.start_shape, "the tail's start (partial fine-tuning)", "tail")


@dataclass
class PlannedTail:
    """A tail ready to train: where it starts and ends, its torch module, the per-example start shape."""

    tail: "Tail"
    cut: "Cut"  # where its input features are cached
    module: Any  # TailModule
    shape: tuple[int, ...]

    def describe(self) -> str:
        return self.tail.describe()


def plan_tail(model: "onnx.ModelProto", cut: "Cut", g: "InputGeometry", *, unfreeze: int = 0,
              train_from: str | None = None) -> PlannedTail:
    """Find the tail before ``cut`` and translate it to torch, before any feature is computed: an op porter
    can't train or a shape it can't infer is refused at once."""
    from ..graph.cuts import ModelGraph
    from ..graph.tail import find_tail
    from .tail_module import TailModule

    tail = find_tail(model, cut.name, unfreeze=unfreeze or None, train_from=train_from)
    batch = ModelGraph(model).batch_dim
    module = TailModule(model, tail, fixed_batch=batch if isinstance(batch, int) and batch > 0 else None)
    return PlannedTail(tail, tail_cut(tail), module, example_shape(model, tail, g))


def run_partial(planned: PlannedTail, head, cut: "Cut", by_cut: dict, by_view: dict, train_idx: np.ndarray,
                val_idx: np.ndarray, *, lr: float, epochs: int, patience: int, batch_size: int, seed: int,
                balance: bool, n_classes: int, precision: str = "auto",
                log: Callable[[str], None] | None = None) -> PartialResult:
    """Prove the torch tail equals ONNX Runtime on held-out examples, then train tail + head (``train_tail``)."""
    from .train import class_weights

    start, feats = by_cut[planned.cut.key], by_cut[cut.key]
    net = TailNet(planned.module, head, planned.shape, cut.pool_axes)
    sample = val_idx[np.unique(np.linspace(0, len(val_idx) - 1, min(len(val_idx), 16)).round().astype(np.int64))]
    diff = check_translation(net, start.features[sample], np.asarray(feats.features[sample], np.float32))
    train_rows, y_train = training_rows(planned, by_cut, by_view, train_idx)
    weights = class_weights(y_train, n_classes) if balance else None
    if log:
        t = planned.tail
        log(f"porter: fine-tuning {t.describe()} with the head: {t.trainable_parameters:,} trainable parameters, "
            f"AdamW lr {lr:g}, up to {epochs} epochs{' in bf16 autocast' if bf16_training(precision) else ''} "
            f"(torch tail == ONNX Runtime within {diff:.1g})")
    bf16 = bf16_training(precision)
    result = train_tail(net, train_rows, y_train, Rows([(start.features, val_idx)]), start.labels[val_idx], lr=lr,
                        epochs=epochs, patience=patience, batch_size=batch_size, seed=seed, class_weights=weights,
                        bf16=bf16, log=log)
    result.precision = "bf16 autocast" if bf16 else "fp32"
    result.translation_diff = diff
    result.net = net
    return result


def partial_metrics(planned: PlannedTail, r: PartialResult, views: int) -> PartialRecord:
    t = planned.tail
    return PartialRecord(
        start=t.start, start_shape=list(planned.shape), end=t.end, requested=t.requested,
        layers=tuple(TailLayer(l.node, l.op, list(l.weights), l.parameters) for l in t.layers),
        trainable_parameters=t.trainable_parameters, frozen_parameters=t.frozen_parameters,
        frozen_constants=len(t.frozen), notes=list(t.notes),
        lr=r.lr, precision=r.precision, epochs_run=r.epochs_run, best_epoch=r.best_epoch,
        stopped_early=r.stopped_early, improved=r.improved, kept="partial" if r.improved else "head-only",
        head_refit=r.refit,  # the probe refit on train + validation on the kept tail's features
        gain_within_noise=r.within_noise,
        head_only=Scores(**{k: round(v, 6) for k, v in r.head_only.items()}),
        partial=Scores(**{k: round(v, 6) for k, v in r.final.items()}),
        translation_max_scaled_diff=r.translation_diff, augmented_views=views,
        history={k: [round(float(v), 6) for v in vals] for k, vals in r.history.items()},
        seconds=round(r.seconds, 4))
