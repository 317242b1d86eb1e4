"""The notes' networks: linear/logistic regression, MLP, LeNet, a small GoogLeNet (Inception) and a CIFAR-style ResNet.

Every constructor takes `input_shape` and `num_outputs` from the dataset config, so any model runs on any
dataset whose input it can take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlrun.core.errors import UsageError


def image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UsageError(
            f"model {name} needs image input (channels, height, width) but the dataset gives shape "
            f"{list(input_shape)}; "
            "use model=linear or model=mlp for tabular data"
        )
    return tuple(input_shape)


class Linear(nn.Sequential):
    """Linear / logistic regression: one affine map of the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int):
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


class MLP(nn.Sequential):
    def __init__(
        self, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class LeNet(nn.Module):
    """Two conv + BN + ReLU + max-pool blocks, then a two-layer classifier head."""

    def __init__(
        self, input_shape, num_outputs, channels: Sequence[int] = (32, 64), hidden: int = 128, dropout: float = 0.2
    ):
        super().__init__()
        c, h, w = image_shape("lenet", input_shape)
        if h < 4 or w < 4:
            raise UsageError(f"model lenet needs images of at least 4x4 pixels, the dataset gives {h}x{w}")
        self.features = nn.Sequential(
            conv_bn_relu(c, channels[0]),
            nn.MaxPool2d(2),
            conv_bn_relu(channels[0], channels[1]),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[1] * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, x):
        return self.head(self.features(x))


class Inception(nn.Module):
    """The notes' Inception block: four parallel branches concatenated along channels."""

    def __init__(self, cin: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], cpool: int):
        super().__init__()
        self.branch1 = conv_bn_relu(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, c3[0], 1), conv_bn_relu(c3[0], c3[1], 3))
        self.branch5 = nn.Sequential(conv_bn_relu(cin, c5[0], 1), conv_bn_relu(c5[0], c5[1], 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, cpool, 1))
        self.out_channels = c1 + c3[1] + c5[1] + cpool

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class GoogLeNet(nn.Module):
    """A small GoogLeNet: conv stem, two Inception blocks, pool, two more, global average pool, linear head."""

    def __init__(self, input_shape, num_outputs, width: int = 16):
        super().__init__()
        c, _, _ = image_shape("googlenet", input_shape)
        u = width
        blocks = [Inception(2 * u, u, (u, 2 * u), (u // 4, u // 2), u // 2)]
        blocks.append(Inception(blocks[-1].out_channels, 2 * u, (2 * u, 3 * u), (u // 2, u), u))
        down = nn.MaxPool2d(3, 2, 1)
        blocks.append(Inception(blocks[-1].out_channels, 3 * u, (2 * u, 4 * u), (u // 2, u), u))
        blocks.append(Inception(blocks[-1].out_channels, 4 * u, (3 * u, 5 * u), (u, 2 * u), 2 * u))
        self.stem = conv_bn_relu(c, 2 * u)
        self.stage1 = nn.Sequential(blocks[0], blocks[1])
        self.stage2 = nn.Sequential(down, blocks[2], blocks[3])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(blocks[3].out_channels, num_outputs))

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))))


class Residual(nn.Module):
    """The notes' residual block: two 3x3 convs with BN, plus a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()  # separate ReLU modules: PT2E quantizers annotate each use separately
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, three stages of residual blocks (stride 1, 2, 2), GAP, linear head."""

    def __init__(self, input_shape, num_outputs, widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1):
        super().__init__()
        c, _, _ = image_shape("resnet", input_shape)
        layers: list[nn.Module] = [conv_bn_relu(c, widths[0])]
        cin = widths[0]
        for stage, cout in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(Residual(cin, cout, stride=2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_outputs)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))
