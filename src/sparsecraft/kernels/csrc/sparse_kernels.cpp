// sparsecraft CPU kernels: Y = W X + bias for a sparse W (out x in) and X given transposed.
//
// Layout shared by every kernel: y is (tokens, out) like torch's F.linear. One token (tp == 1,
// decoding: memory-bound, read the format once, in order) takes x itself. More tokens are padded
// to tp, a multiple of 8 (padding tokens are computed but not stored), and transposed by
// sc_transpose_pad into tiles of `tile` tokens stored one after the other: tile k holds tokens
// t0 = k * tile .. t0 + w - 1 (w = min(tile, tp - t0)) as an (in, w) row-major block starting at
// xt + t0 * in. Each tile is contiguous, so the rows of X a tile's kept weights pick at random
// share the caches' sets evenly (a (in, tp) layout with tp = 256 strides 1 KiB between rows and
// used a quarter of the L2's sets: 1.5x slower at 90% on 4096x4096). Compute-bound: each kept
// weight does a broadcast-FMA over a run of tokens held in registers.
//
// Values are float32, float16 or bfloat16 (vdtype 0, 1, 2), always accumulated in float32.
// Compiled at first use by sparsecraft.kernels.build with -O3 -march=native -fopenmp; the
// OpenMP runtime resolves to the one torch already loaded, so both share one thread pool.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "plan.h"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "sparsecraft kernels need AVX2, FMA and F16C"
#endif

namespace {

enum VDtype { F32 = 0, F16 = 1, BF16 = 2 };

template <int D> inline float load1(const void* p, int64_t i) {
    if (D == F32) return static_cast<const float*>(p)[i];
    uint16_t h = static_cast<const uint16_t*>(p)[i];
    if (D == F16) return _cvtsh_ss(h);
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

template <int D> inline __m256 load8(const void* p, int64_t i) {
    if (D == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if (D == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// A work item computes a block of kRowGroup outputs x up to kMaxTile tokens into a local buffer
// (row-major, contiguous per output), then writes it into y (tokens, out) token by token: each
// token's kRowGroup outputs fill one 64-byte line, instead of one scattered store per output.
constexpr int64_t kMaxTile = 64;

inline void write_block(const float* buf, float* y, int64_t r0, int64_t rows, int64_t out, int64_t t0, int64_t t1,
                        int64_t tokens) {
    for (int64_t t = t0; t < (t1 < tokens ? t1 : tokens); ++t)
        for (int64_t i = 0; i < rows; ++i) y[t * out + r0 + i] = buf[i * kMaxTile + (t - t0)];
}

// Work items for tp > 1: (token tile, group of 16 rows) in tile-major order, so the threads sweep
// all rows over one tile of X before the next (the tile stays in cache), and each 64-byte line of
// y (16 outputs of one token) is written by one thread only (no false sharing between cores).
constexpr int64_t kRowGroup = 16;

// Runs row_fn(r, xtile, w, dst) for every output r and token tile (xtile: the tile's (in, w)
// block of X; dst + t is where token t of the tile goes for output r); the work items are
// (tile, group of kRowGroup rows).
template <typename RowFn>
void tiled_rows(int64_t out, int64_t in, const float* xt, int64_t tp, int64_t tokens, int64_t tile, int threads,
                float* y, RowFn row_fn) {
    const int64_t tiles = (tp + tile - 1) / tile, groups = (out + kRowGroup - 1) / kRowGroup;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * groups; ++item) {
        const int64_t t0 = (item / groups) * tile, r0 = (item % groups) * kRowGroup;
        const int64_t w = tp - t0 < tile ? tp - t0 : tile;
        const int64_t rows = out - r0 < kRowGroup ? out - r0 : kRowGroup;
        alignas(32) float buf[kRowGroup * kMaxTile];
        for (int64_t i = 0; i < rows; ++i) row_fn(r0 + i, xt + t0 * in, w, buf + i * kMaxTile);
        write_block(buf, y, r0, rows, out, t0, t0 + w, tokens);
    }
}

// One token: each thread takes one contiguous run of rows, all runs about the same work (work of
// row r = its stored values + per_row, found by binary search in the row pointers). Contiguous runs
// keep each thread's reads one sequential stream: 1.2-1.6x faster than handing out chunks of 16 rows
// dynamically for the bitmask and N:M decoders on the small, cold matrices of decoding (576x576,
// 1536x576), and, with prefetch_ahead, 1.2-1.8x for csr16 at 90-95% (weights streamed from memory,
// interleaved A/B of the two builds, 2026-12-03).
template <typename RowFn>
void split_rows(const int32_t* rp, int64_t rows, int64_t per_row, int threads, RowFn row_fn) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int n = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t total = rp[rows] - rp[0] + rows * per_row;
        auto first_row = [&](int k) -> int64_t {  // first row whose work so far reaches k / n of the total
            if (k >= n) return rows;
            const int64_t target = total * k / n;
            int64_t lo = 0, hi = rows;
            while (lo < hi) {
                const int64_t mid = (lo + hi) / 2;
                if (rp[mid] - rp[0] + mid * per_row < target) lo = mid + 1;
                else hi = mid;
            }
            return lo;
        };
        const int64_t stop = first_row(id + 1);
        for (int64_t r = first_row(id); r < stop; ++r) row_fn(r);
    }
}

// Bytes per stored value.
template <int D> constexpr int64_t value_bytes() { return D == F32 ? 4 : 2; }

// Asks for the value and index streams 1 KiB ahead of the one-token csr16 loop: its gathers keep
// the core busy, so the hardware prefetcher alone left memory idle (no measurable change between
// 512 B and 2 KiB).
inline void prefetch_ahead(const char* values, const char* indices) {
    _mm_prefetch(values + 1024, _MM_HINT_T0);
    _mm_prefetch(indices + 1024, _MM_HINT_T0);
}

// ---- CSR with 16-bit column indices -----------------------------------------------------

// One token, csr16: inputs picked by scalar loads (csr16_row_scalar) or 8-wide hardware gathers. On Zen 3
// (AVX2, no AVX-512) scalar picks with four scalar sums were 1.1-1.2x faster than the gathers on the small,
// cold matrices of decoding (576x576, 1536x576 at 70-90%) and never slower elsewhere; inserting the picks
// into one vector FMA per eight (csr16_row_scalar now) is another 1.05-1.21x (576x576 to 4096x4096 at
// 70-95%; interleaved A/B of the builds, benchmarks/kernel_ab.py, 2026-12-06). Builds with AVX-512 keep
// the gathers: the scalar picks were not measured on an AVX-512 CPU. -DSC_CSR16_GATHER forces the
// gathers (a test checks both).
#if defined(__AVX512F__) || defined(SC_CSR16_GATHER)
constexpr bool kCsr16Scalar = false;
#else
constexpr bool kCsr16Scalar = true;
#endif

// Four inputs picked by the 16-bit columns packed in c (one 64-bit load of four indices).
inline __m128 pick4(const float* x, uint64_t c) {
    return _mm_set_ps(x[c >> 48], x[(c >> 32) & 0xFFFF], x[(c >> 16) & 0xFFFF], x[c & 0xFFFF]);
}

// One row's dot product with x: the picked inputs are inserted into a vector, eight at a time, and
// meet eight values (one load) in one FMA. Four column indices come with each 64-bit load, so a kept
// weight costs about 1.25 loads instead of 3 (index, input, value): 0.9-1.1 cycles per kept weight
// instead of 1.3-1.4 for four scalar sums (one thread, weights in cache, 576x576 to 3072x768 at
// 70-95%, /tmp microbenchmark 2026-12-06). The row ends with a 4-wide step and up to 3 scalar ones.
template <int D>
inline float csr16_row_scalar(int64_t k, int64_t end, const uint16_t* cols, const void* vals, const float* x) {
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= end; k += 8) {
        prefetch_ahead(static_cast<const char*>(vals) + k * value_bytes<D>(), reinterpret_cast<const char*>(cols + k));
        uint64_t c0, c1;
        memcpy(&c0, cols + k, 8);
        memcpy(&c1, cols + k + 4, 8);
        acc = _mm256_fmadd_ps(load8<D>(vals, k), _mm256_set_m128(pick4(x, c1), pick4(x, c0)), acc);
    }
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    if (k + 4 <= end) {  // values are padded by 8: the 8-value load reads past the row, never past the array
        uint64_t c0;
        memcpy(&c0, cols + k, 8);
        a = _mm_fmadd_ps(_mm256_castps256_ps128(load8<D>(vals, k)), pick4(x, c0), a);
        k += 4;
    }
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    float s = _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
    for (; k < end; ++k) s += load1<D>(vals, k) * x[cols[k]];
    return s;
}

// One row's dot product with x, 8-wide gathers.
template <int D>
inline float csr16_row_gather(int64_t k, int64_t end, const uint16_t* cols, const void* vals, const float* x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= end; k += 16) {
        prefetch_ahead(static_cast<const char*>(vals) + k * value_bytes<D>(), reinterpret_cast<const char*>(cols + k));
        __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + k)));
        __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + k + 8)));
        a0 = _mm256_fmadd_ps(load8<D>(vals, k), _mm256_i32gather_ps(x, i0, 4), a0);
        a1 = _mm256_fmadd_ps(load8<D>(vals, k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    if (k + 8 <= end) {
        __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + k)));
        a0 = _mm256_fmadd_ps(load8<D>(vals, k), _mm256_i32gather_ps(x, i0, 4), a0);
        k += 8;
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < end; ++k) s += load1<D>(vals, k) * x[cols[k]];
    return s;
}

template <int D>
void csr16_mv(const int32_t* rp, const uint16_t* cols, const void* vals, const float* x, float* y,
              const float* bias, int64_t out, int threads) {
    split_rows(rp, out, 8, threads, [&](int64_t r) {
        const float s = kCsr16Scalar ? csr16_row_scalar<D>(rp[r], rp[r + 1], cols, vals, x)
                                     : csr16_row_gather<D>(rp[r], rp[r + 1], cols, vals, x);
        y[r] = s + (bias ? bias[r] : 0.0f);
    });
}

// Vector types for the many-token kernels (a kept weight broadcast times a run of tokens): 8 lanes
// everywhere, 16 where the build has AVX-512.
struct V256 {
    using T = __m256;
    static constexpr int lanes = 8;
    static T set1(float f) { return _mm256_set1_ps(f); }
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#if defined(__AVX512F__)
struct V512 {
    using T = __m512;
    static constexpr int lanes = 16;
    static T set1(float f) { return _mm512_set1_ps(f); }
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static T add(T a, T b) { return _mm512_add_ps(a, b); }
    static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
using VWide = V512;
#else
using VWide = V256;
#endif

// Adds one row's kept weights k..end times their runs of NV * V::lanes tokens to sum (NV registers):
// kept weight k picks the run at x0 + cols[k] * w. U independent accumulator sets hide the FMA latency
// when the run is narrow (NV * U >= 4 chains in flight). Serves csr16 (16-bit columns) and panels
// (8-bit columns within a panel). Forced inline: left to the compiler, the panels kernel kept sum in
// memory and ran 0.93-0.98x (interleaved A/B, 2026-12-06).
template <int D, typename V, int NV, int U, typename Col>
__attribute__((always_inline)) inline void add_row_times_tokens(int64_t k, int64_t end, const Col* cols, const void* vals,
                                                                const float* x0, int64_t w, typename V::T* sum) {
    typename V::T acc[U][NV];
    for (int j = 0; j < NV; ++j) acc[0][j] = sum[j];
    for (int u = 1; u < U; ++u)
        for (int j = 0; j < NV; ++j) acc[u][j] = V::set1(0.0f);
    for (; k + U <= end; k += U)
        for (int u = 0; u < U; ++u) {
            const typename V::T v = V::set1(load1<D>(vals, k + u));
            const float* xr = x0 + static_cast<int64_t>(cols[k + u]) * w;
            for (int j = 0; j < NV; ++j) acc[u][j] = V::fma(v, V::load(xr + V::lanes * j), acc[u][j]);
        }
    for (; k < end; ++k) {
        const typename V::T v = V::set1(load1<D>(vals, k));
        const float* xr = x0 + static_cast<int64_t>(cols[k]) * w;
        for (int j = 0; j < NV; ++j) acc[0][j] = V::fma(v, V::load(xr + V::lanes * j), acc[0][j]);
    }
    for (int j = 0; j < NV; ++j) {
        sum[j] = acc[0][j];
        for (int u = 1; u < U; ++u) sum[j] = V::add(sum[j], acc[u][j]);
    }
}

// One csr16 row over one tile's run of NV * V::lanes tokens from t0, bias first, into dst.
template <int D, typename V, int NV, int U>
inline void csr16_row_tile(int64_t k, int64_t end, const uint16_t* cols, const void* vals, const float* xtile,
                           int64_t w, int64_t t0, float* dst, float b) {
    typename V::T sum[NV];
    for (int j = 0; j < NV; ++j) sum[j] = V::set1(b);
    add_row_times_tokens<D, V, NV, U>(k, end, cols, vals, xtile + t0, w, sum);
    for (int j = 0; j < NV; ++j) V::store(dst + V::lanes * j, sum[j]);
}

template <int D>
void csr16_mm(const int32_t* rp, const uint16_t* cols, const void* vals, int64_t in, const float* xt, float* y,
              const float* bias, int64_t out, int64_t tp, int64_t tokens, int64_t tile, int threads) {
    tiled_rows(out, in, xt, tp, tokens, tile, threads, y, [&](int64_t r, const float* xtile, int64_t w, float* dst) {
        const float b = bias ? bias[r] : 0.0f;
        int64_t t = 0;
        constexpr int L = VWide::lanes;  // 64 tokens = 64 / L registers
        for (; t + 64 <= w; t += 64) csr16_row_tile<D, VWide, 64 / L, 1>(rp[r], rp[r + 1], cols, vals, xtile, w, t, dst + t, b);
        for (; t + 32 <= w; t += 32) csr16_row_tile<D, VWide, 32 / L, L / 8>(rp[r], rp[r + 1], cols, vals, xtile, w, t, dst + t, b);
        for (; t + 16 <= w; t += 16) csr16_row_tile<D, VWide, 16 / L, 2 * L / 8>(rp[r], rp[r + 1], cols, vals, xtile, w, t, dst + t, b);
        for (; t + 8 <= w; t += 8) csr16_row_tile<D, V256, 1, 4>(rp[r], rp[r + 1], cols, vals, xtile, w, t, dst + t, b);
    });
}

// ---- Panels: compressed rows stored panel-major (many tokens at 70-90% sparsity) -------------
//
// The weight is cut into groups of pr rows (64 by default) and panels of pc columns. A group's kept
// weights are stored panel by panel, and within a panel row by row: one 8-bit column offset (within
// the panel) and one value each, plus an 8-bit count per (group, panel, row) and the offset where each
// group starts. A work item (token tile of up to 64 tokens, group) walks the panels in storage order:
// the weights stream in sequence, and the panel's pc rows of X (128 x 64 floats, 32 KiB, by default)
// stay in the L1 while the group's pr rows add their kept weights of the panel to partial sums held in a local buffer.
// The csr16 tile kernel instead picks every kept weight's run of tokens from a tile of X that spans
// the L2: at 70% on 768x3072 (T = 64, one thread, weights hot) it ran 17-24 GFLOP/s, this layout
// 51-59, reading csr16 panel by panel through per-row cursors 40 (the weights then stream as 64
// interleaved runs). Each (row, panel) pays a load and a store of its partial sums and a mispredicted
// loop exit: at one token csr16 is the faster layout, and the sparsest weights get wider panels.
// Rows per group, pr, and columns per panel, pc, are the format's (64 x 128 by default,
// formats.PANEL_ROWS and PANEL_COLS). pc is at most 255 so that offsets and counts fit a byte; pr at most
// 128, the partial sums a work item keeps on its stack (128 x 64 floats, 32 KiB).
constexpr int64_t kMaxPanelRows = 128;

// Accumulator sets for NV registers of tokens: at least 8 FMA chains in flight (4 for one register).
constexpr int chains(int nv) { return nv >= 8 ? 1 : nv >= 4 ? 2 : 4; }

// One row's kept weights of one panel (k..end) over NV * V::lanes tokens, added to its partial sums
// part. xp: the panel's first row of X in the tile (row j of the panel at xp + j * w).
template <int D, typename V, int NV, int U>
inline void panel_row_tile(int64_t k, int64_t end, const uint8_t* cols, const void* vals, const float* xp, int64_t w,
                           float* part) {
    typename V::T sum[NV];
    for (int j = 0; j < NV; ++j) sum[j] = V::load(part + V::lanes * j);
    add_row_times_tokens<D, V, NV, U>(k, end, cols, vals, xp, w, sum);
    for (int j = 0; j < NV; ++j) V::store(part + V::lanes * j, sum[j]);
}

template <int D>
void panels_mm(const int32_t* gp, const uint8_t* counts, const uint8_t* cols, const void* vals, int64_t pr, int64_t pc,
               int64_t in, const float* xt, float* y, const float* bias, int64_t out, int64_t tp, int64_t tokens, int64_t tile,
               int threads) {
    const int64_t tiles = (tp + tile - 1) / tile, groups = (out + pr - 1) / pr;
    const int64_t panels = (in + pc - 1) / pc;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * groups; ++item) {  // tile-major: all groups over one tile of X first
        const int64_t t0 = (item / groups) * tile, g = item % groups, r0 = g * pr;
        const int64_t w = tp - t0 < tile ? tp - t0 : tile;
        const int64_t rows = out - r0 < pr ? out - r0 : pr;
        const float* xtile = xt + t0 * in;
        alignas(64) float buf[kMaxPanelRows * kMaxTile];
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t t = 0; t < w; ++t) buf[i * kMaxTile + t] = bias ? bias[r0 + i] : 0.0f;
        int64_t k = gp[g];
        const uint8_t* cnt = counts + g * panels * pr;
        for (int64_t p = 0; p < panels; ++p, cnt += pr) {
            const float* xp = xtile + p * pc * w;
            for (int64_t i = 0; i < rows; ++i) {
                const int64_t end = k + cnt[i];
                float* part = buf + i * kMaxTile;
                int64_t t = 0;
                constexpr int L = VWide::lanes;
                for (; t + 64 <= w; t += 64) panel_row_tile<D, VWide, 64 / L, chains(64 / L)>(k, end, cols, vals, xp + t, w, part + t);
                for (; t + 32 <= w; t += 32) panel_row_tile<D, VWide, 32 / L, chains(32 / L)>(k, end, cols, vals, xp + t, w, part + t);
                for (; t + 16 <= w; t += 16) panel_row_tile<D, VWide, 16 / L, chains(16 / L)>(k, end, cols, vals, xp + t, w, part + t);
                for (; t + 8 <= w; t += 8) panel_row_tile<D, V256, 1, 4>(k, end, cols, vals, xp + t, w, part + t);
                k = end;
            }
        }
        write_block(buf, y, r0, rows, out, t0, t0 + w, tokens);
    }
}

// Eight inputs picked by the 8-bit offsets packed in c (one 64-bit load of eight indices).
inline __m256 pick8(const float* x, uint64_t c) {
    return _mm256_set_ps(x[c >> 56], x[(c >> 48) & 0xFF], x[(c >> 40) & 0xFF], x[(c >> 32) & 0xFF], x[(c >> 24) & 0xFF],
                         x[(c >> 16) & 0xFF], x[(c >> 8) & 0xFF], x[c & 0xFF]);
}

// Adds one (row, panel) run of kept weights k..end times the panel's inputs xp to acc, eight per FMA as
// in csr16_row_scalar but with eight 8-bit offsets per 64-bit load. The run's last partial eight is one
// masked step (its values zeroed, its offsets pointed at xp[0]) unless the offsets array ends within
// eight bytes (stop: the array's length), where it is summed one by one.
template <int D>
inline __m256 panel_run_one(int64_t k, int64_t end, int64_t stop, const uint8_t* cols, const void* vals, const float* xp,
                            __m256 acc) {
    for (; k + 8 <= end; k += 8) {
        prefetch_ahead(static_cast<const char*>(vals) + k * value_bytes<D>(), reinterpret_cast<const char*>(cols + k));
        uint64_t c;
        memcpy(&c, cols + k, 8);
        acc = _mm256_fmadd_ps(load8<D>(vals, k), pick8(xp, c), acc);
    }
    const int64_t rest = end - k;
    if (rest == 0) return acc;
    if (k + 8 <= stop) {  // values are padded by 8: the 8-value load never reads past the array
        uint64_t c;
        memcpy(&c, cols + k, 8);
        c &= (uint64_t{1} << (8 * rest)) - 1;
        const __m256 keep = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rest)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        return _mm256_fmadd_ps(_mm256_and_ps(load8<D>(vals, k), keep), pick8(xp, c), acc);
    }
    float s = 0.0f;
    for (; k < end; ++k) s += load1<D>(vals, k) * xp[cols[k]];
    return _mm256_add_ps(acc, _mm256_setr_ps(s, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f));
}

// One token (a model tuned for many tokens, decoding): each thread takes a contiguous run of groups of
// about equal work (split_rows over the group offsets); each row keeps an 8-wide sum over its panels.
// Against per-row scalar sums: 1.21-1.46x at 70% (576x576 to 4096x4096) and at 90% on the two larger
// shapes, 0.89-0.91x at 90% on 576x576 and 1536x576 (kernel_ab.py, 7 rounds, 2026-12-06). With one row
// per group (8-bit column offsets: 5 bytes per kept fp32 weight against csr16's 6) it still ran
// 0.52-1.02x csr16, even with the row's sum held in a register: the masked tail of every (row, panel)
// run costs more than the bytes it saves.
template <int D>
void panels_mv(const int32_t* gp, const uint8_t* counts, const uint8_t* cols, const void* vals, int64_t pr, int64_t pc,
               int64_t in, const float* x, float* y, const float* bias, int64_t out, int threads) {
    const int64_t groups = (out + pr - 1) / pr, panels = (in + pc - 1) / pc, stop = gp[groups];
    split_rows(gp, groups, 8 * pr, threads, [&](int64_t g) {
        const int64_t r0 = g * pr, rows = out - r0 < pr ? out - r0 : pr;
        __m256 sums[kMaxPanelRows];
        for (int64_t i = 0; i < rows; ++i) sums[i] = _mm256_setzero_ps();
        int64_t k = gp[g];
        const uint8_t* cnt = counts + g * panels * pr;
        for (int64_t p = 0; p < panels; ++p, cnt += pr) {
            const float* xp = x + p * pc;
            for (int64_t i = 0; i < rows; ++i) {
                const int64_t end = k + cnt[i];
                sums[i] = panel_run_one<D>(k, end, stop, cols, vals, xp, sums[i]);
                k = end;
            }
        }
        for (int64_t i = 0; i < rows; ++i) y[r0 + i] = hsum(sums[i]) + (bias ? bias[r0 + i] : 0.0f);
    });
}

// ---- Bitmask (one bit per weight, row-major) + packed values -------------------------------

struct ExpandTable {
    // idx[m][i]: where lane i's value sits among the packed values of byte m; mask: lane kept.
    alignas(32) int32_t idx[256][8];
    alignas(32) int32_t mask[256][8];
    ExpandTable() {
        for (int m = 0; m < 256; ++m) {
            int seen = 0;
            for (int i = 0; i < 8; ++i) {
                const bool on = (m >> i) & 1;
                idx[m][i] = on ? seen : 0;
                mask[m][i] = on ? -1 : 0;
                seen += on;
            }
        }
    }
};
const ExpandTable kExpand;

template <int D>
inline __m256 expand8(const void* vals, int64_t off, unsigned m) {
    const __m256 packed = load8<D>(vals, off);  // values are padded by 8 at the end: never out of bounds
    const __m256 spread = _mm256_permutevar8x32_ps(packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m])));
    return _mm256_and_ps(spread, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.mask[m]))));
}

template <int D>
void bitmask_mv(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, const float* x,
                float* y, const float* bias, int64_t out, int threads) {
    // x is padded with zeros to row_bytes * 8 entries by the caller.
    split_rows(rp, out, row_bytes * 8, threads, [&](int64_t r) {
        const uint8_t* b = bits + r * row_bytes;
        int64_t off = rp[r];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 4 <= row_bytes; c += 4) {  // four bytes (32 columns) per step, four independent sums
            uint32_t word;
            memcpy(&word, b + c, 4);
            const unsigned m0 = word & 0xFF, m1 = (word >> 8) & 0xFF, m2 = (word >> 16) & 0xFF, m3 = word >> 24;
            const int64_t o1 = off + __builtin_popcount(m0), o2 = o1 + __builtin_popcount(m1), o3 = o2 + __builtin_popcount(m2);
            a0 = _mm256_fmadd_ps(expand8<D>(vals, off, m0), _mm256_loadu_ps(x + 8 * c), a0);
            a1 = _mm256_fmadd_ps(expand8<D>(vals, o1, m1), _mm256_loadu_ps(x + 8 * c + 8), a1);
            a2 = _mm256_fmadd_ps(expand8<D>(vals, o2, m2), _mm256_loadu_ps(x + 8 * c + 16), a2);
            a3 = _mm256_fmadd_ps(expand8<D>(vals, o3, m3), _mm256_loadu_ps(x + 8 * c + 24), a3);
            off += __builtin_popcount(word);
        }
        for (; c < row_bytes; ++c) {
            a0 = _mm256_fmadd_ps(expand8<D>(vals, off, b[c]), _mm256_loadu_ps(x + 8 * c), a0);
            off += __builtin_popcount(b[c]);
        }
        a0 = _mm256_add_ps(a0, a2);
        a1 = _mm256_add_ps(a1, a3);
        y[r] = hsum(_mm256_add_ps(a0, a1)) + (bias ? bias[r] : 0.0f);
    });
}

// ---- N:M at half density (2:4, 4:8, 1:2): every byte of the bitmask holds exactly 4 kept ----
//
// One token: instead of spreading the values out to 8 lanes per byte (expand8: half the lanes
// wasted), gather the 4 inputs each byte keeps into half a register (a permute by a 256-entry
// table of bytes with 4 bits set), two bytes fill one: one FMA per 8 kept values at fixed value
// offsets (no popcount chain), about 9 instructions per 16 inputs instead of 14.

struct CompressTable {
    // lo[m]: lanes 0-3 = positions of the set bits of m (ascending); hi[m]: the same in lanes 4-7.
    alignas(32) int32_t lo[256][8];
    alignas(32) int32_t hi[256][8];
    CompressTable() {
        for (int m = 0; m < 256; ++m) {
            int seen = 0;
            for (int i = 0; i < 8; ++i) lo[m][i] = hi[m][i] = 0;
            for (int i = 0; i < 8 && seen < 4; ++i)
                if ((m >> i) & 1) {
                    lo[m][seen] = i;
                    hi[m][4 + seen] = i;
                    ++seen;
                }
        }
    }
};
const CompressTable kCompress;

// The 8 inputs kept by bytes m0 (inputs x[0..7]) and m1 (x[8..15]), in the values' order.
inline __m256 gather_half(const float* x, unsigned m0, unsigned m1) {
    const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lo[m0])));
    const __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.hi[m1])));
    return _mm256_blend_ps(a, b, 0xF0);
}

template <int D>
void nm_half_mv(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, int64_t in, const void* vals,
                const float* x, float* y, const float* bias, int64_t out, int threads) {
    const int64_t full = in / 8;  // bytes that cover 8 real inputs; a ragged last byte goes scalar
    split_rows(rp, out, row_bytes * 8, threads, [&](int64_t r) {
        const uint8_t* b = bits + r * row_bytes;
        int64_t off = rp[r];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= full; c += 8, off += 32) {  // 64 inputs, 32 values, four independent sums
            const char* ahead = static_cast<const char*>(vals) + off * value_bytes<D>();
            prefetch_ahead(ahead, reinterpret_cast<const char*>(b + c));
            _mm_prefetch(ahead + 1024 + 64, _MM_HINT_T0);  // 32 float32 values span two lines
            a0 = _mm256_fmadd_ps(load8<D>(vals, off), gather_half(x + 8 * c, b[c], b[c + 1]), a0);
            a1 = _mm256_fmadd_ps(load8<D>(vals, off + 8), gather_half(x + 8 * c + 16, b[c + 2], b[c + 3]), a1);
            a2 = _mm256_fmadd_ps(load8<D>(vals, off + 16), gather_half(x + 8 * c + 32, b[c + 4], b[c + 5]), a2);
            a3 = _mm256_fmadd_ps(load8<D>(vals, off + 24), gather_half(x + 8 * c + 48, b[c + 6], b[c + 7]), a3);
        }
        for (; c + 2 <= full; c += 2, off += 8) a0 = _mm256_fmadd_ps(load8<D>(vals, off), gather_half(x + 8 * c, b[c], b[c + 1]), a0);
        float tail = 0.0f;
        for (; c < row_bytes; ++c)  // an odd last byte, or a ragged one (in % 8 != 0)
            for (unsigned m = b[c]; m; m &= m - 1) tail += load1<D>(vals, off++) * x[8 * c + __builtin_ctz(m)];
        a0 = _mm256_add_ps(a0, a2);
        a1 = _mm256_add_ps(a1, a3);
        y[r] = hsum(_mm256_add_ps(a0, a1)) + tail + (bias ? bias[r] : 0.0f);
    });
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- One token with AVX-512 (float32 values): masked expand-loads decode the bitmask directly ----
//
// vexpandps puts the next popcount(m) packed values into the lanes m keeps (zeros elsewhere): one
// instruction per 16 columns instead of a table permute and a mask per 8 (expand8). Fewer
// instructions per byte also leave more loads in flight, which is what a memory-bound stream needs.
// Serves bitmask and every N:M pattern (their bitmask has the same layout): 1.33x the AVX2 decoder
// at 70% and 1.15-1.25x the 2:4 kernel (nm_half_mv) on Zen 4, same process, interleaved. csr16 keeps
// its AVX2 gather (16-wide gathers were 5-12% slower), float16/bfloat16 values the AVX2 kernels.

inline float bitmask_row_avx512(const uint8_t* b, int64_t row_bytes, const float* vals, int64_t off, const float* x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= row_bytes; c += 8) {  // 64 columns per step, four independent sums
        uint64_t word;
        memcpy(&word, b + c, 8);
        const __mmask16 m0 = word & 0xFFFF, m1 = (word >> 16) & 0xFFFF, m2 = (word >> 32) & 0xFFFF, m3 = word >> 48;
        const int64_t o1 = off + __builtin_popcount(m0), o2 = o1 + __builtin_popcount(m1), o3 = o2 + __builtin_popcount(m2);
        a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m0, vals + off), _mm512_loadu_ps(x + 8 * c), a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m1, vals + o1), _mm512_loadu_ps(x + 8 * c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m2, vals + o2), _mm512_loadu_ps(x + 8 * c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m3, vals + o3), _mm512_loadu_ps(x + 8 * c + 48), a3);
        off += __builtin_popcountll(word);
    }
    for (; c < row_bytes; c += 2) {  // 16 columns (or the last 8: x is padded to row_bytes * 8 only)
        const __mmask16 m = c + 2 <= row_bytes ? static_cast<__mmask16>(b[c] | (b[c + 1] << 8)) : b[c];
        const __m512 xv = _mm512_maskz_loadu_ps(c + 2 <= row_bytes ? 0xFFFF : 0x00FF, x + 8 * c);
        a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m, vals + off), xv, a0);
        off += __builtin_popcount(m);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

void bitmask_mv_avx512(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const float* vals, const float* x,
                       float* y, const float* bias, int64_t out, int threads) {
    split_rows(rp, out, row_bytes * 8, threads, [&](int64_t r) {
        y[r] = bitmask_row_avx512(bits + r * row_bytes, row_bytes, vals, rp[r], x) + (bias ? bias[r] : 0.0f);
    });
}

#define SC_AVX512 1
#else
#define SC_AVX512 0
#endif

template <int D, typename V, int NV>
inline void bitmask_row_tile(const uint8_t* b, int64_t row_bytes, int64_t off, const void* vals, const float* xtile,
                             int64_t w, int64_t t0, float* dst, float bias) {
    typename V::T acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::set1(bias);
    for (int64_t c = 0; c < row_bytes; ++c) {
        unsigned m = b[c];
        while (m) {
            const int64_t col = 8 * c + __builtin_ctz(m);
            m &= m - 1;
            const typename V::T v = V::set1(load1<D>(vals, off++));
            const float* xr = xtile + col * w + t0;
            for (int j = 0; j < NV; ++j) acc[j] = V::fma(v, V::load(xr + V::lanes * j), acc[j]);
        }
    }
    for (int j = 0; j < NV; ++j) V::store(dst + V::lanes * j, acc[j]);
}

template <int D>
void bitmask_mm(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, int64_t in, const void* vals, const float* xt,
                float* y, const float* bias, int64_t out, int64_t tp, int64_t tokens, int64_t tile, int threads) {
    tiled_rows(out, in, xt, tp, tokens, tile, threads, y, [&](int64_t r, const float* xtile, int64_t w, float* dst) {
        const float bv = bias ? bias[r] : 0.0f;
        const uint8_t* b = bits + r * row_bytes;
        int64_t t = 0;
        constexpr int L = VWide::lanes;
        for (; t + 64 <= w; t += 64) bitmask_row_tile<D, VWide, 64 / L>(b, row_bytes, rp[r], vals, xtile, w, t, dst + t, bv);
        for (; t + 32 <= w; t += 32) bitmask_row_tile<D, VWide, 32 / L>(b, row_bytes, rp[r], vals, xtile, w, t, dst + t, bv);
        for (; t + 16 <= w; t += 16) bitmask_row_tile<D, VWide, 16 / L>(b, row_bytes, rp[r], vals, xtile, w, t, dst + t, bv);
        for (; t + 8 <= w; t += 8) bitmask_row_tile<D, V256, 1>(b, row_bytes, rp[r], vals, xtile, w, t, dst + t, bv);
    });
}

// ---- Blocks of bh x bw (block-CSR over block rows, 32-bit block column indices) -------------

// Enough block rows per chunk that one thread owns whole 64-byte lines of y.
inline int block_rows_per_chunk(int bh) { return bh >= kRowGroup ? 1 : static_cast<int>(kRowGroup / bh); }

template <int D>
void block_mv(const int32_t* brp, const int32_t* bcols, const void* vals, int bh, int bw, const float* x,
              float* y, const float* bias, int64_t out, int threads) {
    const int64_t brows = out / bh, bsize = static_cast<int64_t>(bh) * bw;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, block_rows_per_chunk(bh))
    for (int64_t br = 0; br < brows; ++br) {
        for (int i = 0; i < bh; ++i) {
            __m256 a = _mm256_setzero_ps();
            float s = 0.0f;
            for (int64_t k = brp[br]; k < brp[br + 1]; ++k) {
                const int64_t base = k * bsize + static_cast<int64_t>(i) * bw;
                const float* xr = x + static_cast<int64_t>(bcols[k]) * bw;
                int j = 0;
                for (; j + 8 <= bw; j += 8) a = _mm256_fmadd_ps(load8<D>(vals, base + j), _mm256_loadu_ps(xr + j), a);
                for (; j < bw; ++j) s += load1<D>(vals, base + j) * xr[j];
            }
            const int64_t r = br * bh + i;
            y[r] = hsum(a) + s + (bias ? bias[r] : 0.0f);
        }
    }
}

// Rows i0..i0+RB-1 of block row br over NV * V::lanes tokens from t into buf (row i0 first): for each column of a kept
// block, its run of tokens is loaded once and used by all RB rows (the block's reuse: RB FMAs per
// load, where csr16 has one).
template <int D, typename V, int RB, int NV>
inline void block_rows_tile(const int32_t* brp, const int32_t* bcols, const void* vals, int64_t br, int bh, int bw,
                            int i0, const float* xtile, int64_t w, int64_t t, float* buf, const float* bias) {
    typename V::T acc[RB][NV];
    for (int i = 0; i < RB; ++i)
        for (int n = 0; n < NV; ++n) acc[i][n] = V::set1(bias ? bias[br * bh + i0 + i] : 0.0f);
    const int64_t bsize = static_cast<int64_t>(bh) * bw;
    for (int64_t k = brp[br]; k < brp[br + 1]; ++k) {
        const float* xb = xtile + static_cast<int64_t>(bcols[k]) * bw * w + t;
        const int64_t base = k * bsize + static_cast<int64_t>(i0) * bw;
        for (int j = 0; j < bw; ++j) {
            typename V::T xv[NV];
            for (int n = 0; n < NV; ++n) xv[n] = V::load(xb + j * w + n * V::lanes);
            for (int i = 0; i < RB; ++i) {
                const typename V::T v = V::set1(load1<D>(vals, base + static_cast<int64_t>(i) * bw + j));
                for (int n = 0; n < NV; ++n) acc[i][n] = V::fma(v, xv[n], acc[i][n]);
            }
        }
    }
    for (int i = 0; i < RB; ++i)
        for (int n = 0; n < NV; ++n) V::store(buf + i * kMaxTile + t + n * V::lanes, acc[i][n]);
}

// Rows i0..i0+RB-1 of block row br over the tile's w tokens, as many tokens per pass as 16
// accumulators hold (at most 64): passes over the blocks re-read their values, not X.
template <int D, int RB>
inline void block_rows(const int32_t* brp, const int32_t* bcols, const void* vals, int64_t br, int bh, int bw, int i0,
                       const float* xtile, int64_t w, float* buf, const float* bias) {
    constexpr int L = VWide::lanes;
    int64_t t = 0;
    if constexpr (RB * 8 <= 16 && 8 * L <= kMaxTile)
        for (; t + 8 * L <= w; t += 8 * L) block_rows_tile<D, VWide, RB, 8>(brp, bcols, vals, br, bh, bw, i0, xtile, w, t, buf, bias);
    if constexpr (RB * 4 <= 16 && 4 * L <= kMaxTile)
        for (; t + 4 * L <= w; t += 4 * L) block_rows_tile<D, VWide, RB, 4>(brp, bcols, vals, br, bh, bw, i0, xtile, w, t, buf, bias);
    if constexpr (RB * 2 <= 16)
        for (; t + 2 * L <= w; t += 2 * L) block_rows_tile<D, VWide, RB, 2>(brp, bcols, vals, br, bh, bw, i0, xtile, w, t, buf, bias);
    for (; t + L <= w; t += L) block_rows_tile<D, VWide, RB, 1>(brp, bcols, vals, br, bh, bw, i0, xtile, w, t, buf, bias);
    for (; t + 8 <= w; t += 8) block_rows_tile<D, V256, RB, 1>(brp, bcols, vals, br, bh, bw, i0, xtile, w, t, buf, bias);
}

template <int D>
void block_mm(const int32_t* brp, const int32_t* bcols, const void* vals, int bh, int bw, int64_t in, const float* xt,
              float* y, const float* bias, int64_t out, int64_t tp, int64_t tokens, int64_t tile, int threads) {
    const int64_t brows = out / bh, per = block_rows_per_chunk(bh), chunks = (brows + per - 1) / per;
    const int64_t tiles = (tp + tile - 1) / tile;
    // work items: (token tile, chunk of block rows) in tile-major order, like tiled_rows
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * chunks; ++item) {
        const int64_t t0 = (item / chunks) * tile, w = tp - t0 < tile ? tp - t0 : tile;
        const float* xtile = xt + t0 * in;
        const int64_t br0 = (item % chunks) * per, br1 = br0 + per < brows ? br0 + per : brows;
        for (int64_t br = br0; br < br1; ++br)
            for (int i0 = 0; i0 < bh;) {  // up to kRowGroup rows per pass through the block row's blocks
                const int rows = bh - i0 < static_cast<int>(kRowGroup) ? bh - i0 : static_cast<int>(kRowGroup);
                alignas(64) float buf[kRowGroup * kMaxTile];
                for (int i = 0; i < rows;) {  // 8, 4, 2 or 1 rows at a time
                    auto pass = [&](auto rb) {
                        block_rows<D, decltype(rb)::value>(brp, bcols, vals, br, bh, bw, i0 + i, xtile, w, buf + i * kMaxTile, bias);
                        i += rb;
                    };
                    const int left = rows - i;
                    if (left >= 8) pass(std::integral_constant<int, 8>{});
                    else if (left >= 4) pass(std::integral_constant<int, 4>{});
                    else if (left >= 2) pass(std::integral_constant<int, 2>{});
                    else pass(std::integral_constant<int, 1>{});
                }
                write_block(buf, y, br * bh + i0, rows, out, t0, t0 + w, tokens);
                i0 += rows;
            }
    }
}

template <template <int> class F, typename... A>
int dispatch(int vdtype, A... a) {
    switch (vdtype) {
        case F32: F<F32>::run(a...); return 0;
        case F16: F<F16>::run(a...); return 0;
        case BF16: F<BF16>::run(a...); return 0;
        default: return 1;
    }
}

// Every product's trailing arguments, after the format's arrays: xt, y (tokens, out), bias (may be
// null), out, in, tp, tokens, the token tile (tp > 1) and the thread count.
#define SC_TAIL const float *xt, float *y, const float *bias, int64_t out, int64_t in, int64_t tp, int64_t tokens, \
                int64_t tile, int threads

// One token through the AVX-512 decoder (bitmask and every N:M) when the build has it and the
// values are float32; false when the caller's AVX2 kernel must run instead.
template <int D>
inline bool bitmask_mv_wide(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, const float* x,
                            float* y, const float* bias, int64_t out, int threads) {
#if SC_AVX512
    if (D == F32) {
        bitmask_mv_avx512(rp, bits, row_bytes, static_cast<const float*>(vals), x, y, bias, out, threads);
        return true;
    }
#else
    (void)rp, (void)bits, (void)row_bytes, (void)vals, (void)x, (void)y, (void)bias, (void)out, (void)threads;
#endif
    return false;
}

template <int D> struct Csr16 {
    static void run(const int32_t* rp, const uint16_t* cols, const void* vals, SC_TAIL) {
        if (tp == 1) csr16_mv<D>(rp, cols, vals, xt, y, bias, out, threads);
        else csr16_mm<D>(rp, cols, vals, in, xt, y, bias, out, tp, tokens, tile, threads);
    }
};
template <int D> struct Bitmask {
    static void run(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, SC_TAIL) {
        if (tp > 1) bitmask_mm<D>(rp, bits, row_bytes, in, vals, xt, y, bias, out, tp, tokens, tile, threads);
        else if (!bitmask_mv_wide<D>(rp, bits, row_bytes, vals, xt, y, bias, out, threads))
            bitmask_mv<D>(rp, bits, row_bytes, vals, xt, y, bias, out, threads);
    }
};
template <int D> struct NMHalf {
    static void run(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, SC_TAIL) {
        if (tp > 1) bitmask_mm<D>(rp, bits, row_bytes, in, vals, xt, y, bias, out, tp, tokens, tile, threads);
        else if (!bitmask_mv_wide<D>(rp, bits, row_bytes, vals, xt, y, bias, out, threads))
            nm_half_mv<D>(rp, bits, row_bytes, in, vals, xt, y, bias, out, threads);
    }
};
template <int D> struct Panels {
    static void run(const int32_t* gp, const uint8_t* counts, const uint8_t* cols, const void* vals, int64_t pr, int64_t pc,
                    SC_TAIL) {
        if (tp == 1) panels_mv<D>(gp, counts, cols, vals, pr, pc, in, xt, y, bias, out, threads);
        else panels_mm<D>(gp, counts, cols, vals, pr, pc, in, xt, y, bias, out, tp, tokens, tile, threads);
    }
};
template <int D> struct Block {
    static void run(const int32_t* brp, const int32_t* bcols, const void* vals, int bh, int bw, SC_TAIL) {
        if (tp == 1) block_mv<D>(brp, bcols, vals, bh, bw, xt, y, bias, out, threads);
        else block_mm<D>(brp, bcols, vals, bh, bw, in, xt, y, bias, out, tp, tokens, tile, threads);
    }
};

}  // namespace

extern "C" {

// Bumped whenever a signature or a layout changes: the Python side refuses a mismatched build.
// 8: sc_panels takes the rows per group; 7: sc_panels takes the panel width; 6: sc_panels, sc_run_one; 5: tile-major xt and `in` in every product's tail; 4: sc_nm_half; 3: sc_colskip in the same library.
int sc_abi_version() { return 8; }

// Vector width of the one-token bitmask decoder in this build: 512 (AVX-512) or 256 (AVX2).
int sc_vector_bits() { return SC_AVX512 ? 512 : 256; }

// xt = x (tokens, in) transposed into tiles of `tile` tokens (the layout at the top of this file),
// tokens tokens..tp-1 zero: 8x8 blocks transposed in registers (full 32-byte loads and stores), the
// ragged edges element by element. tile is a multiple of 8, so no 8-token block straddles two tiles.
void sc_transpose_pad(const float* x, int64_t tokens, int64_t in, float* xt, int64_t tp, int64_t tile, int threads) {
    const int64_t full_t = tokens / 8 * 8, full_j = in / 8 * 8;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t t0 = 0; t0 < tp; t0 += 8) {
        const int64_t tile0 = t0 / tile * tile, w = tp - tile0 < tile ? tp - tile0 : tile;
        float* dst = xt + tile0 * in + (t0 - tile0);  // feature j of token t0 + i goes to dst[j * w + i]
        if (t0 < full_t) {
            for (int64_t j0 = 0; j0 < full_j; j0 += 8) {
                __m256 r[8], u[8];
                for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + (t0 + i) * in + j0);
                for (int i = 0; i < 8; i += 2) {
                    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 8; i += 4) {
                    r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
                    r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
                    r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
                    r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
                }
                for (int i = 0; i < 4; ++i) {
                    _mm256_storeu_ps(dst + (j0 + i) * w, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                    _mm256_storeu_ps(dst + (j0 + i + 4) * w, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
                }
            }
            for (int64_t j = full_j; j < in; ++j)
                for (int64_t i = 0; i < 8; ++i) dst[j * w + i] = x[(t0 + i) * in + j];
        } else {
            for (int64_t j = 0; j < in; ++j)
                for (int64_t i = 0; i < 8; ++i) dst[j * w + i] = t0 + i < tokens ? x[(t0 + i) * in + j] : 0.0f;
        }
    }
}

int sc_csr16(const int32_t* rp, const uint16_t* cols, const void* vals, int vdtype, SC_TAIL) {
    return dispatch<Csr16>(vdtype, rp, cols, vals, xt, y, bias, out, in, tp, tokens, tile, threads);
}

int sc_bitmask(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, int vdtype, SC_TAIL) {
    return dispatch<Bitmask>(vdtype, rp, bits, row_bytes, vals, xt, y, bias, out, in, tp, tokens, tile, threads);
}

// N:M formats at half density whose groups tile bytes (2:4, 4:8, 1:2): the bitmask arrays; one
// token takes nm_half_mv, more take the bitmask kernel.
int sc_nm_half(const int32_t* rp, const uint8_t* bits, int64_t row_bytes, const void* vals, int vdtype, SC_TAIL) {
    return dispatch<NMHalf>(vdtype, rp, bits, row_bytes, vals, xt, y, bias, out, in, tp, tokens, tile, threads);
}

// Panels (see panels_mm): group offsets, an 8-bit count per (group, panel, row), 8-bit column offsets,
// pr rows per group, pc columns per panel.
int sc_panels(const int32_t* gp, const uint8_t* counts, const uint8_t* cols, const void* vals, int vdtype, int64_t pr,
              int64_t pc, SC_TAIL) {
    if (pc < 1 || pc > 255 || pr < 1 || pr > kMaxPanelRows) return 3;  // counts are bytes; sums are on the stack
    return dispatch<Panels>(vdtype, gp, counts, cols, vals, pr, pc, xt, y, bias, out, in, tp, tokens, tile, threads);
}

// One token through a plan (plan.h) fixed when the layer is first called (ops._plan), or built per
// call by the torch op of compiled graphs (torch_op.cpp). The thread count follows torch's setting (the
// OpenMP runtime is torch's), capped so that each thread gets at least min_work multiply-adds (waking
// a thread costs more than small products).
int sc_max_threads() { return omp_get_max_threads(); }

int sc_run_one(const ScPlan* p, const float* x, float* y, const float* bias) {
    int64_t threads = omp_get_max_threads(), by_work = p->nnz * 8 / p->min_work;
    threads = threads < by_work ? threads : (by_work > 1 ? by_work : 1);
    const int th = static_cast<int>(threads);
    switch (p->kind) {
        case 0: return dispatch<Csr16>(p->vdtype, static_cast<const int32_t*>(p->a), static_cast<const uint16_t*>(p->b), p->values,
                                       x, y, bias, p->out, p->in, int64_t{1}, int64_t{1}, int64_t{1}, th);
        case 1: return dispatch<Bitmask>(p->vdtype, static_cast<const int32_t*>(p->a), static_cast<const uint8_t*>(p->b), p->row_bytes,
                                         p->values, x, y, bias, p->out, p->in, int64_t{1}, int64_t{1}, int64_t{1}, th);
        case 2: return dispatch<NMHalf>(p->vdtype, static_cast<const int32_t*>(p->a), static_cast<const uint8_t*>(p->b), p->row_bytes,
                                        p->values, x, y, bias, p->out, p->in, int64_t{1}, int64_t{1}, int64_t{1}, th);
        case 3: return dispatch<Block>(p->vdtype, static_cast<const int32_t*>(p->a), static_cast<const int32_t*>(p->b), p->values,
                                       static_cast<int>(p->bh), static_cast<int>(p->bw), x, y, bias, p->out, p->in, int64_t{1},
                                       int64_t{1}, int64_t{1}, th);
        case 4: return dispatch<Panels>(p->vdtype, static_cast<const int32_t*>(p->a), static_cast<const uint8_t*>(p->b),
                                        static_cast<const uint8_t*>(p->c), p->values, int64_t{p->bh}, int64_t{p->bw}, x, y, bias, p->out, p->in,
                                        int64_t{1}, int64_t{1}, int64_t{1}, th);
        default: return 2;
    }
}

int sc_block(const int32_t* brp, const int32_t* bcols, const void* vals, int vdtype, int bh, int bw, SC_TAIL) {
    return dispatch<Block>(vdtype, brp, bcols, vals, bh, bw, xt, y, bias, out, in, tp, tokens, tile, threads);
}

}  // extern "C"
