// Activation-sparse products for one-token decoding: y = bias + W x where most of x is dropped.
//
// W is given transposed, wt (in, out) row-major with leading dimension ld (>= out): input
// feature i's weights are one contiguous run wt[i*ld : i*ld + out], so skipping an input skips
// a contiguous read, and time falls with the fraction of inputs kept (the product is bound by
// reading weights). Which inputs are kept is decided here, in one pass over x:
//   k > 0  : the k largest scores |x_i| * scale_i (WINA; scale = column norms), exactly k;
//   k == 0 : every i with |x_i| * scale_i > tau_i (magnitude thresholds, TEAL / CHESS); tau null
//            means 0, i.e. skip the exact zeros (a ReLU's or a thresholded activation's output).
// scale null means 1. Built into the same library as sparse_kernels.cpp (same flags, OpenMP).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>

namespace {

// Selected inputs, ascending (so rows of wt are read in address order).
int64_t select_inputs(const float* x, int64_t in, const float* scale, const float* tau, int64_t k, int32_t* idx,
                      float* score) {
    if (k <= 0) {
        int64_t n = 0;
        for (int64_t i = 0; i < in; ++i) {
            float s = x[i] < 0 ? -x[i] : x[i];
            if (scale) s *= scale[i];
            if (s > (tau ? tau[i] : 0.0f)) idx[n++] = static_cast<int32_t>(i);
        }
        return n;
    }
    if (k >= in) {
        for (int64_t i = 0; i < in; ++i) idx[i] = static_cast<int32_t>(i);
        return in;
    }
    for (int64_t i = 0; i < in; ++i) {
        float s = x[i] < 0 ? -x[i] : x[i];
        score[i] = scale ? s * scale[i] : s;
        idx[i] = static_cast<int32_t>(i);
    }
    std::nth_element(idx, idx + k, idx + in, [score](int32_t a, int32_t b) { return score[a] > score[b]; });
    std::sort(idx, idx + k);
    return k;
}

// acc[0:width] += sum over the selected rows r of x[r] * wt[r*ld + o0 : ... + width]
void accumulate(const float* wt, int64_t ld, const float* x, const int32_t* idx, int64_t n, int64_t o0, int64_t width,
                float* acc) {
    const int64_t vec = width / 8 * 8;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // four rows per pass: one load and store of acc per four FMAs
        const float* w0 = wt + idx[j] * ld + o0;
        const float* w1 = wt + idx[j + 1] * ld + o0;
        const float* w2 = wt + idx[j + 2] * ld + o0;
        const float* w3 = wt + idx[j + 3] * ld + o0;
        const __m256 x0 = _mm256_set1_ps(x[idx[j]]), x1 = _mm256_set1_ps(x[idx[j + 1]]);
        const __m256 x2 = _mm256_set1_ps(x[idx[j + 2]]), x3 = _mm256_set1_ps(x[idx[j + 3]]);
        for (int64_t c = 0; c < vec; c += 8) {
            __m256 a = _mm256_loadu_ps(acc + c);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), x0, a);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), x1, a);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), x2, a);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), x3, a);
            _mm256_storeu_ps(acc + c, a);
        }
        for (int64_t c = vec; c < width; ++c)
            acc[c] += w0[c] * x[idx[j]] + w1[c] * x[idx[j + 1]] + w2[c] * x[idx[j + 2]] + w3[c] * x[idx[j + 3]];
    }
    for (; j < n; ++j) {
        const float* w = wt + idx[j] * ld + o0;
        const float xv = x[idx[j]];
        const __m256 xb = _mm256_set1_ps(xv);
        for (int64_t c = 0; c < vec; c += 8)
            _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(_mm256_loadu_ps(w + c), xb, _mm256_loadu_ps(acc + c)));
        for (int64_t c = vec; c < width; ++c) acc[c] += w[c] * xv;
    }
}

constexpr int64_t kTile = 2048;  // outputs accumulated at once: 8 KiB, stays in L1

}  // namespace

extern "C" {

// idx_buf and score_buf: scratch of `in` int32 / float each. Returns the number of inputs kept
// (>= 0), or -1 on bad arguments. threads: at most this many (the caller sizes it to the work).
int64_t sc_colskip(const float* wt, int64_t in, int64_t out, int64_t ld, const float* x, const float* scale,
                   const float* tau, int64_t k, const float* bias, float* y, int32_t* idx_buf, float* score_buf,
                   int threads) {
    if (in <= 0 || out <= 0 || ld < out || in > INT32_MAX) return -1;
    const int64_t n = select_inputs(x, in, scale, tau, k, idx_buf, score_buf);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        // contiguous output ranges per thread, multiples of 16 floats (a 64-byte line) so no line is shared
        const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = ((out + team - 1) / team + 15) / 16 * 16;
        const int64_t lo = t * per, hi = std::min(out, lo + per);
        for (int64_t o0 = lo; o0 < hi; o0 += kTile) {
            const int64_t width = std::min(kTile, hi - o0);
            float* acc = y + o0;
            for (int64_t c = 0; c < width; ++c) acc[c] = bias ? bias[o0 + c] : 0.0f;
            accumulate(wt, ld, x, idx_buf, n, o0, width, acc);
        }
    }
    return n;
}

// Gated MLP, one token: h_i = a_i * (W_up[i] . x) where a_i != 0, else 0 (the up projection's rows
// of dropped activations are never read; CHESS). w_up (hidden, in) row-major, leading dimension ld.
void sc_gated_rows(const float* w_up, int64_t hidden, int64_t in, int64_t ld, const float* x, const float* a,
                   const float* up_bias, float* h, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < hidden; ++i) {
        if (a[i] == 0.0f) {
            h[i] = 0.0f;
            continue;
        }
        const float* w = w_up + i * ld;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= in; j += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), s1);
        }
        __m256 s = _mm256_add_ps(s0, s1);
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        float dot = _mm_cvtss_f32(q);
        for (; j < in; ++j) dot += w[j] * x[j];
        h[i] = a[i] * (up_bias ? dot + up_bias[i] : dot);
    }
}

}  // extern "C"
