"""The trainer: ``train(cfg) -> TrainResult``, with one outward hook, a per-epoch callback.

Batches are index slices of preloaded tensors. Per-step bookkeeping stays on the device (no
``.item()`` per step); metrics are gathered once per epoch. The global RNG is forked, so calling
``train`` many times in one process gives the same result for the same seed, bit for bit on CPU.

    python -m pipeline.train --dataset digits --depth 1 --width 64 --l2-lambda 1e-3 \\
        --eta-min 1e-5 --eta-max 1e-1 --cycles 2
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.checkpoint import load_state_dict
from pipeline.training.data import Splits, splits_for
from pipeline.training.models import build_model, count_params, weight_matrices
from pipeline.training.schedule import lr_schedule_values  # noqa: F401  (re-exported)

EVAL_BATCH = 4096
# A conv net evaluates fastest in small batches (its activations stay in cache): on one CPU thread,
# a 16-channel, two-block CNN scores 13,100 images/s in batches of 256 against 4,500 in 4,096.
CONV_EVAL_BATCH = 256
GRAD_SAMPLES = 16  # updates per epoch on which per-layer gradient norms are measured


@dataclass(frozen=True)
class EpochRecord:
    """What the trainer knows at the end of an epoch; `step` counts optimiser updates so far."""

    epoch: int
    step: int
    metrics: dict[str, float]
    cycle_end: bool = False
    diverged: bool = False


@dataclass
class TrainResult:
    """Outcome of one run. `model` holds the weights of the best validation epoch (of the last
    epoch when there is no validation split: a train+val run; `best_val_acc` is then NaN)."""

    config: TrainConfig
    history: list[EpochRecord]
    best_val_acc: float
    best_epoch: int
    test_acc: float
    test_loss: float
    n_params: int
    train_seconds: float
    diverged: bool
    model: nn.Module = field(repr=False)
    test_pred: torch.Tensor = field(repr=False)

    def final_metrics(self) -> dict[str, float]:
        """The run-level metrics, under the names the rest of the pipeline uses."""
        last = self.history[-1].metrics if self.history else {}
        return {
            "best_val_acc": self.best_val_acc,
            "best_epoch": float(self.best_epoch),
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "final_val_acc": last.get("val_acc", float("nan")),
            "final_train_acc": last.get("train_acc", float("nan")),
            "n_params": float(self.n_params),
            "train_seconds": self.train_seconds,
            "diverged": float(self.diverged),
        }


EpochCallback = Callable[[EpochRecord], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """L2 enters the cost explicitly, except for AdamW whose decay is decoupled by design.

    AdamW gets weight_decay = 2*lambda on weight matrices only, the same pull as the gradient of
    lambda*||W||^2 would give plain SGD.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.schedule == "constant" else cfg.eta_min
    if cfg.optimizer in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if cfg.optimizer == "sgd" else cfg.momentum
        return torch.optim.SGD(params, lr=lr, momentum=momentum,
                               nesterov=cfg.optimizer == "nesterov")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    decay_ids = {id(w) for w in weight_matrices(model).values()}
    groups = [
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": 2 * cfg.l2_lambda},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Triangular cyclical LR (torch's CyclicLR) with half-cycle n_s = step_size_epochs epochs."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=cfg.eta_min, max_lr=cfg.eta_max,
        step_size_up=cfg.step_size_epochs * steps_per_epoch, mode="triangular",
        cycle_momentum=False,
    )


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Updates per epoch. A lone leftover example joins the last batch: batch norm cannot
    train on a batch of one."""
    if n_train % batch_size == 1 and n_train > batch_size:
        return n_train // batch_size
    return math.ceil(n_train / batch_size)


def l2_term(model: nn.Module) -> torch.Tensor:
    """Sum of squared entries of every weight matrix (biases and batch-norm excluded)."""
    return sum(w.pow(2).sum() for w in weight_matrices(model).values())


def _loss_stats(losses: torch.Tensor, batch_sizes: torch.Tensor, n_train: int
                ) -> tuple[float, float]:
    """The epoch's mean training loss over examples, and the standard deviation of the per-step
    (batch-mean) loss between its steps: how noisy the training signal is (NaN for one step).
    One host sync for both."""
    mean = (losses * batch_sizes).sum() / n_train
    std = losses.std() if len(losses) > 1 else torch.full_like(mean, float("nan"))
    mean, std = torch.stack([mean, std]).tolist()
    return mean, std


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = EVAL_BATCH
             ) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy and predictions, in large batches, in eval mode."""
    model.eval()
    loss, preds = torch.zeros((), device=x.device), []
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum")
        preds.append(out.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    n = max(len(y), 1)
    return loss.item() / n, (pred == y).sum().item() / n, pred


def _load_pretrained(model: nn.Module, cfg: TrainConfig) -> None:
    """Start from a checkpoint. A `transfer` setup learns a new task, so its final layer keeps
    its fresh initialisation; a bare `pretrained` loads that layer too when it fits."""
    # weights_only: a checkpoint is data, never code; a pickle with objects is refused.
    state = load_state_dict(cfg.pretrained)
    if cfg.transfer is not None:
        state = {k: v for k, v in state.items() if not k.startswith("out.")}
    own = model.state_dict()
    mismatched = [k for k, v in state.items()
                  if k in own and own[k].shape != v.shape and not k.startswith("out.")]
    if mismatched or not set(own) - {"out.weight", "out.bias"} <= set(state):
        raise ValueError(f"checkpoint {cfg.pretrained} does not fit this architecture "
                         f"(mismatched: {mismatched or 'missing layers'})")
    model.load_state_dict({k: v for k, v in state.items()
                           if k in own and own[k].shape == v.shape}, strict=False)
    if cfg.freeze == "features" or cfg.transfer == "linear_probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("out."))


def train(cfg: TrainConfig, splits: Splits | None = None,
          on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train one model as configured and return its result.

    ``on_epoch`` is called after every epoch; an exception it raises (e.g. optuna.TrialPruned)
    stops training and propagates to the caller.
    """
    if splits is None:
        splits = splits_for(cfg)
    device = resolve_device(cfg.device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            return _train(cfg, splits, device, on_epoch)
    finally:  # leave the process as we found it
        torch.set_num_threads(threads)


def _train(cfg, splits, device, on_epoch) -> TrainResult:
    started = time.perf_counter()
    x_tr, y_tr = splits.x_train.to(device), splits.y_train.to(device)
    x_val, y_val = splits.x_val.to(device), splits.y_val.to(device)
    model = build_model(cfg, splits.input_shape, splits.n_classes)
    if cfg.pretrained:
        _load_pretrained(model, cfg)
    model.to(device)
    if cfg.arch == "cnn":
        # Channels-last convolutions: 1.6 to 1.8x the images/s of the default layout on one CPU
        # thread (benchmarks/cnn_speed.py); the input follows the weights' layout.
        model.to(memory_format=torch.channels_last)
    eval_batch = CONV_EVAL_BATCH if cfg.arch == "cnn" else EVAL_BATCH
    n_train, bs = len(x_tr), cfg.batch_size
    steps_per_epoch = _steps_per_epoch(n_train, bs)
    # Each step's batch size, to weight its mean loss into the epoch's mean over examples.
    batch_sizes = torch.full((steps_per_epoch,), float(bs), device=device)
    batch_sizes[-1] = n_train - bs * (steps_per_epoch - 1)
    train_pred = torch.empty(n_train, dtype=torch.long, device=device)  # in the epoch's order
    # A per-epoch test curve is a reporting option: nothing below reads it to choose.
    test_xy = (splits.x_test.to(device), splits.y_test.to(device)) \
        if cfg.eval_test_each_epoch else None
    optimizer = make_optimizer(cfg, model)
    # A constant rate needs no scheduler: one Python call less per update.
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch) if cfg.schedule != "constant" \
        else None
    # Gradient magnitudes are sampled on about GRAD_SAMPLES updates per epoch: each sample
    # costs a few kernel launches, which would show on small models if taken every update.
    grad_every = max(1, steps_per_epoch // GRAD_SAMPLES)
    n_grad = len(range(0, steps_per_epoch, grad_every))
    weights = weight_matrices(model)
    tracked = {n: w for n, w in weights.items() if w.requires_grad}
    explicit_l2 = cfg.l2_lambda > 0 and cfg.optimizer != "adamw"
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    cycle_epochs = 2 * cfg.step_size_epochs if cfg.schedule == "cyclical" else 0

    frozen = cfg.pretrained is not None and (cfg.freeze == "features"
                                             or cfg.transfer == "linear_probe")
    has_val = len(y_val) > 0  # none in a train+val run: the last epoch is the model
    history: list[EpochRecord] = []
    best_val, best_epoch, best_state, diverged, step = -1.0, 0, None, False, 0
    for epoch in range(1, cfg.n_epochs + 1):
        model.train()
        if frozen:  # frozen features stay as loaded: batch-norm statistics and dropout included
            for name, module in model.named_children():
                module.train(name == "out")
        t0 = time.perf_counter()
        perm = torch.randperm(n_train, generator=gen).to(device)
        step_losses = []  # per-step losses stay on the device until the epoch ends
        grad_sq = torch.zeros(len(tracked), device=device)
        for k in range(steps_per_epoch):
            start, stop = k * bs, n_train if k == steps_per_epoch - 1 else (k + 1) * bs
            idx = perm[start:stop]
            xb, yb = x_tr[idx], y_tr[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            cost = loss + cfg.l2_lambda * l2_term(model) if explicit_l2 else loss
            optimizer.zero_grad(set_to_none=True)
            cost.backward()
            if k % grad_every == 0:  # per-layer squared norms, accumulated on the device
                grad_sq += torch.stack(torch._foreach_norm([w.grad for w in tracked.values()])) ** 2
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step_losses.append(loss.detach())
            # One kernel into a preallocated buffer; compared with the labels once an epoch
            # (argmax, compare, sum and add every step cost 3 % of a small MLP's epoch).
            torch.argmax(out.detach(), 1, out=train_pred[start:stop])
        step += steps_per_epoch
        correct = (train_pred == y_tr[perm]).sum()
        seconds = time.perf_counter() - t0
        train_loss, train_loss_std = _loss_stats(torch.stack(step_losses), batch_sizes, n_train)
        diverged = not math.isfinite(train_loss)
        with torch.no_grad():
            penalty = cfg.l2_lambda * float(l2_term(model)) if cfg.l2_lambda else 0.0
        metrics = {
            "train_loss": train_loss,
            "train_cost": train_loss + penalty,
            "train_acc": correct.item() / n_train,
            **({"train_loss_std": train_loss_std} if steps_per_epoch > 1 else {}),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_sec": n_train / seconds,
            "epoch_seconds": seconds,
        }
        if not diverged and has_val:
            metrics["val_loss"], metrics["val_acc"], _ = evaluate(model, x_val, y_val, eval_batch)
            metrics["val_cost"] = metrics["val_loss"] + penalty
            diverged = not math.isfinite(metrics["val_loss"])
        if test_xy is not None and not diverged:
            metrics["epoch_test_loss"], metrics["epoch_test_acc"], _ = evaluate(
                model, *test_xy, eval_batch)
        metrics |= {f"grad_norm/{n}": math.sqrt(v / n_grad)
                    for n, v in zip(tracked, grad_sq.tolist())}
        record = EpochRecord(epoch, step, metrics, bool(cycle_epochs and epoch % cycle_epochs == 0),
                             diverged)
        history.append(record)
        if not diverged and (not has_val or metrics["val_acc"] > best_val):
            best_val, best_epoch = metrics.get("val_acc", float("nan")), epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(record)
        if diverged:
            break

    # Test once, on the model chosen by validation (without validation, the last finite
    # epoch's): for reporting, never for selection.
    if best_state is not None:
        model.load_state_dict(best_state)
    test_loss, test_acc, test_pred = evaluate(model, splits.x_test.to(device),
                                              splits.y_test.to(device), eval_batch)
    if best_state is None:  # diverged before any finite epoch: there is no model to score
        test_loss = test_acc = float("nan")
    return TrainResult(
        config=cfg, history=history,
        best_val_acc=best_val if best_state is not None else float("nan"),
        best_epoch=best_epoch, test_acc=test_acc, test_loss=test_loss,
        n_params=count_params(model), train_seconds=time.perf_counter() - started,
        diverged=diverged, model=model.cpu(), test_pred=test_pred.cpu(),
    )

