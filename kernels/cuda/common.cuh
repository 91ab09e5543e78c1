// Shared helpers for kiln's kernels: dtype conversion (all arithmetic happens in f32) and
// warp/block reductions built on shuffles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024) with the warp
// reduction WARP; `empty` is its identity, the value of the lanes past the last warp. Every
// thread gets the result. `scratch` holds 32 floats of shared memory.
template <float (*WARP)(float)>
__device__ __forceinline__ float block_reduce(float v, float empty, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = WARP(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : empty;
    return WARP(v);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<warp_sum>(v, 0.f, scratch);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<warp_max>(v, -INFINITY, scratch);
}

// Adds `off` elements to each pointer, e.g. to move a kernel's [B,H,T,D] arguments to head bh:
// advance(bh * t * d, q, k, v).
template <typename... P> __device__ __forceinline__ void advance(size_t off, P&... p) {
    ((p += off), ...);
}

constexpr float LOG2E = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x·LOG2E)
constexpr float LN2 = 0.6931471805599453f;    // ln(2):   log(x) = log2(x)·LN2

// Instantiates `name##_f32/_bf16/_f16` extern "C" kernels from a templated `name<T>` body.
// Usage: KILN_FOR_FLOATS(MACRO) where MACRO(T, suffix) defines one extern "C" kernel.
#define KILN_FOR_FLOATS(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)

// ---- Row kernels (layer_norm, rms_norm, softmax, embedding) ----
// A row kernel runs one row per warp (blockDim = (32, rows per block)) or one row per block
// (blockDim = (32·k, 1)); `rows_config` in src/cuda/mod.rs picks the shape from the row width.
__device__ __forceinline__ int64_t row_index() {
    return (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
}

// Sum over the threads of one row; the branch is uniform across the block, so block_sum's
// __syncthreads is safe. `scratch`: 32 floats of shared memory (unused for warp rows).
__device__ __forceinline__ float row_sum(float v, float* scratch) {
    return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}

__device__ __forceinline__ float row_max(float v, float* scratch) {
    return blockDim.x == 32 ? warp_max(v) : block_max(v, scratch);
}

// ---- Grid-stride loops over a 1-D grid: for (i = grid_tid(); i < n; i += grid_stride()) ----
__device__ __forceinline__ size_t grid_tid() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// Grid-stride f32 → T copy: the last step of kernels that accumulate with f32 atomics.
template <typename T>
__device__ __forceinline__ void cast_from_f32(const float* __restrict__ src, T* __restrict__ dst,
                                              size_t n) {
    for (size_t i = grid_tid(); i < n; i += grid_stride()) dst[i] = from_f32<T>(src[i]);
}

// ---- Column reductions (layer_norm dw/db, rms_norm dw, bias-GELU db) ----
// blockDim = (32, 8), grid = (ceil(C/32), parts) from `cols_config` in src/cuda/mod.rs: thread
// (x, y) of block (bx, by) sums column bx·32 + x over rows by·8 + y, by·8 + y + 8·parts, …; then
// col_partial_store adds the 8 row lanes in a fixed order and writes the block's partial to
// partials[by·C + c]. colsum_partials (colsum.cu) sums the parts of each column in a fixed
// order: no atomics, so the result is bitwise reproducible. Every thread of the block must call
// it (it syncs); `s` is shared scratch, a different one for each value a kernel stores.
__device__ __forceinline__ void col_partial_store(float v, float (&s)[8][32],
                                                  float* __restrict__ partials, int C) {
    s[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    int c = blockIdx.x * 32 + threadIdx.x;
    if (threadIdx.y == 0 && c < C) {
#pragma unroll
        for (int i = 1; i < 8; i++) v += s[i][threadIdx.x];
        partials[(int64_t)blockIdx.y * C + c] = v;
    }
}
