"""Sparse storage formats for the weight of a pruned Linear (out x in), as plain tensors.

Every format keeps its arrays in ``SparseWeight.tensors`` (so they move with ``.to()``, save
with safetensors and never need a dense copy) and its values in float32 by default, float16 or
bfloat16 on request (halves the bytes a product reads; the values are rounded once, to about
3 significant digits for float16 and 2 for bfloat16, while the products still accumulate in
float32). The values array is padded with 8 zeros so the vector kernels may read 8 at a time.

- ``csr16``: compressed rows, 16-bit column indices: 4 + 2 bytes per kept weight (fp32). Best
  at high sparsity (>= ~94% it moves fewer bytes than the bitmask) and for many tokens.
- ``bitmask``: one bit per weight + the kept values, row-major: 1/8 + 4 * density bytes per
  weight. Best at one-token decoding below ~94% sparsity: no gathers, one byte per 8 columns.
- ``nm``: N:M sparsity stored as a bitmask over each group of M (M bits per group: 2 bits per
  kept value for 2:4 and 4:8), validated to keep at most N per group and stored with exactly N
  (explicit zeros fill a group that keeps fewer). One token: with AVX-512 (float32 values) the
  bitmask decoder (masked expand-loads) serves every N:M; on AVX2, half-density N:M (2:4, 4:8)
  has its own kernel (fixed value offsets, inputs gathered by byte). More tokens: the bitmask kernels.
- ``panels``: compressed rows stored panel-major for many tokens: the weight is cut into groups of
  64 rows and panels of 128 columns (192 below 7.5% density; ``block`` holds (rows, columns);
  ``block=(r, c)`` picks others: r up to 128, c up to 255), and each group's kept weights are stored panel by
  panel, row by row, with an 8-bit column offset each and an 8-bit count per (group, panel, row):
  4 + 1 bytes per kept weight plus 1/128 byte per weight. The many-token kernel streams it in order while one panel of X (128 rows
  x 64 tokens) stays in the L1: faster than the csr16 tile kernel at 70-95% and T = 64-256 (see
  BENCHMARKS.md). One token runs it too, slower than csr16 (a partial sum per row and panel).
- ``block``: bh x bw blocks, block-CSR with 32-bit block column indices; a block is stored when
  any of its weights is nonzero, so the zeros inside kept blocks are multiplied too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from sparsecraft.errors import PatternError

FORMATS = ("csr16", "bitmask", "nm", "block", "panels")
#: Rows per group of the ``panels`` format and its default columns per panel:
#: 128 columns of 64 tokens fill the 32 KiB L1 once. Against 64 columns they ran 1.01-1.05x at 70%,
#: 1.04-1.07x at 80% and 1.07-1.13x at 90%; 192 columns ran 0.90x at 70% but 1.04-1.06x at 95%, where
#: rows keep few weights per panel (255 no better than 192; T = 64, 256, cold, interleaved, machine B
#: 2026-12-06). At most 255: counts and column offsets are bytes. Groups of 32 or 16 rows ran 0.71-1.00x
#: at 95%; 128 rows 1.07-1.16x on 4096x4096 but 0.93-0.97x on 3072x768, so 64 stays the default
#: (second session of 2026-12-06). At most 128 rows: the kernels keep a group's partial sums on the stack.
PANEL_ROWS = 64
MAX_PANEL_ROWS = 128
PANEL_COLS = 128
PANEL_COLS_SPARSE = 192
SPARSE_BELOW_DENSITY = 0.075
VALUE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PAD = 8


@dataclass
class SparseWeight:
    """A pruned weight in one of :data:`FORMATS`; ``linear(x, bias)`` equals ``F.linear(x, W, bias)``."""

    fmt: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor]
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)
    _csr: Tensor | None = field(default=None, repr=False, compare=False)
    _plan: tuple | None = field(default=None, repr=False, compare=False)  # see kernels.ops._plan

    def __getstate__(self) -> dict:
        # the kernel plan holds C pointers into this process's memory: rebuilt on first use after unpickling
        return {**self.__dict__, "_plan": None}

    @property
    def values(self) -> Tensor:
        return self.tensors["values"]

    @property
    def nnz(self) -> int:
        """Stored values (for blocks: every weight of a kept block)."""
        return self.values.numel() - PAD

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: the arrays without the padding."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) - PAD * self.values.element_size()

    def to(self, device: torch.device | str) -> SparseWeight:
        return SparseWeight(self.fmt, self.shape, {k: v.to(device) for k, v in self.tensors.items()}, self.n, self.m, self.block)

    def to_dense(self) -> Tensor:
        """The dense (out, in) float32 weight (for checks and the fallback; not used by the kernels)."""
        out, inp = self.shape
        t = self.tensors
        values = self.values[: self.nnz].float()
        if self.fmt == "csr16":
            rows = torch.repeat_interleave(torch.arange(out, device=values.device), t["row_ptr"].diff().long())
            cols = t["cols"].long() & 0xFFFF  # stored as int16, read as uint16
            dense = torch.zeros(out, inp, device=values.device)
            dense[rows, cols] = values
            return dense
        if self.fmt in ("bitmask", "nm"):
            mask = unpack_bits(t["bits"], inp)
            dense = torch.zeros(out, inp, device=values.device)
            dense[mask] = values
            return dense
        if self.fmt == "panels":
            return panels_to_dense(t["counts"], t["cols"], values, out, inp, *self.block)
        bh, bw = self.block
        brows = torch.repeat_interleave(torch.arange(out // bh, device=values.device), t["block_row_ptr"].diff().long())
        blocks = torch.zeros(out // bh, inp // bw, bh, bw, device=values.device)
        blocks[brows, t["block_cols"].long()] = values.reshape(-1, bh, bw)
        return blocks.permute(0, 2, 1, 3).reshape(out, inp)

    def torch_csr(self) -> Tensor:
        """A torch.sparse CSR copy (float32), built once: the plain-PyTorch fallback's weight."""
        if self._csr is None:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing the user can act on
                warnings.simplefilter("ignore", UserWarning)
                self._csr = self.to_dense().to_sparse_csr()
        return self._csr

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return _kernel_ops().sparse_linear(x, self, bias)


@lru_cache(maxsize=None)
def _kernel_ops():
    """The ops module, imported on first use (it imports this one); an import statement in linear cost
    1.5 us per call, a quarter of a small decoding product's Python overhead."""
    from sparsecraft.kernels import ops

    return ops


def unpack_bits(bits: Tensor, cols: int) -> Tensor:
    """Boolean (rows, cols) from little-endian packed rows (bit i of byte c is column 8c + i)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(bits.shape[0], -1)[:, :cols].bool()


def _padded_values(values: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype not in VALUE_DTYPES:
        raise PatternError(f"value dtype {dtype} is not supported; use one of {', '.join(map(str, VALUE_DTYPES))}")
    return torch.cat([values.detach().to(dtype), torch.zeros(PAD, dtype=dtype, device=values.device)]).contiguous()


def _row_ptr(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    ptr[1:] = counts.cpu().long().cumsum(0)
    if int(ptr[-1]) >= 2**31:
        raise PatternError(f"{int(ptr[-1])} stored values do not fit 32-bit offsets; split the layer")
    return ptr.to(torch.int32)


def _check_weight(weight: Tensor, layer: str) -> Tensor:
    if weight.dim() != 2:
        raise PatternError(f"{layer}: sparse formats take a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise PatternError(f"{layer}: weight dtype {weight.dtype} is not floating point")
    w = weight.detach().cpu().float().contiguous()  # e.g. Conv1D's transposed view: the kernels need row-major arrays
    if not torch.isfinite(w).all():
        raise PatternError(f"{layer}: weight contains NaN or Inf")
    return w


def pack_csr16(w: Tensor, dtype: torch.dtype, layer: str = "layer") -> SparseWeight:
    out, inp = w.shape
    if inp > 2**16:
        raise PatternError(f"{layer}: csr16 holds at most 65536 input columns, the layer has {inp}; use bitmask")
    mask = w != 0
    cols = mask.nonzero()[:, 1].numpy().astype(np.uint16).view(np.int16)
    tensors = {"row_ptr": _row_ptr(mask.sum(1)), "cols": torch.from_numpy(cols.copy()), "values": _padded_values(w[mask], dtype)}
    return SparseWeight("csr16", (out, inp), tensors)


def panel_columns(w: Tensor) -> int:
    """The default panel width for this weight: 192 columns below 7.5% density, 128 otherwise."""
    return PANEL_COLS_SPARSE if float((w != 0).float().mean()) < SPARSE_BELOW_DENSITY else PANEL_COLS


def pack_panels(w: Tensor, dtype: torch.dtype, columns: int | None = None, layer: str = "layer",
                rows: int = PANEL_ROWS) -> SparseWeight:
    out, inp = w.shape
    pc = columns or panel_columns(w)
    if not 1 <= pc <= 255:  # a count per (row, panel) is a byte: up to 255 columns (256 would overflow a full row)
        raise PatternError(f"{layer}: panels of {pc} columns; choose 1-255 (default {PANEL_COLS}, {PANEL_COLS_SPARSE} "
                           f"below {SPARSE_BELOW_DENSITY:.1%} density)")
    if not 1 <= rows <= MAX_PANEL_ROWS:  # the kernels hold a group's partial sums on the stack
        raise PatternError(f"{layer}: groups of {rows} rows; choose 1-{MAX_PANEL_ROWS} (default {PANEL_ROWS})")
    groups, panels = -(-out // rows), -(-inp // pc)
    padded = torch.zeros(groups * rows, panels * pc)
    padded[:out, :inp] = w
    blocks = padded.reshape(groups, rows, panels, pc).permute(0, 2, 1, 3)  # (group, panel, row, col)
    mask = blocks != 0
    counts = mask.sum(-1)  # at most pc <= 255: fits a byte
    tensors = {"group_ptr": _row_ptr(counts.reshape(groups, -1).sum(1)), "counts": counts.to(torch.uint8).reshape(-1),
               "cols": mask.nonzero()[:, 3].to(torch.uint8), "values": _padded_values(blocks[mask], dtype)}
    return SparseWeight("panels", (out, inp), tensors, block=(rows, pc))


def panels_to_dense(counts: Tensor, cols: Tensor, values: Tensor, out: int, inp: int, pr: int, pc: int) -> Tensor:
    """The dense (out, in) weight of the ``panels`` arrays (slots are (group, panel, row) in storage order)."""
    panels = -(-inp // pc)
    slot = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), counts.long())
    group, rest = slot // (panels * pr), slot % (panels * pr)
    rows = group * pr + rest % pr
    columns = (rest // pr) * pc + cols.long()
    dense = torch.zeros(out, inp, device=values.device)
    dense[rows, columns] = values
    return dense


def pack_bitmask(w: Tensor, dtype: torch.dtype, fmt: str = "bitmask", n: int = 0, m: int = 0,
                 mask: Tensor | None = None) -> SparseWeight:
    out, inp = w.shape
    mask = w != 0 if mask is None else mask
    bits = np.ascontiguousarray(np.packbits(mask.numpy(), axis=1, bitorder="little"))
    tensors = {"row_ptr": _row_ptr(mask.sum(1)), "bits": torch.from_numpy(bits), "values": _padded_values(w[mask], dtype)}
    return SparseWeight(fmt, (out, inp), tensors, n, m)


def pack_nm(w: Tensor, n: int, m: int, dtype: torch.dtype, layer: str = "layer") -> SparseWeight:
    out, inp = w.shape
    if not 0 < n < m:
        raise PatternError(f"{layer}: N:M needs 0 < N < M, got {n}:{m}")
    if inp % m:
        raise PatternError(f"{layer}: {n}:{m} needs the input dimension {inp} to be a multiple of {m}")
    nonzero = w != 0
    per_group = nonzero.reshape(out, inp // m, m).sum(-1)
    if int(per_group.max()) > n:
        row, group = divmod(int(per_group.argmax()), inp // m)
        raise PatternError(
            f"{layer}: not {n}:{m} sparse: row {row}, columns {group * m}..{group * m + m - 1} keep "
            f"{int(per_group.max())} weights; prune it with pattern {n}:{m} first or use bitmask"
        )
    return pack_bitmask(w, dtype, "nm", n, m, mask=exactly_n_per_group(nonzero, n, m))


def exactly_n_per_group(mask: Tensor, n: int, m: int) -> Tensor:
    """The mask with every group of m holding exactly n kept positions: a group that keeps fewer
    (a kept weight that is exactly zero, a sparser layer) also keeps its first unset positions, as
    explicit zeros. Fixed counts let the decode kernel use fixed value offsets (sc_nm_half)."""
    out, inp = mask.shape
    groups = mask.reshape(out, inp // m, m)
    missing = n - groups.sum(-1, keepdim=True)
    unset_rank = torch.cumsum(~groups, dim=-1)
    return (groups | (~groups & (unset_rank <= missing))).reshape(out, inp)


def pack_block(w: Tensor, bh: int, bw: int, dtype: torch.dtype, layer: str = "layer") -> SparseWeight:
    out, inp = w.shape
    if bh < 1 or bw < 1 or out % bh or inp % bw:
        raise PatternError(f"{layer}: blocks of {bh}x{bw} must tile the weight {out}x{inp}; choose sizes that divide it")
    blocks = w.reshape(out // bh, bh, inp // bw, bw).permute(0, 2, 1, 3)  # (block rows, block cols, bh, bw)
    kept = (blocks != 0).any(-1).any(-1)
    tensors = {
        "block_row_ptr": _row_ptr(kept.sum(1)),
        "block_cols": kept.nonzero()[:, 1].to(torch.int32).contiguous(),
        "values": _padded_values(blocks[kept].reshape(-1), dtype),
    }
    return SparseWeight("block", (out, inp), tensors, block=(bh, bw))


def pack(weight: Tensor, fmt: str, n: int = 0, m: int = 0, block: tuple[int, int] = (1, 1),
         dtype: torch.dtype = torch.float32, layer: str = "layer") -> SparseWeight:
    """Pack a dense (out, in) weight whose zeros are the pruned entries into format ``fmt``."""
    w = _check_weight(weight, layer)
    if fmt == "csr16":
        return pack_csr16(w, dtype, layer)
    if fmt == "bitmask":
        return pack_bitmask(w, dtype)
    if fmt == "nm":
        return pack_nm(w, n, m, dtype, layer)
    if fmt == "block":
        return pack_block(w, block[0], block[1], dtype, layer)
    if fmt == "panels":  # block=(rows per group, columns per panel); (1, 1) means the defaults
        return pack_panels(w, dtype, None, layer) if block == (1, 1) else pack_panels(w, dtype, block[1], layer, block[0])
    raise PatternError(f"{layer}: unknown sparse format {fmt!r}; choose one of {', '.join(FORMATS)}")
