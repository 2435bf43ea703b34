"""Model construction: MLPs (depth x width) and a small CNN family, plus parameter counts."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from pipeline.config import TrainConfig


class LeCunTanh(nn.Module):
    """1.7159 * tanh(2x/3): the "improved sigmoid" (LeCun et al., Efficient BackProp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "lecun_tanh": LeCunTanh}


def _hidden_block(name: str, layer: nn.Module, n: int, cfg: TrainConfig, norm,
                  dropout: float) -> list[tuple[str, nn.Module]]:
    block = [(name, layer)]
    if cfg.batch_norm:
        block.append((f"{name}_bn", norm(n)))
    block.append((f"{name}_act", ACTIVATIONS[cfg.activation]()))
    if dropout > 0:
        block.append((f"{name}_drop", nn.Dropout(dropout)))
    return block


def _fan_in_init(model: nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in), biases 0: keeps unit variance through tanh-like layers."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(cfg: TrainConfig, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """An `nn.Sequential` for the configuration: [conv blocks] -> flatten -> MLP head.

    The final layer is always the last module, so a linear probe can train it alone.
    """
    channels, height, width = input_shape
    layers: list[tuple[str, nn.Module]] = []
    if cfg.arch == "cnn":
        for i in range(1, cfg.conv_blocks + 1):
            c_out = cfg.channels * 2 ** (i - 1)
            conv = nn.Conv2d(channels, c_out, kernel_size=3, padding=1, bias=not cfg.batch_norm)
            layers += _hidden_block(f"conv{i}", conv, c_out, cfg, nn.BatchNorm2d, dropout=0.0)
            if min(height, width) >= 2:
                layers.append((f"conv{i}_pool", nn.MaxPool2d(2)))
                height, width = height // 2, width // 2
            channels = c_out
    layers.append(("flatten", nn.Flatten()))
    n_in = channels * height * width
    for i in range(1, cfg.depth + 1):
        fc = nn.Linear(n_in, cfg.width, bias=not cfg.batch_norm)
        layers += _hidden_block(f"fc{i}", fc, cfg.width, cfg, nn.BatchNorm1d, cfg.dropout)
        n_in = cfg.width
    layers.append(("out", nn.Linear(n_in, n_classes)))
    model = nn.Sequential(OrderedDict(layers))
    if cfg.init == "fan_in":
        _fan_in_init(model)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (weights, biases, batch-norm scales and shifts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights L2 applies to: Linear and Conv kernels, by layer name; never biases or BN."""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
