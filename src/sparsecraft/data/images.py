"""Image classification data that needs no download.

- ``digits``: the 1,797 8x8 handwritten digits bundled with scikit-learn (Alpaydin & Kaynak, UCI).
- ``synthetic_images``: a 32x32 RGB task made on the fly (class-specific oriented gratings in noise),
  for the 32x32 models when no image set is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecraft.registry import DATASETS


@dataclass
class Split:
    """Train and test tensors of one dataset."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


@DATASETS.register("digits", "scikit-learn 8x8 digits, 1x8x8, 10 classes (80/20 stratified split)")
def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return Split((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])


@DATASETS.register("synthetic32", "synthetic 3x32x32 gratings in noise, 10 classes")
def synthetic_images(n_train: int = 2000, n_test: int = 500, classes: int = 10, noise: float = 1.0, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    angles = torch.arange(classes) * torch.pi / classes
    freq = 2 * torch.pi / 8

    def make(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        phase = torch.rand(n, 1, 1, generator=gen) * 2 * torch.pi
        direction = torch.stack([angles[y].cos(), angles[y].sin()], 1)[:, :, None, None]
        wave = torch.sin(freq * (direction * coords).sum(1) + phase)
        colour = torch.rand(n, 3, 1, 1, generator=gen) + 0.5
        x = wave[:, None] * colour + noise * torch.randn(n, 3, 32, 32, generator=gen)
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return Split(x_train, y_train, x_test, y_test)
