"""Small models built in the tests (no downloads), each from a fixed seed.

Fixtures hand out *factories* (``make_mlp(seed=0)``) so a test can build two identical models, or
two different ones, without reaching into global RNG state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# The tests use tiny tensors: one intra-op thread avoids the thread hand-off that makes each
# backward pass ~15x slower on a loaded 2-core machine (measured: 16 ms vs 1 ms per MLP step).
torch.set_num_threads(1)


class TinyMLP(nn.Module):
    """16 -> 32 -> 32 -> 8; every input dim divisible by 4, 8 and 16, every side by 4 (N:M, blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """Conv2d(3->8) -> Conv2d(8->16) -> pool -> Linear(16->10), on (N, 3, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyConvND(nn.Module):
    """Conv1d and Conv3d side by side, plus a Linear head and an Embedding (not selected by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv1d = nn.Conv1d(4, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(4, 8, 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x1: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        a = self.conv1d(x1).mean(dim=-1)
        b = self.conv3d(x3).mean(dim=(-3, -2, -1))
        return self.head(torch.cat([a, b], dim=1))


def _seeded(cls):
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return cls()

    return make


@pytest.fixture
def make_mlp():
    return _seeded(TinyMLP)


@pytest.fixture
def make_cnn():
    return _seeded(TinyCNN)


@pytest.fixture
def make_convnd():
    return _seeded(TinyConvND)


@pytest.fixture
def mlp_batch():
    """A fixed classification batch for TinyMLP: (x, y)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(24, 16, generator=g), torch.randint(0, 8, (24,), generator=g)


@pytest.fixture
def cnn_batch():
    g = torch.Generator().manual_seed(4321)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.fixture
def convnd_batch():
    g = torch.Generator().manual_seed(99)
    return torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 3, 3, 3, generator=g)


@pytest.fixture
def lm_dir(tmp_path):
    """Factory: a tiny random causal LM of an architecture, saved with the character tokenizer."""
    from sparsecraft.data.text import char_tokenizer
    from sparsecraft.models.hf import TinySpec, tiny_causal_lm

    def make(arch: str = "llama"):
        folder = tmp_path / f"tiny-{arch}"
        tiny_causal_lm(TinySpec(arch=arch, vocab=len(char_tokenizer()))).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        return folder
    return make
