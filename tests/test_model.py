"""Model construction: parameter counts against hand counts, activations, init, layer layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.models import LeCunTanh, build_model, count_params, weight_matrices

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)


def mlp(**kw) -> TrainConfig:
    return TrainConfig(arch="mlp", **kw)


@pytest.mark.parametrize("cfg, shape, expected", [
    # 784*64 + 64 + 64*10 + 10
    (mlp(depth=1, width=64), MNIST, 50_890),
    # softmax regression: 784*10 + 10
    (mlp(depth=0), MNIST, 7_850),
    # batch norm replaces the hidden biases: 64*32 + 2*32 (BN) + 32*32 + 2*32 (BN) + 32*10 + 10
    (mlp(depth=2, width=32, batch_norm=True), DIGITS, 3_530),
    # conv 1->4: 4*9+4; pool 8->4; conv 4->8: 8*4*9+8; pool 4->2; fc 32->16: 512+16; out 16*10+10
    (TrainConfig(arch="cnn", conv_blocks=2, channels=4, depth=1, width=16), DIGITS, 1_034),
    # CIFAR shape: 3*16*9+16, 16*32*9+32, pool 32->16->8, fc 32*8*8 -> 64: 131072+64, out 650
    (TrainConfig(arch="cnn", conv_blocks=2, channels=16, depth=1, width=64), (3, 32, 32),
     136_874),
    # pooling stops at 1x1: 8->4->2->1, the 4th block keeps 1x1; channels 2,4,8,16
    # 2*1*9+2, 4*2*9+4, 8*4*9+8, 16*8*9+16, then out 16*10+10
    (TrainConfig(arch="cnn", conv_blocks=4, channels=2, depth=0), DIGITS, 1_730),
])
def test_parameter_counts_match_hand_counts(cfg, shape, expected):
    model = build_model(cfg, shape, 10)
    assert count_params(model) == expected
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_lecun_tanh_is_the_scaled_tanh():
    model = build_model(mlp(depth=2, width=8, activation="lecun_tanh"), DIGITS, 10)
    acts = [m for m in model if isinstance(m, LeCunTanh)]
    assert len(acts) == 2
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(acts[0](x), 1.7159 * torch.tanh(2 * x / 3))
    assert acts[0](torch.tensor(1.0)).item() == pytest.approx(1.0, abs=1e-3)  # f(1) ~ 1 by design


def test_fan_in_init_draws_weights_with_std_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    cfg = TrainConfig(arch="cnn", conv_blocks=1, channels=32, depth=1, width=512, init="fan_in")
    model = build_model(cfg, MNIST, 10)
    fan_ins = {"conv1": 1 * 3 * 3, "fc1": 32 * 14 * 14, "out": 512}
    for name, fan_in in fan_ins.items():
        layer = getattr(model, name)
        assert layer.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.1)
        assert layer.weight.mean().item() == pytest.approx(0.0, abs=0.2 / math.sqrt(fan_in))
        assert torch.count_nonzero(layer.bias) == 0


def test_default_init_is_pytorch_s_not_fan_in():
    torch.manual_seed(0)
    layer = build_model(mlp(depth=1, width=512), MNIST, 10).fc1
    # kaiming_uniform(a=sqrt(5)) gives std 1/sqrt(3 fan_in): distinguishable from fan_in init
    assert layer.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 784), rel=0.05)


@pytest.mark.parametrize("activation, cls", [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid),
                                             ("tanh", nn.Tanh), ("lecun_tanh", LeCunTanh)])
def test_activation_after_every_hidden_layer(activation, cls):
    model = build_model(mlp(depth=3, width=8, activation=activation), DIGITS, 10)
    assert sum(isinstance(m, cls) for m in model) == 3
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) for m in model)


def test_batch_norm_and_dropout_where_configured():
    model = build_model(mlp(depth=2, width=8, batch_norm=True, dropout=0.3), DIGITS, 10)
    names = [name for name, _ in model.named_children()]
    assert names == ["flatten", "fc1", "fc1_bn", "fc1_act", "fc1_drop",
                     "fc2", "fc2_bn", "fc2_act", "fc2_drop", "out"]
    assert all(m.p == 0.3 for m in model if isinstance(m, nn.Dropout))
    assert model.fc1.bias is None and model.fc2.bias is None  # BN's shift replaces the bias
    assert model.out.bias is not None


def test_cnn_uses_2d_batch_norm_and_no_conv_bias():
    cfg = TrainConfig(arch="cnn", conv_blocks=2, channels=4, depth=1, width=8, batch_norm=True)
    model = build_model(cfg, DIGITS, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model) == 1
    assert model.conv1.bias is None and model.conv2.bias is None


def test_final_layer_is_the_last_module():
    model = build_model(TrainConfig(arch="cnn", depth=2, width=8), DIGITS, 7)
    last = list(model.children())[-1]
    assert isinstance(last, nn.Linear) and last.out_features == 7
    assert last is model.out


def test_weight_matrices_are_the_linear_and_conv_kernels_only():
    cfg = TrainConfig(arch="cnn", conv_blocks=2, channels=4, depth=2, width=8, batch_norm=True)
    model = build_model(cfg, DIGITS, 10)
    weights = weight_matrices(model)
    assert list(weights) == ["conv1", "conv2", "fc1", "fc2", "out"]
    for name, w in weights.items():
        assert w is getattr(model, name).weight
    bn_and_bias = {id(p) for n, p in model.named_parameters() if "_bn." in n or n.endswith("bias")}
    assert bn_and_bias  # the model does have BN parameters and an output bias
    assert not bn_and_bias & {id(w) for w in weights.values()}
    n_weights = sum(w.numel() for w in weights.values())
    assert n_weights == 1 * 4 * 9 + 4 * 8 * 9 + 32 * 8 + 8 * 8 + 8 * 10


def test_count_params_trainable_only():
    model = build_model(mlp(depth=1, width=16), DIGITS, 10)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("out."))
    assert count_params(model) == 64 * 16 + 16 + 16 * 10 + 10
    assert count_params(model, trainable_only=True) == 16 * 10 + 10
