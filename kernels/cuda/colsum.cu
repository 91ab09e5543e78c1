// Second step of kiln's deterministic column reductions (layer_norm dw/db, rms_norm dw, bias-GELU
// db). The first step is a `cols_config` kernel (blocks of 32 columns × 8 row lanes walking down
// the rows, see `col_partial_store` in common.cuh) that writes one f32 partial per (block row,
// column) into partials[parts, C], parts = its gridDim.y, without atomics.
//
// colsum_partials: blockDim = (32, 32), grid = ceil(C/32). Lane y of column c sums the parts
// p = y, y + 32, y + 64, … in increasing order, then lane 0 adds the 32 lane sums in order and
// writes out[c] cast to T. The order depends only on (parts, C), which `cols_config` derives from
// (rows, C) alone, so the sums are bitwise identical from run to run.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void colsum_partials(const float* __restrict__ partials,
                                                T* __restrict__ out, int parts, int C) {
    __shared__ float s[32][32];
    int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (c < C) {
        for (int p = threadIdx.y; p < parts; p += 32) acc += partials[(int64_t)p * C + c];
    }
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
#pragma unroll
        for (int i = 1; i < 32; i++) acc += s[i][threadIdx.x];
        out[c] = from_f32<T>(acc);
    }
}

#define COLSUM_KERNELS(T, S)                                                                      \
    extern "C" __global__ void colsum_partials_##S(const float* partials, T* out, int parts,     \
                                                   int C) {                                      \
        colsum_partials<T>(partials, out, parts, C);                                             \
    }

KILN_FOR_FLOATS(COLSUM_KERNELS)
