"""Sparse formats and CPU kernels: every format equals the dense masked product (fuzzed), round trips,
the fallback, accelerate() and sparse checkpoints."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecraft.kernels as K
from sparsecraft.core.patterns import NM
from sparsecraft.errors import PatternError, SparsecraftError
from sparsecraft.kernels import build
from sparsecraft.kernels.formats import unpack_bits

pytest.importorskip("transformers")
from sparsecraft.methods.sequential import prune_decoder  # noqa: E402
from sparsecraft.models.hf import TinySpec, tiny_causal_lm  # noqa: E402

def sparse_weight(out: int, inp: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    return W * (torch.rand(out, inp, generator=g) < density)


def assert_matches_dense(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within fp32 rounding of the exact product: |error| <= 1e-5 * (|x| |W|^T + |b|), elementwise."""
    exact = torch.nn.functional.linear(x.double(), W.double(), None if bias is None else bias.double())
    scale = x.double().abs() @ W.double().abs().t() + (0 if bias is None else bias.double().abs())
    assert y.shape == exact.shape
    assert bool(((y.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()), float(((y.double() - exact).abs() - 1e-5 * scale).max())


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 70), inp=st.integers(1, 200), density=st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.5, 0.9, 1.0]),
    tokens=st.sampled_from([1, 2, 7, 8, 9, 31, 64, 65, 130, 300]), fmt=st.sampled_from(["csr16", "bitmask", "panels"]),
    with_bias=st.booleans(), seed=st.integers(0, 10_000),
)
def test_unstructured_formats_equal_the_dense_masked_product(out, inp, density, tokens, fmt, with_bias, seed):
    W = sparse_weight(out, inp, density, seed)
    W[seed % out] = 0  # an empty row
    x = torch.randn(tokens, inp, generator=torch.Generator().manual_seed(seed + 1))
    bias = torch.randn(out) if with_bias else None
    packed = K.pack(W, fmt)
    assert torch.equal(packed.to_dense(), W)
    assert_matches_dense(packed.linear(x, bias), x, W, bias)


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(2, 4), (4, 8), (1, 2), (1, 4), (3, 8)]), rows=st.integers(1, 40), groups=st.integers(1, 40),
       tokens=st.sampled_from([1, 5, 8, 64, 100]), holes=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 10_000))
def test_nm_format_keeps_positions_and_equals_the_dense_product(nm, rows, groups, tokens, holes, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, groups * m, generator=g)
    W = W * NM(n, m).mask(W.abs())
    W = W * (torch.rand(W.shape, generator=g) >= holes)  # kept weights that are exactly zero: groups with < n nonzeros
    packed = K.pack(W, "nm", n=n, m=m)
    assert torch.equal(packed.to_dense(), W)  # the per-group positions round trip
    # exactly n stored per group (explicit zeros fill the holes): the half-density decode kernel relies on it
    assert bool((unpack_bits(packed.tensors["bits"], W.shape[1]).reshape(rows, groups, m).sum(-1) == n).all())
    x = torch.randn(tokens, W.shape[1])
    assert_matches_dense(packed.linear(x), x, W, None)


@settings(max_examples=30, deadline=None)
@given(block=st.sampled_from([(1, 1), (4, 4), (2, 8), (8, 1), (1, 16), (16, 2), (3, 2), (5, 3), (24, 1)]), brows=st.integers(1, 8), bcols=st.integers(1, 12),
       density=st.sampled_from([0.1, 0.4, 1.0]), tokens=st.sampled_from([1, 3, 8, 64, 70]), seed=st.integers(0, 10_000))
def test_block_format_equals_the_dense_product(block, brows, bcols, density, tokens, seed):
    """Rows run in register passes of 8, 4, 2 and 1 (3 = 2 + 1, 5 = 4 + 1, 24 = 16 + 8 over two buffers)."""
    bh, bw = block
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(brows, 1, bcols, 1, generator=g) < density).expand(brows, bh, bcols, bw).reshape(brows * bh, bcols * bw)
    W = torch.randn(brows * bh, bcols * bw, generator=g) * keep
    packed = K.pack(W, "block", block=block)
    assert torch.equal(packed.to_dense(), W)
    assert packed.nnz == int(keep.sum())
    x = torch.randn(tokens, W.shape[1], generator=g)
    bias = torch.randn(W.shape[0], generator=g)
    assert_matches_dense(packed.linear(x, bias), x, W, bias)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(60, 300), inp=st.integers(60, 300), density=st.sampled_from([0.05, 0.3, 1.0]),
       tokens=st.sampled_from([1, 8, 24, 40, 64, 72, 200]), columns=st.sampled_from([None, 64, 255, 40]),
       rows=st.sampled_from([None, 128, 32, 7, 1]), seed=st.integers(0, 10_000))
def test_panels_store_groups_panel_by_panel_and_equal_the_dense_product(out, inp, density, tokens, columns, rows, seed):
    """Several groups of 64 rows (or as asked, up to 128) and panels of 128 columns (or as asked, up to 255),
    ragged last ones, a full panel row (a count of 255 included), and every register block of the many-token
    kernel (64, 32, 16, 8 tokens)."""
    from sparsecraft.kernels.formats import MAX_PANEL_ROWS, PANEL_ROWS

    W = sparse_weight(out, inp, density, seed)
    W[(seed + 1) % out] = 0
    pc = columns or K.formats.panel_columns(W)  # 192 columns at 5% density, 128 above
    W[seed % out, :pc] = 1.0  # a row that keeps its whole first panel
    asked = (rows or PANEL_ROWS, pc) if columns or rows else (1, 1)
    packed = K.pack(W, "panels", block=asked)
    pr = rows or PANEL_ROWS
    assert packed.block == (pr, pc)
    t = packed.tensors
    groups, panels = -(-out // pr), -(-inp // pc)
    padded = torch.zeros(groups * pr, panels * pc)
    padded[:out, :inp] = W != 0
    per_slot = padded.reshape(groups, pr, panels, pc).sum(-1).permute(0, 2, 1).reshape(-1)
    assert torch.equal(t["counts"].long(), per_slot.long())  # one count per (group, panel, row), in storage order
    assert int(t["counts"].max()) == min(pc, inp) and int(t["cols"].max()) < pc
    assert t["group_ptr"].tolist() == [0, *per_slot.reshape(groups, -1).sum(1).cumsum(0).long().tolist()]
    assert torch.equal(packed.to_dense(), W)
    x = torch.randn(tokens, inp, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out)
    assert_matches_dense(packed.linear(x, bias), x, W, bias)
    with pytest.raises(PatternError, match="panels of 300 columns"):
        K.pack(W, "panels", block=(PANEL_ROWS, 300))
    with pytest.raises(PatternError, match=f"groups of {MAX_PANEL_ROWS + 1} rows; choose 1-{MAX_PANEL_ROWS}"):
        K.pack(W, "panels", block=(MAX_PANEL_ROWS + 1, 128))  # the kernels' partial sums have room for 128 rows


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_token_panels_handle_runs_of_every_length(rows, dtype):
    """The one-token panels kernel adds each (row, panel) run eight at a time with one masked step for its
    last 1-7 weights (values zeroed, offsets pointed at the panel's first input), except at the very end of
    the arrays, where it sums one by one. Runs of 0-17 weights, a ragged last panel, the arrays ending with
    a run of five, and inf in memory right after x: an unmasked offset past the last panel would read it."""
    out, pc, inp = 37, 24, 65  # panels of 24, 24 and 17 columns
    W = torch.zeros(out, inp)
    g = torch.Generator().manual_seed(0)
    for r in range(out):
        for p in range(3):
            width = min(pc, inp - p * pc)
            kept = min((r + 5 * p) % 18, width)
            W[r, p * pc + torch.randperm(width, generator=g)[:kept]] = torch.randn(kept, generator=g)
    W[-1, 2 * pc:] = 0
    W[-1, 2 * pc:2 * pc + 5] = 1.0  # no eight bytes of offsets left after this run
    W = W.to(dtype).float()  # values the storage holds exactly
    packed = K.pack(W, "panels", dtype=dtype, block=(rows, pc))
    memory = torch.full((inp + 256,), float("inf"))
    x = memory[:inp].view(1, inp)
    x.copy_(torch.randn(1, inp, generator=g))
    y = packed.linear(x)
    assert torch.isfinite(y).all()
    assert_matches_dense(y, x, W, None)


@pytest.mark.parametrize("tile", [8, 16, 32, 64])
@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "nm", "block"])
def test_every_token_tile_width_and_a_ragged_last_tile_give_the_dense_product(monkeypatch, fmt, tile):
    """X is transposed into tiles of `tile` tokens stored one after another; the last one is narrower (8 or 40)."""
    from sparsecraft.kernels import ops

    inp = 64
    monkeypatch.setattr(ops, "TILE_BYTES", tile * 4 * inp)
    assert ops.token_tile(inp, 104) == tile
    W = sparse_weight(37, inp, 0.3, tile)
    if fmt == "nm":
        W = torch.randn(37, inp) * NM(2, 4).mask(torch.randn(37, inp).abs())
    kwargs = {"n": 2, "m": 4} if fmt == "nm" else {"block": (4, 4)} if fmt == "block" else {}
    if fmt == "block":
        W = torch.randn(36, inp) * (torch.rand(9, 1, 16, 1) < 0.4).expand(9, 4, 16, 4).reshape(36, inp)
    packed = K.pack(W, fmt, **kwargs)
    x = torch.randn(100, inp)  # tp = 104: tiles of `tile` tokens, then 104 % tile
    bias = torch.randn(W.shape[0])
    assert_matches_dense(packed.linear(x, bias), x, W, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "block", "panels"])
def test_half_precision_values_equal_the_product_with_rounded_weights(dtype, fmt):
    W = sparse_weight(48, 96, 0.3, 0)
    packed = K.pack(W, fmt, dtype=dtype)
    assert packed.values.dtype == dtype
    rounded = W.to(dtype).float()
    for tokens in (1, 16):
        x = torch.randn(tokens, 96)
        assert_matches_dense(packed.linear(x), x, rounded, None)


@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "block", "panels"])
def test_a_transposed_weight_view_packs_row_major(fmt):
    """GPT-2's Conv1D hands over W as a transposed view: the arrays must still be row-major."""
    W = sparse_weight(40, 24, 0.3, 3)
    packed = K.pack(W.t().contiguous().t(), fmt)
    assert all(t.is_contiguous() for t in packed.tensors.values())
    x = torch.randn(5, 24)
    for tokens in (1, 5):
        assert_matches_dense(packed.linear(x[:tokens]), x[:tokens], W, None)


@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "panels"])
def test_leading_dimensions_and_zero_tokens_keep_their_shape(fmt):
    W = sparse_weight(6, 16, 0.5, 5)
    bias = torch.randn(6)
    packed = K.pack(W, fmt)
    for shape in ((2, 3, 16), (1, 1, 16), (4, 1, 1, 16), (0, 16), (2, 0, 16)):
        x = torch.randn(shape)
        y = packed.linear(x, bias)
        assert y.shape == (*shape[:-1], 6)
        assert_matches_dense(y.reshape(-1, 6), x.reshape(-1, 16), W, bias)
    x = torch.randn(16, 3).t()  # not contiguous
    assert_matches_dense(packed.linear(x, bias), x, W, bias)


def test_a_strided_bias_is_read_correctly():
    W = sparse_weight(16, 32, 0.4, 4)
    bias = torch.randn(32)[::2]  # a non-contiguous view
    for tokens in (1, 9):
        x = torch.randn(tokens, 32)
        assert_matches_dense(K.pack(W, "csr16").linear(x, bias), x, W, bias)


def test_format_sizes_follow_their_definitions():
    W = sparse_weight(64, 256, 0.1, 0)
    nnz = int((W != 0).sum())
    assert K.pack(W, "csr16").nbytes == nnz * (4 + 2) + 65 * 4
    assert K.pack(W, "bitmask").nbytes == nnz * 4 + 64 * 256 // 8 + 65 * 4
    assert K.pack(W, "csr16", dtype=torch.float16).nbytes == nnz * (2 + 2) + 65 * 4
    # panels: a value and a byte of column per kept weight, a byte of count per (group, panel, row), 4 bytes per group
    assert K.pack(W, "panels").nbytes == nnz * (4 + 1) + 1 * 2 * 64 + 2 * 4  # 1 group x 2 panels of 128 columns
    assert K.pack(W, "panels", block=(64, 64)).nbytes == nnz * (4 + 1) + 1 * 4 * 64 + 2 * 4


def test_bad_input_names_the_layer_and_the_fix():
    W = sparse_weight(8, 16, 0.9, 0)
    with pytest.raises(PatternError, match="blk.*multiple of 3"):
        K.pack(W, "nm", n=1, m=3, layer="blk")
    with pytest.raises(PatternError, match="lay: not 2:4 sparse: row"):
        K.pack(W, "nm", n=2, m=4, layer="lay")
    with pytest.raises(PatternError, match="blocks of 3x4 must tile"):
        K.pack(W, "block", block=(3, 4))
    with pytest.raises(PatternError, match="unknown sparse format"):
        K.pack(W, "coo")
    with pytest.raises(PatternError, match="NaN"):
        K.pack(torch.full((2, 2), float("nan")), "csr16")
    with pytest.raises(PatternError, match="expects 16"):
        K.pack(W, "csr16").linear(torch.randn(2, 15))


def test_gradient_flows_to_the_input():
    W = sparse_weight(16, 24, 0.5, 1)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(16, generator=g).requires_grad_()
    x = torch.randn(5, 24, generator=g).requires_grad_()
    K.pack(W, "csr16").linear(x, bias).square().sum().backward()
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    torch.nn.functional.linear(x, W, bias).square().sum().backward()
    # fp32 sums in another order: errors relative to the largest entry, as everywhere in this file
    for ours, ref in ((gx, x.grad), (gb, bias.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_fallback_without_the_library_is_correct_and_warns_once(monkeypatch):
    W = sparse_weight(20, 40, 0.3, 2)
    x = torch.randn(3, 40)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    build.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = [K.pack(W, fmt).linear(x) for fmt in ("csr16", "bitmask", "csr16")]
        assert not K.available()
        assert len([w for w in caught if "plain PyTorch" in str(w.message)]) == 1
        for y in ys:
            assert_matches_dense(y, x, W, None)
    finally:
        build.library.cache_clear()


def one_token_cases() -> list[tuple[torch.Tensor, str, dict]]:
    """Weights for the one-token decoders: odd widths (a last byte alone, in % 8 != 0), N:M, empty rows."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for out, inp in ((9, 8), (13, 24), (7, 77), (33, 200)):
        W = sparse_weight(out, inp, 0.4, out)
        W[0] = 0
        cases.append((W, "bitmask", {}))
    for n, m in ((2, 4), (4, 8), (1, 4)):
        W = torch.randn(21, 8 * m * 3, generator=g)
        cases.append((W * NM(n, m).mask(W.abs()), "nm", {"n": n, "m": m}))
    # big enough for two threads, rows split by work: the first 300 rows empty, then ever denser ones
    W = torch.randn(600, 520, generator=g) * (torch.rand(600, 520, generator=g) < torch.linspace(-1, 1, 600)[:, None])
    cases += [(W, "bitmask", {}), (W, "csr16", {})]
    return cases


def test_the_default_build_uses_avx512_exactly_where_the_cpu_has_it():
    flags = open("/proc/cpuinfo").read()
    has_avx512 = " avx512f" in flags and " avx512bw" in flags
    assert build.library().sc_vector_bits() == (512 if has_avx512 else 256)


@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -DSC_CSR16_GATHER"])
def test_the_avx2_kernels_equal_the_dense_product(monkeypatch, tmp_path, flags):
    """The AVX2 kernels (what CPUs without AVX-512 run), built with -mno-avx512f; csr16 decodes one
    token with scalar loads there, or with gathers (what AVX-512 builds use) under -DSC_CSR16_GATHER."""
    monkeypatch.setenv("SPARSECRAFT_CACHE", str(tmp_path))
    monkeypatch.setenv(build.EXTRA_FLAGS_ENV, flags)
    build.library.cache_clear()
    try:
        assert build.library().sc_vector_bits() == 256
        block_w = torch.randn(12, 48) * (torch.rand(3, 1, 6, 1) < 0.5).expand(3, 4, 6, 8).reshape(12, 48)
        cases = [*one_token_cases(), (sparse_weight(19, 50, 0.3, 4), "csr16", {}), (block_w, "block", {"block": (4, 8)}),
                 (sparse_weight(70, 130, 0.3, 5), "panels", {})]
        for W, fmt, kwargs in cases:
            for dtype in (torch.float32, torch.float16):
                packed = K.pack(W, fmt, dtype=dtype, **kwargs)
                for tokens in (1, 57):  # 57: 32- 16- and 8-token register blocks
                    x = torch.randn(tokens, W.shape[1])
                    assert_matches_dense(packed.linear(x), x, packed.to_dense(), None)
    finally:
        build.library.cache_clear()


def test_the_one_token_decoders_equal_the_dense_product():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the big case splits its rows between two threads
    try:
        for W, fmt, kwargs in one_token_cases():
            packed = K.pack(W, fmt, **kwargs)
            for bias in (None, torch.randn(W.shape[0])):
                x = torch.randn(1, W.shape[1])
                assert_matches_dense(packed.linear(x, bias), x, W, bias)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "nm", "block", "panels"])
def test_one_token_plans_skip_python_and_equal_the_dense_product(monkeypatch, fmt, dtype):
    """After the first call builds a layer's plan, one token goes straight to sc_run_one (four ctypes
    arguments): same product, any leading dimensions, with and without bias."""
    from sparsecraft.kernels import ops

    kwargs = {"n": 2, "m": 4} if fmt == "nm" else {"block": (4, 4)} if fmt == "block" else {}
    W = torch.randn(96, 136) * (NM(2, 4).mask(torch.randn(96, 136).abs()) if fmt == "nm" else torch.rand(96, 136) < 0.3)
    bias = torch.randn(96)
    packed = K.pack(W, fmt, dtype=dtype, **kwargs)
    W = packed.to_dense()  # the values as stored (rounded for float16)
    packed.linear(torch.randn(1, 136))  # builds the plan
    monkeypatch.setattr(ops, "_kernel", lambda *a: pytest.fail("one token took the general path"))
    for b in (None, bias):
        for shape in ((1, 136), (1, 1, 136), (136,)):
            xs = torch.randn(shape)
            y = packed.linear(xs, b)
            assert y.shape == (*shape[:-1], 96)
            assert_matches_dense(y.reshape(1, 96), xs.reshape(1, 136), W, b)


def test_a_bitmask_width_the_decoder_cannot_read_unpadded_keeps_the_general_path():
    """in % 8 != 0: the bitmask decoders read x 8 columns at a time, so Python pads x; no one-token plan."""
    from sparsecraft.kernels import ops

    odd = K.pack(sparse_weight(9, 13, 0.5, 1), "bitmask")
    for _ in range(2):  # the second call too: it must not find a plan
        x = torch.randn(1, 13)
        assert_matches_dense(odd.linear(x), x, odd.to_dense(), None)
    assert ops._plan(odd)[3] is None


def test_the_kernels_follow_torchs_thread_setting():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert build.library().sc_max_threads() == threads  # one OpenMP runtime: torch's
    finally:
        torch.set_num_threads(before)


def test_a_failing_build_falls_back_instead_of_raising(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", [*build.FLAGS, "-mno-avx2"])  # the source refuses to compile
    build.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernels unavailable"):
            assert build.library() is None
        assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
    finally:
        build.library.cache_clear()


def pruned_tiny_lm(arch: str = "llama", sparsity: float = 0.8):
    model = tiny_causal_lm(TinySpec(arch=arch))
    prune_decoder(model, None, "magnitude", sparsity, progress=False)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accelerate_swaps_pruned_layers_only_and_keeps_outputs_and_generation(arch):
    model = pruned_tiny_lm(arch)
    dense = copy.deepcopy(model)
    head = model.lm_head
    report = K.accelerate(model, tokens=1, min_speedup=0.0, use_cache=False, progress=False)
    swapped = {d.name for d in report.swapped}
    assert swapped and all(isinstance(model.get_submodule(n), K.SparseLinear) for n in swapped)
    decision = next(d for d in report.layers if d.name == "lm_head")
    assert decision.format is None and "not sparse enough" in decision.reason
    assert model.lm_head is head  # the unpruned layer is untouched
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False),
                           dense.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_accelerate_keeps_dense_what_is_not_faster():
    model = pruned_tiny_lm()
    report = K.accelerate(model, tokens=1, min_speedup=1e9, use_cache=False, progress=False)
    assert not report.swapped
    assert not any(isinstance(m, K.SparseLinear) for m in model.modules())
    assert all("kept dense" in d.reason for d in report.layers)


def test_accelerate_measures_the_token_count_each_layer_sees():
    model = pruned_tiny_lm()
    ids = torch.randint(0, 90, (2, 12))
    report = K.accelerate(model, example_input={"input_ids": ids}, min_speedup=0.0, use_cache=False, progress=False)
    assert {d.tokens for d in report.layers} == {24}


def test_accelerate_rejects_unknown_names_and_formats():
    model = pruned_tiny_lm()
    with pytest.raises(SparsecraftError, match="no module named 'model.nope'"):
        K.accelerate(model, names=["model.nope"], progress=False)
    with pytest.raises(SparsecraftError, match="unknown sparse format"):
        K.accelerate(model, formats=["coo"], progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sparse_checkpoint_round_trip_without_dense_weights(arch, tmp_path, monkeypatch):
    model = pruned_tiny_lm(arch)
    K.accelerate(model, tokens=1, min_speedup=0.0, use_cache=False, progress=False)
    out = K.save_sparse(model, tmp_path / "sparse")
    densified = []
    monkeypatch.setattr(K.SparseWeight, "to_dense", lambda self: densified.append(1) or pytest.fail("materialised"))
    loaded = K.load_sparse(out)
    ids = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not densified
    assert not list(tmp_path.glob(".*partial"))


def test_accelerate_for_many_tokens_tries_panels_and_its_checkpoint_round_trips(tmp_path):
    model = pruned_tiny_lm()
    report = K.accelerate(model, tokens=64, min_speedup=0.0, use_cache=False, progress=False)
    assert all("panels" in d.candidates_ms for d in report.swapped)
    assert "panels" not in K.accelerate(pruned_tiny_lm(), tokens=1, min_speedup=0.0, use_cache=False,
                                        progress=False).swapped[0].candidates_ms  # slower at one token: not timed
    model = pruned_tiny_lm()
    dense = copy.deepcopy(model)
    K.accelerate(model, tokens=64, formats=["panels"], min_speedup=0.0, use_cache=False, progress=False)
    assert {m.fmt for m in model.modules() if isinstance(m, K.SparseLinear)} == {"panels"}
    loaded = K.load_sparse(K.save_sparse(model, tmp_path / "sparse"))
    ids = torch.randint(0, 90, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["csr16", "bitmask", "panels"])
def test_a_used_sparse_model_pickles_with_torch_save(fmt, tmp_path):
    """After a forward the layers hold C pointers (their kernel plans): torch.save must drop them, not fail."""
    model = torch.nn.Sequential(K.SparseLinear(K.pack(sparse_weight(24, 40, 0.3, 0), fmt), torch.randn(24)))
    x = torch.randn(1, 40)
    with torch.no_grad():
        y = model(x)
        model(torch.randn(5, 40))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_torch_compile_sees_each_sparse_layer_as_one_op_without_graph_breaks():
    """dynamo cannot trace the ctypes call: SparseLinear hands it the sparsecraft::sparse_linear custom op."""
    torch._dynamo.reset()
    layers = [K.SparseLinear(K.pack(sparse_weight(48, 40, 0.3, 1), "csr16"), torch.randn(48)),
              K.SparseLinear(K.pack(sparse_weight(32, 48, 0.3, 2), "bitmask")),
              K.SparseLinear(K.pack(sparse_weight(40, 32, 0.3, 3), "panels"), torch.randn(40))]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1], torch.nn.LayerNorm(32), layers[2]).eval()
    with torch.no_grad():
        for tokens in (1, 7):
            x = torch.randn(tokens, 40)
            explained = torch._dynamo.explain(model)(x)
            assert explained.graph_break_count == 0 and explained.graph_count == 1
            compiled = torch.compile(model, backend="aot_eager")
            for _ in range(2):  # the second call takes the cached one-token plan
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("cpp_op", [True, False])
def test_compiled_one_token_layers_call_the_cpp_operator_where_it_is_built(cpp_op, monkeypatch):
    """One token: sparsecraft::one_token (torch_op.cpp); more tokens, or without the C++ operator, the Python op."""
    from sparsecraft.kernels import custom_op

    assert build.torch_op()  # torch's wheel ships the headers it builds against
    if not cpp_op:
        monkeypatch.setattr(custom_op, "torch_op", lambda: False)
    torch._dynamo.reset()
    layers = [K.SparseLinear(K.pack(sparse_weight(48, 40, 0.3, 1), "csr16"), torch.randn(48)),
              K.SparseLinear(K.pack(torch.randn(32, 48) * NM(2, 4).mask(torch.randn(32, 48).abs()), "nm", n=2, m=4,
                                    dtype=torch.float16)),
              K.SparseLinear(K.pack(sparse_weight(40, 32, 0.3, 3), "panels"), torch.randn(40)),
              K.SparseLinear(K.pack(sparse_weight(40, 40, 0.3, 4), "bitmask", dtype=torch.bfloat16)),
              K.SparseLinear(K.pack(sparse_weight(40, 40, 0.1, 5), "block", block=(4, 8)), torch.randn(40))]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1], torch.nn.LayerNorm(32), *layers[2:]).eval()
    with torch.no_grad():
        for tokens in (1, 7):
            x = torch.randn(1, tokens, 40)
            code = torch._dynamo.explain(model)(x).graphs[0].code
            one_token = tokens == 1 and cpp_op
            assert code.count("sparsecraft.one_token") == (5 if one_token else 0)  # every format's plan kind
            assert code.count("sparsecraft.sparse_linear") == (0 if one_token else 5)
            compiled = torch.compile(model, backend="aot_eager")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_the_cpp_operator_refuses_what_it_cannot_compute():
    assert build.torch_op()
    sw = K.pack(sparse_weight(8, 16, 0.5, 0), "csr16")
    arrays = [sw.tensors["row_ptr"], sw.tensors["cols"], sw.tensors["values"]]
    op = torch.ops.sparsecraft.one_token.default
    torch.testing.assert_close(op(torch.ones(1, 16), arrays, None, 0, 0, 8, sw.nnz, 1 << 16, 0, 1, 1), sw.linear(torch.ones(1, 16)))
    with pytest.raises(RuntimeError, match="one contiguous float32 CPU token"):
        op(torch.ones(2, 16), arrays, None, 0, 0, 8, sw.nnz, 1 << 16, 0, 1, 1)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 vector of the output size"):
        op(torch.ones(1, 16), arrays, torch.ones(9), 0, 0, 8, sw.nnz, 1 << 16, 0, 1, 1)


def test_a_cpp_operator_that_cannot_be_built_leaves_the_python_op_with_one_warning(tmp_path, monkeypatch):
    broken = tmp_path / "torch_op.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "TORCH_OP_SOURCE", broken)
    monkeypatch.setenv("SPARSECRAFT_CACHE", str(tmp_path / "cache"))
    build.torch_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiled-graph operator could not be built"):
            assert not build.torch_op()
        assert not list((tmp_path / "cache").rglob("torch_op-*"))  # no half-written library left behind
    finally:
        build.torch_op.cache_clear()


def test_sparse_checkpoint_size_is_proportional_to_kept_weights(tmp_path):
    sizes = {}
    for sparsity in (0.5, 0.9):
        model = pruned_tiny_lm(sparsity=sparsity)
        K.accelerate(model, tokens=1, formats=["csr16"], min_speedup=0.0, max_density=1.0, use_cache=False, progress=False)
        model.lm_head = torch.nn.Identity()  # only the sparse layers and the embedding remain
        sizes[sparsity] = (K.save_sparse(model, tmp_path / str(sparsity)) / "sparse_model.safetensors").stat().st_size
    embedding = 96 * 64 * 4
    assert (sizes[0.9] - embedding) < 0.35 * (sizes[0.5] - embedding)  # 0.1 vs 0.5 kept, plus row pointers and header


def test_corrupted_or_truncated_checkpoints_are_refused(tmp_path):
    model = pruned_tiny_lm()
    K.accelerate(model, tokens=1, min_speedup=0.0, use_cache=False, progress=False)
    out = K.save_sparse(model, tmp_path / "sparse")
    path = out / "sparse_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SparsecraftError, match="checksum"):
        K.load_sparse(out)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SparsecraftError, match="truncated or corrupted"):
        K.load_sparse(out)
    with pytest.raises(SparsecraftError, match="exists and is not empty"):
        K.save_sparse(model, out)


def test_demo_acceleration_stage_reports_every_projection_and_the_whole_forward():
    from sparsecraft.demo import acceleration_table, demo_models, run_acceleration_stage

    model = pruned_tiny_lm(sparsity=0.5)
    rows, decisions = run_acceleration_stage(demo_models(model, "magnitude 50%"), progress=False, log=lambda _m: None)
    assert {r.model for r in rows} == {"magnitude 50%", "magnitude 90% (speed only)"}
    for label in ("magnitude 50%", "magnitude 90% (speed only)"):
        parts = [r.part for r in rows if r.model == label]
        assert parts[-1] == "whole forward" and {"q_proj", "down_proj"} <= set(parts)
    sparser = next(r for r in rows if r.model.startswith("magnitude 90") and r.part == "q_proj")
    assert sparser.density == pytest.approx(0.1, abs=0.01)  # the copy was pruned further, the original was not
    assert len(decisions) == 2 * 15 and acceleration_table(rows).row_count == len(rows)
