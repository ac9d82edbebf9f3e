// One layer's one-token plan (sc_run_one): shared by the kernels and the torch op (torch_op.cpp).
#pragma once
#include <stdint.h>

extern "C" {

// One token through a plan: four arguments instead of fourteen, because at decoding each ctypes
// argument costs about 0.3 us of a call that moves 50-800 us of weights.
struct ScPlan {
    int32_t kind;  // 0 csr16, 1 bitmask, 2 N:M at half density, 3 block, 4 panels
    int32_t vdtype;  // 0 float32, 1 float16, 2 bfloat16
    int64_t out, in, nnz, min_work, row_bytes;
    const void *a, *b, *c, *values;  // the format's arrays in the order of its sc_ function
    int32_t bh, bw;  // block: (bh, bw); panels: (rows per group, columns per panel)
};

int sc_run_one(const ScPlan* p, const float* x, float* y, const float* bias);
}
