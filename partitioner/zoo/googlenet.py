"""GoogLeNet (Inception v1) in plain torch, with BatchNorm like torchvision's version.

Unlike torchvision, the third branch uses a 5x5 conv as in the paper (torchvision kept a 3x3 by
mistake). Auxiliary classifiers are training-only and left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from partitioner.zoo.resnet import init_weights

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per Inception block, from the paper's table 1;
# None marks the max-pools between groups.
_BLOCKS: tuple[tuple[int, ...] | None, ...] = (
    (64, 96, 128, 16, 32, 32),  # 3a
    (128, 128, 192, 32, 96, 64),  # 3b
    None,
    (192, 96, 208, 16, 48, 64),  # 4a
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),  # 4e
    None,
    (256, 160, 320, 32, 128, 128),  # 5a
    (384, 192, 384, 48, 128, 128),  # 5b
)


@dataclass(frozen=True)
class GoogLeNetConfig:
    image_size: int = 224
    width: float = 1.0  # multiplies every channel count
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the net divides by 32), got {self.image_size}")
        if self.width <= 0 or self.num_classes < 1:
            raise ValueError("width and num_classes must be positive")


TINY = GoogLeNetConfig(image_size=64, width=0.125, num_classes=10)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout, eps=1e-3),
        nn.ReLU(),
    )


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, c3r, 1), conv_bn_relu(c3r, c3, 3))
        self.branch5 = nn.Sequential(conv_bn_relu(cin, c5r, 1), conv_bn_relu(c5r, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), conv_bn_relu(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([b(x) for b in branches], dim=1)


class GoogLeNet(nn.Module):
    def __init__(self, config: GoogLeNetConfig) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(2, round(c * config.width))

        self.stem = nn.Sequential(
            conv_bn_relu(3, ch(64), 7, 2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            conv_bn_relu(ch(64), ch(64), 1),
            conv_bn_relu(ch(64), ch(192), 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        layers: list[nn.Module] = []
        cin = ch(192)
        for spec in _BLOCKS:
            if spec is None:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            block = Inception(cin, *(ch(c) for c in spec))
            layers.append(block)
            cin = block.out_channels
        self.inception = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, config.num_classes)
        init_weights(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.inception(self.stem(image))
        return self.fc(x.mean(dim=(2, 3)))
