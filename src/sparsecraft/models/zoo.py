"""Built-in reference models, each built from a string (``create("cnn")``), each knowing its input.

Small on purpose: they train in seconds on two CPU cores and exercise every layer type the mask
engine handles (Linear, Conv2d, residual blocks, attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.registry import MODELS


class _WithExample(nn.Module):
    """A model that can make its own example input (for FLOPs and reports)."""

    input_shape: tuple[int, ...] = ()

    def example_input(self, batch: int = 1) -> Tensor:
        return torch.randn(batch, *self.input_shape)


@MODELS.register("mlp", "MLP for 8x8 digits: 64-256-128-10")
class MLP(_WithExample):
    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (256, 128), classes: int = 10, image_shape: tuple[int, ...] = (1, 8, 8)) -> None:
        super().__init__()
        self.input_shape = tuple(image_shape)
        dims = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.classifier = nn.Linear(dims[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.classifier(x)


@MODELS.register("cnn", "small CNN for 8x8 digits (3 convs + classifier)")
class SmallCNN(_WithExample):
    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 32, image_size: int = 8) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@MODELS.register("cnn32", "small CNN for 32x32 RGB images")
def cnn32(classes: int = 10, width: int = 32) -> SmallCNN:
    return SmallCNN(in_channels=3, classes=classes, width=width, image_size=32)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet", "ResNet-8 style (3 stages of basic blocks) for 32x32 or 8x8 images")
class TinyResNet(_WithExample):
    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 16, image_size: int = 32) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    """Multi-head attention from plain Linears (so each projection is a sparsifiable layer)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@MODELS.register("transformer", "tiny decoder-only byte-level Transformer (2 blocks, d=128)")
class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def example_input(self, batch: int = 1) -> Tensor:
        return torch.randint(0, self.vocab, (batch, self.context))

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
