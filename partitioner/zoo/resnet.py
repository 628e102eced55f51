"""ResNet-18/50 in plain torch (the torchvision layout, without torchvision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    image_size: int = 224
    depths: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    bottleneck: bool = False  # False: BasicBlock (ResNet-18/34); True: Bottleneck (ResNet-50+)
    width: float = 1.0  # multiplies every channel count (64 base)
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the stem divides by 32), got {self.image_size}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be positive block counts, got {self.depths}")
        if self.width <= 0 or self.num_classes < 1:
            raise ValueError("width and num_classes must be positive")


RESNET18 = ResNetConfig()
RESNET18_TINY = ResNetConfig(image_size=64, width=0.25, num_classes=10)
RESNET50 = ResNetConfig(depths=(3, 4, 6, 3), bottleneck=True)


def _channels(base: int, width: float) -> int:
    return max(4, round(base * width))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = self.make_body(cin, width, cout, stride)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    @staticmethod
    def make_body(cin: int, width: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(conv_bn(cin, width, 3, stride), nn.ReLU(), conv_bn(width, cout, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    expansion = 4

    @staticmethod
    def make_body(cin: int, width: int, cout: int, stride: int) -> nn.Sequential:
        # torchvision's v1.5 layout: the stride sits on the 3x3 conv.
        return nn.Sequential(
            conv_bn(cin, width, 1), nn.ReLU(),
            conv_bn(width, width, 3, stride), nn.ReLU(),
            conv_bn(width, cout, 1),
        )


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        block = Bottleneck if config.bottleneck else BasicBlock
        stem = _channels(64, config.width)
        self.stem = nn.Sequential(
            conv_bn(3, stem, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)
        )
        blocks: list[nn.Module] = []
        cin = stem
        for stage, depth in enumerate(config.depths):
            width = _channels(64 * 2**stage, config.width)
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(cin, width, stride))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, config.num_classes)
        init_weights(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(image))
        return self.fc(x.mean(dim=(2, 3)))


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """He init for convs, and BatchNorm statistics that are not the identity.

    Non-trivial running statistics make the BN folding done at export worth testing. Each
    residual branch ends on a BN with a small gain so the residual sum does not grow with depth,
    which keeps the logits O(1) without any training.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.8, 1.2)
            m.bias.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            last_bn = m.body[-1][1]
            last_bn.weight.mul_(0.2)
