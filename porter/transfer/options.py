"""``FinetuneOptions``: every ``porter finetune`` option, its default and its check (the CLI builds one, as a
pipeline would)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..options import DEVICES, as_floats, reject_unknown
from ..spec import PRESETS

HEADS = ("linear", "mlp")  # the head architectures (heads.make_head builds them)


@dataclass(frozen=True)
class TrainConfig:
    """The head trainer's settings (``train.train_head``): the one definition of each training default. Here, not in
    ``train``, so that FinetuneOptions (which the CLI reads without numpy) takes its training keywords' defaults from
    it; ``FinetuneOptions.train_config`` maps those keywords into one of these."""

    epochs: int = 100
    batch_size: int = 32
    lr: float | None = None  # None: linear -> the L-BFGS probe; mlp -> chosen on validation from train.MLP_LR_GRID
    weight_decay: float | None = None  # linear probe: the L2 strength (None: chosen); AdamW's decay otherwise
    head: str = "linear"  # one of HEADS
    hidden: int = 256  # mlp hidden units
    dropout: float = 0.0
    patience: int = 20  # epochs without a better validation loss before stopping
    lr_patience: int = 5  # epochs without improvement before the learning rate is halved
    balance: bool = False  # class weights for imbalanced data
    seed: int = 0  # weight init, shuffling, dropout
    refit: bool = True  # linear probe: refit on train + validation at the chosen strength

    @property
    def method(self) -> str:
        """``lbfgs`` (the linear probe solved to its optimum) or ``adamw`` (stochastic, early-stopped)."""
        return "lbfgs" if self.head == "linear" and self.lr is None else "adamw"


TRAIN_DEFAULTS = TrainConfig()  # FinetuneOptions' training keywords default to these


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything ``porter finetune`` can be told; the CLI builds one of these, as a pipeline would.

    The head trainer's keywords (epochs ... seed) stay flat, as ``porter.finetune(epochs=...)`` takes them; their
    defaults are TrainConfig's and ``train_config`` maps them into one."""

    epochs: int = TRAIN_DEFAULTS.epochs  # upper bound: early stopping on the validation loss decides
    batch_size: int = TRAIN_DEFAULTS.batch_size
    lr: float | None = TRAIN_DEFAULTS.lr  # given: AdamW at this lr (and partial fine-tuning's default is lr / 10)
    weight_decay: float | None = TRAIN_DEFAULTS.weight_decay
    head: str = TRAIN_DEFAULTS.head
    hidden: int = TRAIN_DEFAULTS.hidden
    # None: 0.2 for mlp, 0.0 for linear (head_dropout): TrainConfig takes the number, so this default is the option's
    dropout: float | None = None
    patience: int = TRAIN_DEFAULTS.patience
    val_split: float = 0.2
    balance: bool = TRAIN_DEFAULTS.balance
    seed: int = TRAIN_DEFAULTS.seed  # also the validation split's and the augmented views'
    cut: str | None = None  # auto (default) | backbone | search | a tensor name (see porter.graph.cuts.plan_cuts)
    image_size: tuple[int, int] | None = None  # (H, W) for backbones without a fixed size
    preprocess: str | None = None  # raw | unit | tf | torch | caffe (default: the model's metadata)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "auto"  # options.DEVICES (backbone inference; heads train on the CPU)
    force: bool = False
    label_column: str = "label"  # CSV data
    preprocessed: bool = False  # array data that is already the model's input tensor
    feature_batch_size: int = 64
    cache: bool = True  # reuse / store backbone features
    cache_dir: str | None = None
    workers: int | None = None  # image decoding threads
    # the backbone pass on Ray Data (porter.ray): "local" (a Ray started here), "auto", HOST:PORT, ray://HOST:PORT
    ray: str | None = None
    actors: int | None = None  # its actor pool (default: one per GPU, else one per CPU of the cluster)
    progress: bool = True  # progress bar and per-epoch lines on stderr
    # partial fine-tuning (LP-FT): after the head, train it with the last layers before the cut (partial.py)
    unfreeze: int = 0  # the last N weight-carrying layers (Conv, Gemm, MatMul) before the cut
    train_from: str | None = None  # or: every layer from this tensor to the cut
    finetune_lr: float | None = None  # AdamW lr of that phase (default partial.DEFAULT_LR, or --lr / 10)
    finetune_epochs: int = 30  # upper bound; early stopping (patience) on the validation loss decides
    train_precision: str = "auto"  # partial.PRECISIONS: the tail's training steps (bf16 autocast on AMX CPUs)
    augment: tuple[str, ...] = ()  # augment.AUGMENTS: views of the training images, featurized with the rest
    views: int | None = None  # augmented views per training image (default 2 with --augment)
    memory_budget: int | None = None  # bytes of features kept in memory; more goes to a memory-mapped file
    # several targets (tables.py): a CSV / JSON Lines table with one column per task
    tasks: tuple[str, ...] = ()  # NAME[:classification|regression]; default: every non-path column of an image table
    path_column: str = "path"  # the table's image-path column
    shared_hidden: int | None = None  # a shared trainable layer before the task heads, trained jointly
    task_weights: tuple[str, ...] | dict | None = None  # NAME=W: the joint loss weights (default: 1 / initial loss)
    # int8 (porter.quantization): the fine-tuned model quantized too, calibrated on the training split, gated on
    # the validation split (top-1 agreement with fp32 within max_drop points), written beside it as NAME.int8.onnx
    int8: bool = False
    max_drop: float = 1.0
    convert_options: dict[str, Any] = field(default_factory=dict)  # for porter.convert when SOURCE isn't ONNX

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "FinetuneOptions":
        reject_unknown(cls, kwargs, "finetune")
        if kwargs.get("image_size") is not None:
            kwargs["image_size"] = _size(kwargs["image_size"])
        for name in ("mean", "std"):
            if kwargs.get(name) is not None:
                kwargs[name] = as_floats(kwargs[name], name)
        if isinstance(kwargs.get("tasks"), str):
            kwargs["tasks"] = (kwargs["tasks"],)
        elif kwargs.get("tasks") is not None:
            kwargs["tasks"] = tuple(kwargs["tasks"])
        if "augment" in kwargs:
            from .augment import parse_augment

            kwargs["augment"] = parse_augment(kwargs["augment"])
        if isinstance(kwargs.get("memory_budget"), str):
            kwargs["memory_budget"] = parse_bytes(kwargs["memory_budget"], "--memory-budget")
        opts = cls(**kwargs)
        opts.check()
        return opts

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"--epochs must be a positive integer, got {self.epochs}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        need(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay is None or self.weight_decay >= 0,
             f"--weight-decay must be 0 or more, got {self.weight_decay}")
        need(self.head in HEADS, f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        need(isinstance(self.hidden, int) and self.hidden >= 1, f"--hidden must be a positive integer, got {self.hidden}")
        need(self.dropout is None or 0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(isinstance(self.patience, int) and self.patience >= 1, f"--patience must be a positive integer, got {self.patience}")
        need(0.0 < self.val_split < 1.0, f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}")
        need(self.preprocess is None or self.preprocess in PRESETS,
             f"unknown preprocessing {self.preprocess!r}; choose one of: {', '.join(PRESETS)}")
        need(self.feature_batch_size >= 1, f"feature_batch_size must be positive, got {self.feature_batch_size}")
        # checked here, before any data is read or a source converted (the backbone runs on it much later)
        need(self.device in DEVICES, f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        need(self.workers is None or (isinstance(self.workers, int) and self.workers >= 1),
             f"--workers must be a positive integer, got {self.workers}")
        need(isinstance(self.unfreeze, int) and self.unfreeze >= 0,
             f"--unfreeze must be 0 or a positive number of layers, got {self.unfreeze}")
        need(not (self.unfreeze and self.train_from), "give --unfreeze N or --train-from TENSOR, not both")
        need(0 <= self.max_drop <= 100, f"--max-drop is points of top-1 agreement (0 to 100), got {self.max_drop}")
        need(self.finetune_lr is None or self.finetune_lr > 0, f"--finetune-lr must be positive, got {self.finetune_lr}")
        need(isinstance(self.finetune_epochs, int) and self.finetune_epochs >= 1,
             f"--finetune-epochs must be a positive integer, got {self.finetune_epochs}")
        need(self.train_precision in ("auto", "fp32", "bf16"),
             f"unknown --train-precision {self.train_precision!r}; choose one of: auto, fp32, bf16")
        need(self.shared_hidden is None or (isinstance(self.shared_hidden, int) and self.shared_hidden >= 1),
             f"--shared-hidden must be a positive number of units, got {self.shared_hidden}")
        need(self.views is None or (isinstance(self.views, int) and self.views >= 1),
             f"--views must be a positive integer, got {self.views}")
        need(self.views is None or bool(self.augment), "--views needs --augment (which transformations to apply)")
        need(self.memory_budget is None or (isinstance(self.memory_budget, int) and self.memory_budget > 0),
             f"--memory-budget must be a positive size, got {self.memory_budget}")
        need(self.actors is None or (isinstance(self.actors, int) and self.actors >= 1),
             f"--actors must be a positive integer, got {self.actors}")
        need(self.actors is None or self.ray is not None, "--actors sizes the Ray actor pool; give it with --ray")
        if self.ray is not None:
            from ..ray.cluster import check_address

            check_address(self.ray)

    @property
    def partial(self) -> bool:
        """Partial fine-tuning asked for (``--unfreeze N`` with N >= 1, or ``--train-from``)."""
        return bool(self.unfreeze or self.train_from)

    @property
    def view_count(self) -> int:
        return (self.views or 2) if self.augment else 0

    @property
    def tail_lr(self) -> float:
        from .partial import DEFAULT_LR

        return self.finetune_lr or (self.lr / 10 if self.lr else DEFAULT_LR)

    @property
    def head_dropout(self) -> float:
        return self.dropout if self.dropout is not None else (0.2 if self.head == "mlp" else 0.0)

    @property
    def train_config(self) -> TrainConfig:
        """The head trainer's settings, made in this one place from these options."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           head=self.head, hidden=self.hidden, dropout=self.head_dropout, patience=self.patience,
                           balance=self.balance, seed=self.seed)


def parse_bytes(value: str, what: str) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``1000000`` -> bytes."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        size = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a size; give bytes or a number with K, M or G (e.g. 2G)") from None
    if not size > 0 or size != size:
        raise UsageError(f"{what} must be a positive size, got {value!r}")
    return int(size)


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.replace("x", ",").split(",")
    elif isinstance(value, int):
        parts = [value, value]
    else:
        parts = list(value)
    try:
        size = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"bad image size {value!r}: expected H,W such as 224,224") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) <= 0:
        raise UsageError(f"bad image size {value!r}: expected two positive integers H,W such as 224,224")
    return size  # type: ignore[return-value]
