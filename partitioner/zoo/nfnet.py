"""Normalizer-free ResNet in the NFNet-F0 shape (Brock et al. 2021), in plain torch.

No BatchNorm: signal propagation is kept in check by scaled weight standardisation, scaled
activations and residual blocks ``x + alpha * skip_gain * f(x / beta)``, where ``beta`` is the
expected std of ``x`` (analytically tracked, reset at every transition block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Gammas that make each activation variance-preserving for unit Gaussian inputs (from the paper).
ACTIVATION_GAMMA = {"gelu": 1.7015043497085617, "relu": 1.7139588594436646}


@dataclass(frozen=True)
class NFNetConfig:
    image_size: int = 224
    depths: tuple[int, ...] = (1, 2, 6, 3)  # F0; F1 doubles these, F2 triples...
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    stem_width: int = 128
    group_width: int = 128  # channels per group of the 3x3 convs
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5  # 0 turns squeeze-excite off
    alpha: float = 0.2
    skip_gain: float = 0.5  # the paper inits it to 0; non-zero so the random model is not identity
    activation: str = "gelu"
    final_expansion: float = 2.0
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the net divides by 32), got {self.image_size}")
        if len(self.depths) != len(self.widths) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths {self.depths} and widths {self.widths} must pair up, all positive")
        if self.activation not in ACTIVATION_GAMMA:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_GAMMA)}, got {self.activation!r}")
        if min(self.widths) < 1 or self.group_width < 1 or self.stem_width < 8:
            raise ValueError("widths and group_width must be positive, stem_width at least 8")


TINY = NFNetConfig(
    image_size=32, depths=(1, 1, 1, 1), widths=(16, 32, 48, 48), stem_width=16, group_width=8,
    num_classes=10,
)


class WSConv2d(nn.Conv2d):
    """Conv with scaled weight standardisation, recomputed from the raw weight in ``forward``.

    W_hat = gain * (W - mean) / (std * sqrt(fan_in)). Depending only on parameters, the whole
    standardisation is constant-folded away at ONNX export.
    """

    def __init__(self, *args, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.eps = eps
        nn.init.normal_(self.weight)
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * self.gain
        return (self.weight - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class ScaledActivation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.gamma = ACTIVATION_GAMMA[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(x) if self.name == "gelu" else F.relu(x)
        return y * self.gamma


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
        # 2 * sigmoid keeps the expected gain at 1, as in the paper.
        return x * (2.0 * torch.sigmoid(self.fc2(s)))


class NFBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, beta: float, config: NFNetConfig
    ) -> None:
        super().__init__()
        width = max(1, int(cout * config.bottleneck_ratio))
        groups = max(1, width // config.group_width)
        width = groups * max(1, width // groups)  # a multiple of the group count
        self.act = ScaledActivation(config.activation)
        self.beta = beta
        self.alpha = config.alpha
        self.transition = stride != 1 or cin != cout
        self.shortcut = (
            nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(), WSConv2d(cin, cout, 1)
            )
            if self.transition
            else nn.Identity()
        )
        self.conv0 = WSConv2d(cin, width, 1)
        self.conv1 = WSConv2d(width, width, 3, stride, padding=1, groups=groups)
        self.conv1b = WSConv2d(width, width, 3, padding=1, groups=groups)
        self.conv2 = WSConv2d(width, cout, 1)
        self.se = SqueezeExcite(cout, config.se_ratio) if config.se_ratio > 0 else nn.Identity()
        self.skip_gain = nn.Parameter(torch.tensor(config.skip_gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x) * (1.0 / self.beta)
        # A transition block's shortcut starts from the normalised input, the others from x.
        shortcut = self.shortcut(out) if self.transition else x
        out = self.act(self.conv0(out))
        out = self.act(self.conv1(out))
        out = self.act(self.conv1b(out))
        out = self.se(self.conv2(out))
        return shortcut + out * (self.skip_gain * self.alpha)


class NFNet(nn.Module):
    def __init__(self, config: NFNetConfig) -> None:
        super().__init__()
        act = ScaledActivation(config.activation)
        s = config.stem_width
        self.stem = nn.Sequential(
            WSConv2d(3, s // 8, 3, 2, padding=1), act,
            WSConv2d(s // 8, s // 4, 3, padding=1), act,
            WSConv2d(s // 4, s // 2, 3, padding=1), act,
            WSConv2d(s // 2, s, 3, 2, padding=1),
        )
        blocks: list[nn.Module] = []
        cin = s
        expected_std = 1.0
        for stage, (depth, cout) in enumerate(zip(config.depths, config.widths, strict=True)):
            for i in range(depth):
                stride = 2 if i == 0 and stage > 0 else 1
                blocks.append(NFBlock(cin, cout, stride, expected_std, config))
                cin = cout
                # A transition block resets the variance; every block then adds alpha^2 to it.
                expected_std = math.sqrt((1.0 if i == 0 else expected_std**2) + config.alpha**2)
        self.blocks = nn.Sequential(*blocks)
        final = int(cin * config.final_expansion)
        self.final_conv = WSConv2d(cin, final, 1)
        self.final_act = act
        self.fc = nn.Linear(final, config.num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.final_act(self.final_conv(self.blocks(self.stem(image))))
        return self.fc(x.mean(dim=(2, 3)))
