"""Patterns turn scores into exact masks: counts, whole units, N:M groups, deterministic ties.

Property-based (hypothesis) over 2-D (Linear), 3-D (Conv1d), 4-D (Conv2d) and 5-D (Conv3d) weight
shapes. Scores are small integers (often tied) so sums are exact in float32 and the slow
sort-based references below see exactly the numbers the library sees.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecraft.core.patterns import (
    NM,
    PATTERN_GRAMMAR,
    Block,
    InChannels,
    OutChannels,
    Unstructured,
    infer_pattern,
    parse_pattern,
    topk_mask,
    units_to_keep,
)
from sparsecraft.errors import DensityError, PatternError

# derandomize: the same examples on every run and machine (deterministic suite)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

NM_PAIRS = [(1, 4), (2, 4), (3, 4), (4, 8), (1, 8), (2, 8), (3, 16), (1, 2)]
BLOCKS = [(1, 1), (2, 2), (4, 4), (2, 8), (8, 1), (1, 4), (4, 2)]
densities = st.one_of(
    st.floats(min_value=1e-4, max_value=1.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 0.5, 0.25, 0.1, 1e-6]),
)


@st.composite
def weight_shapes(draw, out_multiple: int = 1, in_multiple: int = 1, max_out: int = 6, max_in: int = 4):
    """(out, in, *kernel) with rank 2..5; out and in multiples of the given numbers."""
    rank = draw(st.integers(2, 5))
    out = draw(st.integers(1, max_out)) * out_multiple
    cin = draw(st.integers(1, max_in)) * in_multiple
    kernel = tuple(draw(st.integers(1, 3 if rank == 3 else 2)) for _ in range(rank - 2))
    return (out, cin, *kernel)


def scores_for(shape: tuple[int, ...], seed: int, levels: int) -> torch.Tensor:
    """Integer-valued float scores in [0, levels): levels=1 makes every score equal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float()


seeds = st.integers(0, 2**31 - 1)
levels = st.sampled_from([1, 2, 3, 7, 1000])


def expected_units(density: float, n_units: int) -> int:
    """Round half up, at least one unit, at most all (the documented rule, written out again)."""
    return min(n_units, max(1, math.floor(density * n_units + 0.5)))


def reference_keep(unit_scores: list[float], k: int) -> list[bool]:
    """The k largest by a full Python sort; ties go to the lower index."""
    order = sorted(range(len(unit_scores)), key=lambda i: (-unit_scores[i], i))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(unit_scores))]


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) -> (out, *kernel, in) -> (out, prod(kernel) * in)."""
    return t.movedim(1, -1).reshape(t.shape[0], -1)


def block_units(t: torch.Tensor, bh: int, bw: int) -> list[torch.Tensor]:
    """Blocks of the matrix view, row-major over (block row, block column), by explicit slicing."""
    m = matrix_view(t)
    rows, cols = m.shape
    return [
        m[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].reshape(-1)
        for i in range(rows // bh)
        for j in range(cols // bw)
    ]


def assert_whole_units(units: list[torch.Tensor], expected: list[bool]) -> None:
    assert len(units) == len(expected)
    for i, (unit, keep) in enumerate(zip(units, expected)):
        assert bool(unit.all()) == keep and bool(unit.any()) == keep, f"unit {i} is split or wrong"


# --------------------------------------------------------------------------- units_to_keep, topk_mask


@pytest.mark.parametrize(
    ("density", "n", "k"),
    [(0.5, 3, 2), (0.25, 10, 3), (0.3, 10, 3), (1e-9, 100, 1), (1.0, 7, 7), (0.999, 7, 7), (0.05, 10, 1), (0.15, 10, 2)],
)
def test_units_to_keep_rounds_half_up_and_keeps_at_least_one(density, n, k):
    assert units_to_keep(density, n) == k


@SETTINGS
@given(n=st.integers(1, 300), k=st.integers(-2, 310), seed=seeds, lv=st.sampled_from([1, 2, 5, 0]))
def test_topk_mask_matches_a_sort_based_reference(n, k, seed, lv):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g) if lv == 0 else torch.randint(0, lv, (n,), generator=g).float()
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert int(mask.sum()) == min(max(k, 0), n)
    assert mask.tolist() == reference_keep(scores.tolist(), max(k, 0))
    assert torch.equal(topk_mask(scores, k), mask)  # same answer twice


def test_topk_mask_handles_infinities_and_rejects_nan():
    scores = torch.tensor([float("-inf"), 3.0, float("-inf"), 1.0, float("inf")])
    assert topk_mask(scores, 2).tolist() == [False, True, False, False, True]
    assert topk_mask(scores, 4).tolist() == [True, True, False, True, True]
    with pytest.raises(PatternError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan"), 2.0]), 1)


# --------------------------------------------------------------------------- exact counts, whole units


@SETTINGS
@given(shape=weight_shapes(max_out=8, max_in=6), density=densities, seed=seeds, lv=levels)
def test_unstructured_keeps_exactly_and_the_largest(shape, density, seed, lv):
    pattern = Unstructured()
    scores = scores_for(shape, seed, lv)
    mask = pattern.mask(scores, density)
    n = math.prod(shape)
    k = expected_units(density, n)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert int(mask.sum()) == k == pattern.kept(shape, density) == units_to_keep(density, n) * pattern.unit_size(shape)
    assert mask.reshape(-1).tolist() == reference_keep(scores.reshape(-1).tolist(), k)


@SETTINGS
@given(shape=weight_shapes(max_out=8, max_in=6), density=densities, seed=seeds, lv=levels)
def test_out_channels_keep_whole_rows(shape, density, seed, lv):
    pattern = OutChannels()
    scores = scores_for(shape, seed, lv)
    mask = pattern.mask(scores, density)
    k = expected_units(density, shape[0])
    unit_size = math.prod(shape[1:])
    assert pattern.n_units(shape) == shape[0] and pattern.unit_size(shape) == unit_size
    assert int(mask.sum()) == k * unit_size == pattern.kept(shape, density)
    assert pattern.kept(shape, density) == units_to_keep(density, shape[0]) * unit_size
    row_scores = [float(scores[i].sum()) for i in range(shape[0])]
    assert_whole_units([mask[i].reshape(-1) for i in range(shape[0])], reference_keep(row_scores, k))


@SETTINGS
@given(shape=weight_shapes(max_out=6, max_in=8), density=densities, seed=seeds, lv=levels)
def test_in_channels_keep_whole_columns(shape, density, seed, lv):
    pattern = InChannels()
    scores = scores_for(shape, seed, lv)
    mask = pattern.mask(scores, density)
    k = expected_units(density, shape[1])
    unit_size = shape[0] * math.prod(shape[2:])
    assert pattern.n_units(shape) == shape[1] and pattern.unit_size(shape) == unit_size
    assert int(mask.sum()) == k * unit_size == pattern.kept(shape, density)
    assert pattern.kept(shape, density) == units_to_keep(density, shape[1]) * unit_size
    col_scores = [float(scores[:, j].sum()) for j in range(shape[1])]
    assert_whole_units([mask[:, j].reshape(-1) for j in range(shape[1])], reference_keep(col_scores, k))


@st.composite
def block_cases(draw):
    bh, bw = draw(st.sampled_from(BLOCKS))
    shape = draw(weight_shapes(out_multiple=bh, in_multiple=bw, max_out=4, max_in=3))
    return Block(bh, bw), shape


@SETTINGS
@given(case=block_cases(), density=densities, seed=seeds, lv=levels)
def test_blocks_keep_whole_blocks(case, density, seed, lv):
    pattern, shape = case
    bh, bw = pattern.bh, pattern.bw
    scores = scores_for(shape, seed, lv)
    mask = pattern.mask(scores, density)
    n_units = (shape[0] // bh) * (math.prod(shape[1:]) // bw)
    k = expected_units(density, n_units)
    assert pattern.n_units(shape) == n_units and pattern.unit_size(shape) == bh * bw
    assert int(mask.sum()) == k * bh * bw == pattern.kept(shape, density)
    assert pattern.kept(shape, density) == units_to_keep(density, n_units) * pattern.unit_size(shape)
    block_scores = [float(b.sum()) for b in block_units(scores, bh, bw)]
    assert_whole_units(block_units(mask, bh, bw), reference_keep(block_scores, k))


@st.composite
def nm_cases(draw):
    n, m = draw(st.sampled_from(NM_PAIRS))
    shape = draw(weight_shapes(in_multiple=m, max_out=6, max_in=3))
    return NM(n, m), shape


@SETTINGS
@given(case=nm_cases(), seed=seeds, lv=levels, pass_density=st.booleans())
def test_nm_exactly_n_of_every_m_along_the_input_dim(case, seed, lv, pass_density):
    pattern, shape = case
    n, m = pattern.n, pattern.m
    scores = scores_for(shape, seed, lv)
    mask = pattern.mask(scores, n / m if pass_density else None)
    assert mask.shape == shape and mask.dtype == torch.bool
    # exactly N kept in each group of M consecutive input channels (dim 1), at every out/kernel position
    per_group = mask.unflatten(1, (shape[1] // m, m)).sum(dim=2)
    assert bool((per_group == n).all())
    assert pattern.is_valid(mask)
    assert int(mask.sum()) == math.prod(shape) // m * n == pattern.kept(shape) == pattern.kept(shape, n / m)
    assert pattern.fixed_density == n / m
    # within each group (on the (out, *kernel, in) view) the N largest scores win, lower index on ties
    groups_s = scores.movedim(1, -1).reshape(-1, m).tolist()
    groups_m = mask.movedim(1, -1).reshape(-1, m).tolist()
    for gs, gm in zip(groups_s, groups_m):
        assert gm == reference_keep(gs, n)


@pytest.mark.parametrize(("n", "m"), NM_PAIRS)
@pytest.mark.parametrize("shape", [(8, 16), (4, 16, 3), (4, 32, 2, 2), (2, 16, 1, 2, 2)])
def test_nm_groups_run_along_input_channels_of_the_out_kernel_in_view(n, m, shape):
    # scores depend only on the input channel: the best N of every M channels win at every position
    cin = shape[1]
    channel_score = torch.arange(cin, dtype=torch.float32).flip(0)  # channel 0 best
    view = [1] * len(shape)
    view[1] = cin
    scores = channel_score.reshape(view).expand(shape).contiguous()
    mask = NM(n, m).mask(scores)
    expected_channels = torch.tensor([(c % m) < n for c in range(cin)])
    assert torch.equal(mask, expected_channels.reshape(view).expand(shape))


def test_nm_rejects_bad_shapes_and_densities():
    with pytest.raises(PatternError, match=r"fc\.weight: input dimension 10 .* not divisible by M=4"):
        NM(2, 4).mask(torch.ones(8, 10), layer="fc.weight")
    with pytest.raises(PatternError, match="fixes the density at 0.5"):
        NM(2, 4).mask(torch.ones(8, 8), 0.3, layer="fc.weight")
    with pytest.raises(PatternError, match="0 < N < M"):
        NM(4, 4)
    assert not NM(2, 4).is_valid(torch.ones(4, 8, dtype=torch.bool))


# --------------------------------------------------------------------------- deterministic ties


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 3), (8, 8, 2, 2), (4, 8, 1, 2, 2)])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.77])
def test_all_equal_scores_keep_the_lowest_flat_indices(shape, density):
    scores = torch.ones(shape)
    n = math.prod(shape)
    k = expected_units(density, n)
    mask = Unstructured().mask(scores, density)
    assert mask.reshape(-1).tolist() == [True] * k + [False] * (n - k)
    assert torch.equal(mask, Unstructured().mask(scores, density))

    rows = expected_units(density, shape[0])
    out = OutChannels().mask(scores, density)
    assert out[:rows].all() and not out[rows:].any()

    cols = expected_units(density, shape[1])
    inc = InChannels().mask(scores, density)
    assert inc[:, :cols].all() and not inc[:, cols:].any()

    blk = Block(2, 4).mask(scores, density)
    n_blocks = (shape[0] // 2) * (math.prod(shape[1:]) // 4)
    kb = expected_units(density, n_blocks)
    assert [bool(b.all()) for b in block_units(blk, 2, 4)] == [True] * kb + [False] * (n_blocks - kb)

    for n_, m_ in [(2, 4), (1, 8), (4, 8)]:
        nm = NM(n_, m_).mask(scores)
        groups = nm.movedim(1, -1).reshape(-1, m_)
        assert bool(groups[:, :n_].all()) and not bool(groups[:, n_:].any())
        assert torch.equal(nm, NM(n_, m_).mask(scores))


@SETTINGS
@given(shape=weight_shapes(in_multiple=4), density=densities, seed=seeds, lv=st.sampled_from([1, 2, 3]))
def test_every_pattern_gives_the_same_mask_twice(shape, density, seed, lv):
    scores = scores_for(shape, seed, lv)
    for pattern in (Unstructured(), OutChannels(), InChannels(), Block(1, 4)):
        assert torch.equal(pattern.mask(scores, density), pattern.mask(scores.clone(), density))
    assert torch.equal(NM(2, 4).mask(scores), NM(2, 4).mask(scores.clone()))


def test_density_outside_range_is_rejected_by_every_pattern():
    for pattern in (Unstructured(), OutChannels(), InChannels(), Block(2, 2)):
        for bad in (0.0, -0.1, 1.5):
            with pytest.raises(DensityError, match=r"fc\.weight: density"):
                pattern.mask(torch.ones(4, 4), bad, layer="fc.weight")


def test_structured_patterns_need_two_dims_and_blocks_must_divide():
    with pytest.raises(PatternError, match=r"bias.*>= 2 dimensions"):
        OutChannels().mask(torch.ones(5), 0.5, layer="bias")
    with pytest.raises(PatternError, match=r"conv\.weight: matrix view 6x27 .* 4x4 blocks"):
        Block(4, 4).mask(torch.ones(6, 3, 3, 3), 0.5, layer="conv.weight")
    assert int(Unstructured().mask(torch.arange(5.0), 0.4).sum()) == 2  # 1-D is fine unstructured


# --------------------------------------------------------------------------- parse_pattern / infer_pattern


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2:4", NM(2, 4)),
        (" 1 : 8 ", NM(1, 8)),
        ("3:16", NM(3, 16)),
        ("block4x4", Block(4, 4)),
        ("Block8x1", Block(8, 1)),
        ("block_2x8", Block(2, 8)),
        ("4x4", Block(4, 4)),
        ("16 x 1", Block(16, 1)),
        ("rows", OutChannels()),
        ("out_channels", OutChannels()),
        ("filters", OutChannels()),
        ("in_channels", InChannels()),
        ("columns", InChannels()),
        ("unstructured", Unstructured()),
        ("UNSTRUCTURED", Unstructured()),
        ("element", Unstructured()),
    ],
)
def test_parse_pattern_accepts_the_grammar(text, expected):
    parsed = parse_pattern(text)
    assert type(parsed) is type(expected)
    assert str(parsed) == str(expected)
    if isinstance(expected, NM):
        assert (parsed.n, parsed.m) == (expected.n, expected.m)
    if isinstance(expected, Block):
        assert (parsed.bh, parsed.bw) == (expected.bh, expected.bw)


def test_parse_pattern_passes_pattern_objects_through():
    p = NM(1, 4)
    assert parse_pattern(p) is p


@pytest.mark.parametrize(
    "text", ["", "garbage", "2/4", "2:4:8", ":4", "2:", "block", "blockx4", "4x", "x4", "row", "in channels", "2:4 block", "-1:4"]
)
def test_parse_pattern_rejects_garbage_and_lists_the_grammar(text):
    with pytest.raises(PatternError) as info:
        parse_pattern(text)
    message = str(info.value)
    assert repr(text) in message
    assert PATTERN_GRAMMAR in message
    for word in ("unstructured", "N:M", "block", "out_channels", "in_channels"):
        assert word in message


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "block0x4", "4x0"])
def test_parse_pattern_rejects_impossible_sizes(text):
    with pytest.raises(PatternError):
        parse_pattern(text)


@SETTINGS
@given(shape=weight_shapes(in_multiple=4), seed=seeds, lv=levels)
def test_infer_pattern_recognises_2_4_and_dense(shape, seed, lv):
    scores = scores_for(shape, seed, lv)
    assert infer_pattern(NM(2, 4).mask(scores)) == "2:4"
    assert infer_pattern(torch.ones(shape, dtype=torch.bool)) == "dense"
    assert infer_pattern(torch.ones(shape)) == "dense"


def test_infer_pattern_other_cases():
    scores = torch.ones(8, 16)
    assert infer_pattern(NM(1, 8).mask(scores)) == "1:8"
    assert infer_pattern(NM(3, 16).mask(scores)) == "3:16"
    unstructured = torch.zeros(8, 16, dtype=torch.bool)
    unstructured[0, :5] = True
    assert infer_pattern(unstructured) == "unstructured"
    assert infer_pattern(torch.tensor([1.0, 0.0, 1.0])) == "unstructured"
