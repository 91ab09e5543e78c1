// GELU, tanh approximation (GPT-2's gelu_new): y = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³);
// dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²).
//
// gelu_fwd / gelu_bwd: grid-stride element-wise kernels. When every pointer is 16-byte aligned
// (the usual case; a layout offset can break it, so it is checked at run time, uniformly per
// launch) they move 16 bytes per load/store (4 f32 or 8 bf16/f16) and finish the tail one
// element at a time; otherwise every element goes through the scalar loop.
// gelu_bias_fwd: the same with y = gelu(x + b[col]), col = i mod C.
// gelu_bias_bwd: blocks of 32 columns × 8 row lanes walk down the rows (coalesced along C),
// write dx = dy·gelu'(x + b) and keep an f32 partial of db per column, reduced in shared memory
// and written to db_part [gridDim.y, C] (no atomics); colsum_partials (colsum.cu) sums each
// column's partials in a fixed order into db of the input's dtype, bitwise reproducibly.
// tanhf/expf are the accurate versions (no --use_fast_math) to match the CPU kernels.
#include "common.cuh"

#define GELU_K0 0.7978845608028654f  // √(2/π)
#define GELU_K1 0.044715f

__device__ __forceinline__ float gelu_f(float x) {
    float t = tanhf(GELU_K0 * (x + GELU_K1 * x * x * x));
    return 0.5f * x * (1.f + t);
}

__device__ __forceinline__ float gelu_grad(float x) {
    float t = tanhf(GELU_K0 * (x + GELU_K1 * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_K0 * (1.f + 3.f * GELU_K1 * x * x);
}

template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// Grid-stride over n elements of T: when `aligned`, packed(i) for each whole 16-byte Pack i,
// then scalar(i) for each element after the last pack; otherwise scalar(i) for every element.
template <typename T, typename Packed, typename Scalar>
__device__ __forceinline__ void for_each_packed(size_t n, bool aligned, Packed packed,
                                                Scalar scalar) {
    constexpr int V = Pack<T>::N;
    size_t start = 0;
    if (aligned) {
        size_t nv = n / V;
        for (size_t i = grid_tid(); i < nv; i += grid_stride()) packed(i);
        start = nv * V;
    }
    for (size_t i = start + grid_tid(); i < n; i += grid_stride()) scalar(i);
}

template <typename T>
__device__ __forceinline__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, size_t n) {
    for_each_packed<T>(
        n, aligned16(x) && aligned16(y),
        [=](size_t i) {
            Pack<T> p = reinterpret_cast<const Pack<T>*>(x)[i];
#pragma unroll
            for (int k = 0; k < Pack<T>::N; k++) p.v[k] = from_f32<T>(gelu_f(to_f32(p.v[k])));
            reinterpret_cast<Pack<T>*>(y)[i] = p;
        },
        [=](size_t i) { y[i] = from_f32<T>(gelu_f(to_f32(x[i]))); });
}

template <typename T>
__device__ __forceinline__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ dy,
                                         T* __restrict__ dx, size_t n) {
    for_each_packed<T>(
        n, aligned16(x) && aligned16(dy) && aligned16(dx),
        [=](size_t i) {
            Pack<T> px = reinterpret_cast<const Pack<T>*>(x)[i];
            Pack<T> pd = reinterpret_cast<const Pack<T>*>(dy)[i];
#pragma unroll
            for (int k = 0; k < Pack<T>::N; k++)
                pd.v[k] = from_f32<T>(to_f32(pd.v[k]) * gelu_grad(to_f32(px.v[k])));
            reinterpret_cast<Pack<T>*>(dx)[i] = pd;
        },
        [=](size_t i) { dx[i] = from_f32<T>(to_f32(dy[i]) * gelu_grad(to_f32(x[i]))); });
}

// x, y: n = rows·C elements; b: C elements, b[i mod C] for element i.
template <typename T>
__device__ __forceinline__ void gelu_bias_fwd(const T* __restrict__ x, const T* __restrict__ b,
                                              T* __restrict__ y, size_t n, int C) {
    constexpr int V = Pack<T>::N;
    // Captures in parameter order: with [=] nvcc numbers the PTX registers differently.
    for_each_packed<T>(
        n, aligned16(x) && aligned16(y),
        [x, b, y, C](size_t i) {
            Pack<T> p = reinterpret_cast<const Pack<T>*>(x)[i];
            int col = (int)((i * V) % (size_t)C);
#pragma unroll
            for (int k = 0; k < V; k++) {
                p.v[k] = from_f32<T>(gelu_f(to_f32(p.v[k]) + to_f32(b[col])));
                if (++col == C) col = 0;
            }
            reinterpret_cast<Pack<T>*>(y)[i] = p;
        },
        [=](size_t i) { y[i] = from_f32<T>(gelu_f(to_f32(x[i]) + to_f32(b[i % (size_t)C]))); });
}

// blockDim = (32, 8); grid = (ceil(C/32), parts) from cols_config. db_part holds parts·C floats,
// all written here.
template <typename T>
__device__ __forceinline__ void gelu_bias_bwd(const T* __restrict__ x, const T* __restrict__ b,
                                              const T* __restrict__ dy, T* __restrict__ dx,
                                              float* __restrict__ db_part, int n_rows, int C) {
    __shared__ float sdb[8][32];
    int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (c < C) {
        float bc = to_f32(b[c]);
        for (int64_t r = (int64_t)blockIdx.y * 8 + threadIdx.y; r < n_rows;
             r += (int64_t)gridDim.y * 8) {
            int64_t i = r * C + c;
            float g = to_f32(dy[i]) * gelu_grad(to_f32(x[i]) + bc);
            dx[i] = from_f32<T>(g);
            acc += g;
        }
    }
    col_partial_store(acc, sdb, db_part, C);
}

#define GELU_KERNELS(T, S)                                                                        \
    extern "C" __global__ void gelu_fwd_##S(const T* x, T* y, size_t n) { gelu_fwd<T>(x, y, n); } \
    extern "C" __global__ void gelu_bwd_##S(const T* x, const T* dy, T* dx, size_t n) {          \
        gelu_bwd<T>(x, dy, dx, n);                                                               \
    }                                                                                            \
    extern "C" __global__ void gelu_bias_fwd_##S(const T* x, const T* b, T* y, size_t n,         \
                                                 int C) {                                        \
        gelu_bias_fwd<T>(x, b, y, n, C);                                                         \
    }                                                                                            \
    extern "C" __global__ void gelu_bias_bwd_##S(const T* x, const T* b, const T* dy, T* dx,     \
                                                 float* db_part, int n_rows, int C) {            \
        gelu_bias_bwd<T>(x, b, dy, dx, db_part, n_rows, C);                                      \
    }

KILN_FOR_FLOATS(GELU_KERNELS)
