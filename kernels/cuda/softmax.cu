// Softmax over the last dim, one row per warp (rows up to 1024 wide, 8 rows per block) or one
// row per block (wider rows).
//
// softmax_fwd is "online": a single pass keeps a running (max m, Σ exp(x − m)) per thread,
// rescaling the sum when the max grows, then the per-thread pairs are merged across the
// warp/block. That is one read of the row for the statistics instead of two (max, then sum);
// a second read writes y = exp(x − m) / Σ. exp(−inf) terms are kept out explicitly so masked
// (−inf) entries give 0 rather than NaN; a row that is entirely −inf gives NaN, like the
// plain max/exp/sum composition.
//
// softmax_bwd: dx = y·(dy − Σ dy·y), one row reduction then an element-wise pass.
#include "common.cuh"

// Merges the partial softmax statistics (m2, s2) into (m, s).
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == -INFINITY) {  // both empty (s, s2 are 0, or NaN to pass on)
        s += s2;
        return;
    }
    // An empty side has m = −inf: its factor exp(−inf) = 0 (and a NaN sum stays NaN).
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void warp_online(float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o);
        float s2 = __shfl_xor_sync(0xffffffff, s, o);
        online_merge(m, s, m2, s2);
    }
}

// Merges (m, s) over the threads of one row; every thread gets the result.
__device__ __forceinline__ void row_online(float& m, float& s, float* sm, float* ss) {
    warp_online(m, s);
    if (blockDim.x == 32) return;  // uniform across the block
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? sm[lane] : -INFINITY;
    s = lane < warps ? ss[lane] : 0.f;
    warp_online(m, s);
}

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y,
                                            int n_rows, int C) {
    __shared__ float sm[32], ss[32];
    int64_t row = row_index();
    if (row >= n_rows) return;  // whole warps only
    const T* xr = x + row * C;
    T* yr = y + row * C;

    float m = -INFINITY, s = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = to_f32(xr[c]);
        if (v > m) {  // new max (from m = −inf: exp(−inf) = 0)
            s = s * expf(m - v) + 1.f;
            m = v;
        } else if (v != -INFINITY) {  // includes NaN, which poisons the row
            s += expf(v - m);
        }
    }
    row_online(m, s, sm, ss);

    float inv = 1.f / s;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        yr[c] = from_f32<T>(expf(to_f32(xr[c]) - m) * inv);
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy,
                                            T* __restrict__ dx, int n_rows, int C) {
    __shared__ float scratch[32];
    int64_t row = row_index();
    if (row >= n_rows) return;
    const T* yr = y + row * C;
    const T* dyr = dy + row * C;
    T* dxr = dx + row * C;

    float acc = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) acc += to_f32(dyr[c]) * to_f32(yr[c]);
    float dot = row_sum(acc, scratch);

    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dxr[c] = from_f32<T>(to_f32(yr[c]) * (to_f32(dyr[c]) - dot));
}

#define SOFTMAX_KERNELS(T, S)                                                                     \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, int n_rows, int C) {            \
        softmax_fwd<T>(x, y, n_rows, C);                                                         \
    }                                                                                            \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, int n_rows,       \
                                               int C) {                                          \
        softmax_bwd<T>(y, dy, dx, n_rows, C);                                                    \
    }

KILN_FOR_FLOATS(SOFTMAX_KERNELS)
