"""Training FLOPs: each method's step costs what RigL's appendix H says, and the runner reports it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.analysis.training_flops import DENSE, TrainingFlops, layer_densities
from sparsecraft.core.prune import prune
from sparsecraft.data.sequences import IGNORE, sort_task
from sparsecraft.methods.dst import RigL
from sparsecraft.methods.nm_training import NMTraining
from sparsecraft.recipes.runner import Run
from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection
from sparsecraft.train.trainer import evaluate, task_loss

IN, HID, OUT = 16, 32, 8


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


# dense forward FLOPs per sample of each layer: 2 * in * out
F0, F1 = 2 * IN * HID, 2 * HID * OUT


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = F.cross_entropy(model(torch.randn(4, IN, generator=g)), torch.randint(0, OUT, (4,), generator=g))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_per_sample_layer_flops_are_counted_from_a_forward():
    flops = TrainingFlops.for_model(mlp(), torch.randn(3, IN))
    assert flops.layer_flops == {"0": F0, "2": F1}
    assert flops.dense_flops(10) == 10 * 3 * (F0 + F1)


def test_a_masked_layer_costs_its_density_in_all_three_products():
    model = mlp()
    flops = TrainingFlops.for_model(model, torch.randn(1, IN))
    prune(model, sparsity=0.75, distribution="uniform", score="magnitude")
    densities = layer_densities(model)
    assert densities == {"0": (0.25, 0.25, 0.25), "2": (0.25, 0.25, 0.25)}
    flops.add_step(densities, samples=5)
    assert flops.total == pytest.approx(5 * 3 * 0.25 * (F0 + F1))


def test_rigl_pays_the_dense_weight_gradient_only_at_update_steps():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flops = TrainingFlops.for_model(model, torch.randn(1, IN))
    rigl = RigL(model, optimizer, sparsity=0.5, total_steps=40, update_interval=4, distribution="uniform")
    per_step = []
    for step in range(1, 13):
        train_step(model, optimizer, step)
        per_step.append(flops.step_flops(layer_densities(model, rigl), 1))
        flops.add_step(layer_densities(model, rigl), 1)
        rigl.step()
    sparse, update = 3 * 0.5 * (F0 + F1), (2 * 0.5 + 1) * (F0 + F1)  # 3 f_S, 2 f_S + f_D
    assert per_step == pytest.approx([update if s % 4 == 0 else sparse for s in range(1, 13)])
    # the RigL paper's average: (3 f_S dT + 2 f_S + f_D) / (dT + 1) per step, here over 3 periods of dT = 3
    assert flops.total / 12 == pytest.approx((sparse * 3 + update) / 4)


@pytest.mark.parametrize("method", ["ste", "srste"])
def test_nm_training_has_sparse_forward_and_input_gradient_but_dense_weight_gradient(method):
    model = mlp()
    nm = NMTraining(model, None, n=1, m=4, total_steps=10, method=method)
    assert layer_densities(model, nm) == {"0": (0.25, 0.25, 1.0), "2": (0.25, 0.25, 1.0)}


def test_mask_decay_is_dense_while_alpha_is_positive_then_sparse():
    model = mlp()
    nm = NMTraining(model, None, n=2, m=4, total_steps=10, method="mask_decay", finetune_fraction=0.3)
    assert layer_densities(model, nm)["0"] == DENSE
    for _ in range(8):
        nm.step()
    assert layer_densities(model, nm)["0"] == (0.5, 0.5, 1.0)


def make_recipe(method: str, **extra) -> Recipe:
    return Recipe(model="mlp", data="digits", seed=0, train=TrainSection(epochs=2, batch_size=256, optimizer="adam", lr=3e-3),
                  sparsity=SparsitySection(method=method, **extra))


def test_runner_reports_training_flops_relative_to_a_dense_run(tmp_path):
    dense = Run(make_recipe("dense"), tmp_path / "d", progress=False, log=lambda _: None).run()
    assert dense.train_flops_vs_dense == pytest.approx(1.0)
    static = Run(make_recipe("static", sparsity=0.9, distribution="uniform"), tmp_path / "s", progress=False, log=lambda _: None).run()
    # every layer of the MLP is pruned and there is no other matmul: FLOPs scale with the density
    assert static.train_flops_vs_dense == pytest.approx(1 - static.sparsity)
    rigl = Run(make_recipe("rigl", sparsity=0.9, distribution="uniform", update_interval=2), tmp_path / "r", progress=False,
               log=lambda _: None).run()
    assert static.train_flops_vs_dense < rigl.train_flops_vs_dense < 1.0


def test_sort_task_labels_are_the_sorted_prompt_and_only_answers_are_scored():
    split = sort_task(n_train=20, n_test=5, length=6, values=10, seed=3)
    x, y = split.x_train, split.y_train
    assert x.shape == y.shape == (20, 12)
    assert torch.equal(y[:, 6:], x[:, :6].sort(1).values)
    assert (y[:, :6] == IGNORE).all() and (x[:, 6] == 10).all()
    assert torch.equal(x[:, 7:], y[:, 6:-1])  # teacher forcing: each answer position sees the answers before it


def test_sequence_loss_and_accuracy_ignore_unscored_positions():
    logits = torch.zeros(2, 3, 4)
    logits[:, :, 1] = 5.0  # predicts 1 everywhere
    y = torch.tensor([[IGNORE, 1, 2], [IGNORE, 1, 1]])
    assert task_loss(logits, y).item() == pytest.approx(F.cross_entropy(logits[:, 1:].reshape(-1, 4), y[:, 1:].reshape(-1)).item())

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return logits[: len(x)]

    assert evaluate(Fixed(), torch.zeros(2, 3), y) == pytest.approx(3 / 4)
