"""report(): exact per-layer sparsity, FLOPs per sample, JSON and a PNG plot."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import sparsecraft as sc
import sparsecraft.models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_per_layer_rows_are_exact(make_mlp):
    model = make_mlp()
    sc.prune(model, density=0.25, keep_last_dense=True)
    r = sc.report(model)
    assert [row.name for row in r.layers] == ["fc1", "fc2", "fc3"]
    assert [row.type for row in r.layers] == ["linear"] * 3
    assert [row.shape for row in r.layers] == [[32, 16], [32, 32], [8, 32]]
    assert [row.weights for row in r.layers] == [512, 1024, 256]
    assert [row.kept for row in r.layers] == [128, 256, 256]
    assert [row.density for row in r.layers] == [0.25, 0.25, 1.0]
    assert [row.pattern for row in r.layers] == ["unstructured", "unstructured", "dense"]
    assert (r.weights, r.kept) == (1792, 640)
    assert r.density == 640 / 1792
    assert r.parameters == 512 + 32 + 1024 + 32 + 256 + 8
    assert r.nonzero_parameters == r.parameters - (512 - 128) - (1024 - 256)
    assert r.other_flops is None and r.dense_flops is None
    assert any("no input given" in note for note in r.notes)
    assert "dense_flops" not in r.totals()
    text = str(r)
    assert "Sparsity report" in text and "fc2" in text and "640 of 1,792" in text


def test_patterns_in_the_report(make_mlp):
    model = make_mlp()
    sc.prune(model, pattern="2:4")
    assert [row.pattern for row in sc.report(model).layers] == ["2:4"] * 3
    sc.finalize(model)  # no recorded patterns any more: inferred from the zeros
    r = sc.report(model)
    assert [row.pattern for row in r.layers] == ["2:4"] * 3
    assert [row.kept for row in r.layers] == [256, 512, 128]
    assert [row.density for row in r.layers] == [0.5, 0.5, 0.5]


def test_linear_flops_per_sample():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    dense = sc.report(layer, torch.randn(5, 64))
    assert dense.layers[0].dense_flops == 2 * 64 * 32
    assert dense.layers[0].sparse_flops == 2 * 64 * 32
    sc.prune(layer, density=0.25)
    kept = int(sc.masks_of(layer)["weight"].sum())
    assert kept == 512
    r = sc.report(layer, torch.randn(5, 64))
    row = r.layers[0]
    assert (row.dense_flops, row.sparse_flops) == (2 * 64 * 32, 2 * kept)
    assert r.other_flops == 0
    assert r.input_shape == [5, 64]
    totals = r.totals()
    assert (totals["dense_flops"], totals["sparse_flops"]) == (4096, 1024)
    assert totals["flops_ratio"] == 0.25
    assert sc.report(layer, input_shape=(3, 64)).layers[0].sparse_flops == 2 * kept  # per sample, any batch


@pytest.mark.parametrize(("stride", "hw"), [(1, 10), (2, 5)])
def test_conv2d_flops_with_padding(stride, hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=stride, padding=1)
    sc.prune(conv, density=0.5)
    kept = int(sc.masks_of(conv)["weight"].sum())
    assert kept == 108
    r = sc.report(conv, torch.randn(2, 3, 10, 10))
    row = r.layers[0]
    assert row.type == "conv2d"
    assert row.dense_flops == 2 * hw * hw * 216
    assert row.sparse_flops == 2 * hw * hw * kept
    assert r.other_flops == 0


def test_tuple_inputs_and_conv1d_conv3d(make_convnd, convnd_batch):
    model = make_convnd()
    r = sc.report(model, convnd_batch)  # model(x1, x3), batch of 3
    rows = {row.name: row for row in r.layers}
    assert rows["embed"].type == "embedding" and rows["embed"].dense_flops == 0
    assert rows["conv1d"].dense_flops == 2 * 6 * (8 * 4 * 3)
    assert rows["conv3d"].dense_flops == 2 * 8 * (8 * 4 * 8)
    assert rows["head"].dense_flops == 2 * 16 * 4
    assert r.other_flops == 0
    assert r.input_shape is None


def test_transformer_counts_attention_matmuls_as_other_flops():
    torch.manual_seed(0)
    model = sparsecraft.models.create("transformer")
    sc.prune(model, sparsity=0.5)
    r = sc.report(model)  # the model's own example input: (1, 64) tokens
    assert r.input_shape == [1, 64]
    heads, t, d, depth = 4, 64, 128, 2
    # QK^T and AV in every block: 2 * heads * t * t * (d / heads) FLOPs each
    assert r.other_flops > 0
    assert r.other_flops == depth * 2 * (2 * heads * t * t * (d // heads))
    rows = {row.name: row for row in r.layers}
    assert rows["embed"].dense_flops == 0 and rows["embed"].pattern == "dense"
    qkv = rows["blocks.0.attn.qkv"]
    assert qkv.dense_flops == 2 * t * d * 3 * d
    assert qkv.sparse_flops == 2 * t * qkv.kept and qkv.kept == 3 * d * d // 2
    assert r.dense_flops == r.other_flops + sum(row.dense_flops for row in r.layers)
    assert r.sparse_flops < r.dense_flops


def test_to_json_and_save_json(make_mlp, tmp_path):
    model = make_mlp()
    sc.prune(model, density=0.5)
    r = sc.report(model, torch.randn(4, 16))
    data = json.loads(r.to_json())
    assert data["input_shape"] == [4, 16]
    assert [layer["name"] for layer in data["layers"]] == ["fc1", "fc2", "fc3"]
    assert data["layers"][1]["kept"] == 512 and data["layers"][1]["sparse_flops"] == 1024
    totals = data["totals"]
    assert totals["weights"] == 1792 and totals["kept"] == 896
    assert totals["density"] == 0.5 and totals["sparsity"] == 0.5
    assert totals["dense_flops"] == 2 * 1792 and totals["sparse_flops"] == 2 * 896
    assert totals["other_flops"] == 0 and totals["flops_ratio"] == 0.5
    path = tmp_path / "out" / "report.json"
    r.save_json(path)
    assert json.loads(path.read_text()) == data
    assert os.listdir(path.parent) == ["report.json"]


def test_plot_writes_a_png(make_cnn, tmp_path):
    model = make_cnn()
    sc.prune(model, sparsity=0.8, distribution="erk")
    path = tmp_path / "density.png"
    sc.report(model).plot(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert os.listdir(tmp_path) == ["density.png"]
