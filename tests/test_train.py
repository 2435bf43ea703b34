"""The trainer, checked against oracles: the cyclical-LR formula, a hand-computed L2 term and
gradient, reruns with the same seed, and the global RNG it must leave alone."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.config import TrainConfig
from pipeline.training.models import build_model, count_params, weight_matrices
from pipeline.training.trainer import evaluate, l2_term, make_optimizer, make_scheduler, train

TINY = dict(depth=1, width=16)  # a digits run of this size trains in well under a second


def constant(**kw) -> TrainConfig:
    return TrainConfig(schedule="constant", **{**TINY, **kw})


def steps_per_epoch(splits, batch_size=100) -> int:
    return math.ceil(len(splits.x_train) / batch_size)


def triangular_lr(t: int, n_s: int, eta_min: float, eta_max: float) -> float:
    """Smith (2017), triangular policy, with cycle l = t // (2 n_s)."""
    lo = t // (2 * n_s)
    if t <= (2 * lo + 1) * n_s:
        return eta_min + (t - 2 * lo * n_s) / n_s * (eta_max - eta_min)
    return eta_max - (t - (2 * lo + 1) * n_s) / n_s * (eta_max - eta_min)


def without_timing(history):
    return [(r.epoch, r.step, r.cycle_end, r.diverged,
             {k: v for k, v in r.metrics.items() if k not in ("samples_per_sec", "epoch_seconds")})
            for r in history]


# -- learning-rate schedule ----------------------------------------------------------------------


def test_make_scheduler_follows_the_triangular_formula_at_every_update():
    cfg = TrainConfig(eta_min=1e-3, eta_max=0.1, step_size_epochs=2, cycles=3)
    per_epoch = 5
    n_s = cfg.step_size_epochs * per_epoch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.eta_min)
    scheduler = make_scheduler(cfg, optimizer, per_epoch)
    for t in range(2 * n_s * cfg.cycles):
        lr = optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(triangular_lr(t, n_s, cfg.eta_min, cfg.eta_max), rel=1e-9), t
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.eta_min, rel=1e-9)


def record_lrs(run):
    """The learning rate of every optimiser update made while `run()` executes."""
    lrs = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        result = run()
    finally:
        handle.remove()
    return lrs, result


def test_train_uses_the_triangular_lr_at_every_update(digits):
    cfg = TrainConfig(eta_min=1e-4, eta_max=0.2, step_size_epochs=1, cycles=2, **TINY)
    lrs, result = record_lrs(lambda: train(cfg, digits))
    n_s = cfg.step_size_epochs * steps_per_epoch(digits)
    assert len(lrs) == 2 * n_s * cfg.cycles == result.history[-1].step
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(triangular_lr(t, n_s, cfg.eta_min, cfg.eta_max), rel=1e-9), t
    assert max(lrs) == pytest.approx(cfg.eta_max)


def test_constant_schedule_keeps_lr(digits):
    cfg = constant(lr=0.03, epochs=2)
    lrs, result = record_lrs(lambda: train(cfg, digits))
    assert len(lrs) == 2 * steps_per_epoch(digits) == result.history[-1].step
    assert set(lrs) == {0.03}
    assert all(r.metrics["lr"] == 0.03 for r in result.history)


# -- L2 ---------------------------------------------------------------------------------------


def test_l2_term_is_the_sum_of_squared_weight_matrices_only():
    torch.manual_seed(0)
    model = build_model(TrainConfig(depth=2, width=8, batch_norm=True), (1, 8, 8), 10)
    by_hand = sum(float((w.detach() ** 2).sum()) for w in (model.fc1.weight, model.fc2.weight,
                                                           model.out.weight))
    everything = sum(float((p.detach() ** 2).sum()) for p in model.parameters())
    assert l2_term(model).item() == pytest.approx(by_hand, rel=1e-6)
    assert everything > by_hand + 1  # BN scales (1.0 each) would show if they were counted


def test_train_cost_is_loss_plus_lambda_times_l2(digits):
    lam = 0.01
    cfg = constant(depth=2, batch_norm=True, lr=0.05, epochs=1, l2_lambda=lam)
    result = train(cfg, digits)
    m = result.model  # one epoch: the best-validation weights are the end-of-epoch weights
    by_hand = lam * sum(float((w.detach() ** 2).sum()) for w in (m.fc1.weight, m.fc2.weight,
                                                                 m.out.weight))
    metrics = result.history[0].metrics
    assert by_hand > 1e-3
    assert metrics["train_cost"] - metrics["train_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["val_cost"] - metrics["val_loss"] == pytest.approx(by_hand, rel=1e-5)


def test_sgd_step_follows_loss_gradient_plus_two_lambda_w(digits):
    """One full-batch SGD step from the same initial weights, computed by hand."""
    lam, lr = 0.05, 0.1
    cfg = constant(lr=lr, epochs=1, batch_size=len(digits.x_train) + 1, l2_lambda=lam, seed=3)
    torch.manual_seed(cfg.seed)  # the trainer seeds, then builds the model first
    start = build_model(cfg, digits.input_shape, digits.n_classes)
    names = [n for n, _ in start.named_parameters()]
    loss = F.cross_entropy(start(digits.x_train), digits.y_train)
    grads = dict(zip(names, torch.autograd.grad(loss, list(start.parameters()))))
    matrices = {f"{n}.weight" for n in weight_matrices(start)}

    result = train(cfg, digits)

    after = dict(result.model.named_parameters())
    for name, w0 in start.named_parameters():
        w0 = w0.detach()
        pull = 2 * lam * w0 if name in matrices else torch.zeros_like(w0)
        torch.testing.assert_close(after[name].detach(), w0 - lr * (grads[name] + pull),
                                   atol=1e-6, rtol=1e-5)
        if name in matrices:  # the L2 part is large enough for the check to see it
            assert not torch.allclose(after[name], w0 - lr * grads[name], atol=1e-5)
    # The logged gradient magnitude is that of the cost, for the one update made.
    g_fc1 = grads["fc1.weight"] + 2 * lam * start.fc1.weight.detach()
    assert result.history[0].metrics["grad_norm/fc1"] == pytest.approx(g_fc1.norm().item(),
                                                                        rel=1e-4)


def test_adamw_decays_weight_matrices_only_with_two_lambda():
    model = build_model(TrainConfig(depth=2, width=8, batch_norm=True), (1, 8, 8), 10)
    optimizer = make_optimizer(TrainConfig(optimizer="adamw", l2_lambda=0.003), model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    matrices = {id(w) for w in weight_matrices(model).values()}
    assert set(decay) == {id(p) for p in model.parameters()}
    assert all(decay[i] == pytest.approx(0.006) for i in matrices)
    assert all(d == 0.0 for i, d in decay.items() if i not in matrices)


# -- determinism and isolation ---------------------------------------------------------------------


def test_same_seed_gives_identical_runs_and_another_seed_does_not(digits):
    cfg = TrainConfig(cycles=1, step_size_epochs=1, dropout=0.2, seed=7, **TINY)
    a, b = train(cfg, digits), train(cfg, digits)
    assert without_timing(a.history) == without_timing(b.history)
    assert (a.best_val_acc, a.test_acc, a.test_loss) == (b.best_val_acc, b.test_acc, b.test_loss)
    assert torch.equal(a.test_pred, b.test_pred)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name

    c = train(cfg.model_copy(update={"seed": 8}), digits)
    assert without_timing(c.history) != without_timing(a.history)
    assert not torch.equal(c.model.fc1.weight, a.model.fc1.weight)


def test_train_loads_the_configured_splits_itself(digits):
    cfg = TrainConfig(cycles=1, step_size_epochs=1, **TINY)
    assert without_timing(train(cfg).history) == without_timing(train(cfg, digits).history)


def test_train_leaves_global_rng_and_threads_alone(digits):
    threads = torch.get_num_threads()

    def draws():
        return torch.rand(4), np.random.rand(3), random.random()

    def seed_all():
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)

    seed_all()
    train(TrainConfig(cycles=1, step_size_epochs=1, dropout=0.1, **TINY), digits)
    after_train = draws()
    seed_all()
    untouched = draws()
    assert torch.equal(after_train[0], untouched[0])
    np.testing.assert_array_equal(after_train[1], untouched[1])
    assert after_train[2] == untouched[2]
    assert torch.get_num_threads() == threads


# -- divergence ------------------------------------------------------------------------------------


def test_divergence_stops_training_without_a_crash(digits):
    # lr * 2 * lambda = 200: each update multiplies the weights by about -199, so they overflow
    # to inf within the first epoch.
    cfg = constant(lr=10.0, l2_lambda=10.0, epochs=5)
    seen = []
    result = train(cfg, digits, on_epoch=seen.append)
    assert result.diverged and result.history[-1].diverged
    assert len(result.history) < cfg.n_epochs
    assert seen == result.history  # the callback hears about it too
    assert not math.isfinite(result.history[-1].metrics["train_loss"])
    assert math.isnan(result.best_val_acc)  # no finite epoch: nothing to call a score
    assert result.final_metrics()["diverged"] == 1.0


def test_divergence_after_a_finite_epoch_keeps_that_epoch_as_best(digits):
    cfg = constant(lr=1.0, l2_lambda=10.0, epochs=5)  # factor -19 per update: overflow in epoch 2
    result = train(cfg, digits)
    assert result.diverged and 1 < len(result.history) < cfg.n_epochs
    finite = [r for r in result.history if not r.diverged]
    assert result.best_val_acc == max(r.metrics["val_acc"] for r in finite)
    best = result.history[result.best_epoch - 1]
    assert not best.diverged and best.metrics["val_acc"] == result.best_val_acc


# -- the per-epoch callback ------------------------------------------------------------------------


def test_callback_once_per_epoch_with_steps_and_cycle_ends(digits):
    cfg = TrainConfig(step_size_epochs=1, cycles=2, **TINY)
    seen = []
    result = train(cfg, digits, on_epoch=seen.append)
    per_epoch = steps_per_epoch(digits)
    assert [r.epoch for r in seen] == [1, 2, 3, 4]
    assert [r.step for r in seen] == [per_epoch * e for e in (1, 2, 3, 4)]
    assert [r.cycle_end for r in seen] == [False, True, False, True]
    assert seen == result.history


def test_exception_in_callback_stops_training_and_propagates(digits):
    class Pruned(Exception):
        pass

    calls = []

    def on_epoch(record):
        calls.append(record.epoch)
        if record.epoch == 2:
            raise Pruned

    torch.manual_seed(99)
    with pytest.raises(Pruned):
        train(constant(epochs=5), digits, on_epoch=on_epoch)
    assert calls == [1, 2]
    expected = torch.rand(3)
    torch.manual_seed(99)
    assert torch.equal(torch.rand(3), expected)  # RNG restored on the way out too


# -- optimisers, metrics, results ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("momentum", 0.05), ("nesterov", 0.05),
                                           ("adam", 0.01), ("adamw", 0.01)])
def test_every_optimizer_learns(digits, optimizer, lr):
    result = train(constant(optimizer=optimizer, lr=lr, epochs=3, l2_lambda=1e-4), digits)
    assert not result.diverged
    assert result.best_val_acc > 0.5  # chance is 0.1
    assert result.history[-1].metrics["train_loss"] < result.history[0].metrics["train_loss"]


def test_epoch_metrics_are_named_and_sane(digits):
    cfg = TrainConfig(arch="cnn", conv_blocks=1, channels=4, depth=1, width=8,
                      schedule="constant", lr=0.05, epochs=1)
    result = train(cfg, digits)
    metrics = result.history[0].metrics
    expected_layers = {f"grad_norm/{name}" for name in weight_matrices(result.model)}
    assert expected_layers == {"grad_norm/conv1", "grad_norm/fc1", "grad_norm/out"}
    assert {"train_loss", "train_cost", "train_acc", "val_loss", "val_acc", "lr",
            "samples_per_sec"} | expected_layers <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(metrics[k] > 0 for k in expected_layers | {"samples_per_sec", "train_loss"})
    assert 0 <= metrics["train_acc"] <= 1 and 0 <= metrics["val_acc"] <= 1
    assert metrics["lr"] == 0.05


def test_train_accuracy_counts_every_training_example_once_per_epoch(digits):
    # A rate too small to change any prediction: each epoch's training accuracy must then be
    # the model's accuracy on the whole training split, the irregular last batch included.
    batch_size = 97
    assert len(digits.x_train) % batch_size not in (0, 1)
    result = train(constant(lr=1e-12, epochs=2, batch_size=batch_size), digits)
    loss, acc, _ = evaluate(result.model, digits.x_train, digits.y_train)
    for record in result.history:
        assert record.metrics["train_acc"] == acc
        assert record.metrics["train_loss"] == pytest.approx(loss, rel=1e-5)


def test_final_metrics(digits):
    result = train(constant(lr=0.1, epochs=2), digits)
    final = result.final_metrics()
    assert {"best_val_acc", "test_acc", "n_params", "train_seconds"} <= set(final)
    assert final["n_params"] == count_params(result.model) == 64 * 16 + 16 + 16 * 10 + 10
    assert final["best_val_acc"] == max(r.metrics["val_acc"] for r in result.history)
    assert final["train_seconds"] > 0
    assert final["diverged"] == 0.0


def test_test_accuracy_is_that_of_the_best_validation_epoch(digits):
    # A high constant lr makes validation accuracy jump around, so that it peaks before the last
    # epoch (seen here with seed 0: epoch 5 of 6); the first such seed is used.
    for seed in range(5):
        result = train(constant(lr=1.0, epochs=6, seed=seed), digits)
        val_accs = [r.metrics["val_acc"] for r in result.history]
        if val_accs[-1] < max(val_accs):
            break
    assert val_accs[-1] < max(val_accs), "premise: the best epoch is not the last"
    assert result.best_val_acc == max(val_accs) == val_accs[result.best_epoch - 1]
    _, val_acc, _ = evaluate(result.model, digits.x_val, digits.y_val)
    assert val_acc == result.best_val_acc
    _, test_acc, test_pred = evaluate(result.model, digits.x_test, digits.y_test)
    assert test_acc == result.test_acc
    assert torch.equal(test_pred, result.test_pred)


def test_batch_norm_with_a_last_batch_of_one(digits):
    """A batch size that leaves one example over must not crash a batch-norm model (BatchNorm1d
    refuses a training batch of 1); a search samples batch sizes freely."""
    batch_size = next(b for b in range(2, 200) if len(digits.x_train) % b == 1)
    result = train(constant(batch_norm=True, epochs=1, lr=0.05, batch_size=batch_size), digits)
    assert not result.diverged
    assert result.best_val_acc > 0.1


def test_pretrained_features_frozen_trains_only_the_last_layer(digits, tmp_path):
    base = train(constant(lr=0.1, epochs=1), digits)
    path = tmp_path / "state_dict.pt"
    torch.save(base.model.state_dict(), path)
    probe = train(constant(lr=0.1, epochs=1, seed=5, pretrained=str(path), freeze="features"),
                  digits)
    assert torch.equal(probe.model.fc1.weight, base.model.fc1.weight)
    assert torch.equal(probe.model.fc1.bias, base.model.fc1.bias)
    assert not torch.equal(probe.model.out.weight, base.model.out.weight)
    assert set(probe.history[0].metrics) >= {"grad_norm/out"}
    assert "grad_norm/fc1" not in probe.history[0].metrics


def test_pretrained_of_another_architecture_is_refused(digits, tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save(build_model(constant(width=32), digits.input_shape, 10).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        train(constant(pretrained=str(path)), digits)


@pytest.mark.parametrize("steps_per_epoch,step_size_epochs,cycles",
                         [(7, 2, 3), (12, 1, 1), (5, 3, 2)])
def test_closed_form_schedule_matches_torch_cycliclr(steps_per_epoch, step_size_epochs, cycles):
    """The reports draw the schedule without torch; it must be the one training used."""
    from pipeline.training.schedule import lr_schedule_values

    cfg = TrainConfig(eta_min=1e-5, eta_max=0.3, step_size_epochs=step_size_epochs, cycles=cycles)
    steps, lrs = lr_schedule_values(cfg, steps_per_epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    expected = []
    for _ in steps:
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert len(steps) == 2 * step_size_epochs * steps_per_epoch * cycles
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(lrs) == pytest.approx(0.3) and min(lrs) == pytest.approx(1e-5)


def test_threads_setting_applies_during_the_run_and_is_restored(digits):
    before = torch.get_num_threads()
    seen = []
    cfg = TrainConfig(depth=1, width=16, cycles=1, step_size_epochs=1, threads=1)
    train(cfg, digits, on_epoch=lambda rec: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_a_conv_net_trains_channels_last_and_scores_the_same_in_any_batch_size():
    """Conv nets train in the channels-last layout (faster on CPU: benchmarks/cnn_speed.py) and
    are evaluated in small batches; the batch size of evaluation changes no prediction."""
    cfg = TrainConfig(arch="cnn", conv_blocks=2, channels=4, depth=1, width=16, schedule="constant",
                      epochs=1, batch_size=64, threads=1, seed=0)
    result = train(cfg)
    # (a one-channel input's weights are laid out alike either way)
    convs = [m for m in result.model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         and not m.weight.is_contiguous() for m in convs)
    from pipeline.training.data import load_splits

    splits = load_splits("digits")
    small = evaluate(result.model, splits.x_test, splits.y_test, 7)
    large = evaluate(result.model, splits.x_test, splits.y_test, 4096)
    assert torch.equal(small[2], large[2]) and small[1] == large[1] == result.test_acc
    assert small[0] == pytest.approx(large[0], rel=1e-5)
