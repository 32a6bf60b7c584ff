"""Teacher/student networks used across reta_fast: ResNet-18 (ImageNet or CIFAR stem), ConvNet-BN.

Written here rather than taken from torchvision so the package has no torchvision dependency; the
ImageNet-stem ResNet-18 has torchvision's parameter names and shapes, so its weights load as is.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet18", "convnet_bn"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False, in_channels: int = 3):
        super().__init__()
        if cifar_stem:  # 3x3 stride-1 stem, no max-pool (docs/method.md §1)
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(_Block(cin, w, stride), _Block(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (global-average-pooled) features ``[N, 512]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(num_classes: int = 1000, cifar_stem: bool = False, in_channels: int = 3) -> ResNet18:
    """ResNet-18; ``cifar_stem=True`` for 32-64 px data sets."""
    return ResNet18(num_classes, cifar_stem, in_channels)


class ConvNetBN(nn.Module):
    """Small ConvNet with BatchNorm (depth x [conv3x3-BN-ReLU-avgpool2]) for quick runs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, depth: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def convnet_bn(num_classes: int = 10, in_channels: int = 3, width: int = 64, depth: int = 3) -> ConvNetBN:
    return ConvNetBN(num_classes, in_channels, width, depth)
