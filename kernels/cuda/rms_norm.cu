// RMS norm over the last dim: y = x·rstd·w, rstd = 1/sqrt(mean(x²) + eps).
//
// Same structure as layer_norm.cu:
// - rms_norm_fwd: one row per warp (rows up to 1024 wide, 8 rows per block, no shared memory)
//   or one row per block (wider rows); one reduction per row, rstd saved in f32.
// - rms_norm_bwd_dx: one row per warp/block; dx = rstd·(g − x̂·mean(g·x̂)), g = w·dy, x̂ = x·rstd.
// - rms_norm_bwd_dw: blocks of 32 columns × 8 row lanes walk down the rows (coalesced along C),
//   reduce in shared memory, and write one f32 partial per column into dw_part [gridDim.y, C]
//   (no atomics); colsum_partials (colsum.cu) sums them in a fixed order into dw of the
//   input's dtype, bitwise reproducibly. Keeping dw out of the dx kernel means no C-wide
//   shared buffers, so any C works without raising the shared-memory limit.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                             T* __restrict__ y, float* __restrict__ rstd_out,
                                             int n_rows, int C, float eps) {
    __shared__ float scratch[32];
    int64_t row = row_index();
    if (row >= n_rows) return;  // whole warps only
    const T* xr = x + row * C;
    T* yr = y + row * C;

    float sq = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = to_f32(xr[c]);
        sq += v * v;
    }
    float rstd = rsqrtf(row_sum(sq, scratch) / C + eps);

    for (int c = threadIdx.x; c < C; c += blockDim.x)
        yr[c] = from_f32<T>(to_f32(xr[c]) * rstd * to_f32(w[c]));
    if (threadIdx.x == 0) rstd_out[row] = rstd;
}

template <typename T>
__device__ __forceinline__ void rms_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ w,
                                                const float* __restrict__ rstd,
                                                const T* __restrict__ dy, T* __restrict__ dx,
                                                int n_rows, int C) {
    __shared__ float scratch[32];
    int64_t row = row_index();
    if (row >= n_rows) return;
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    T* dxr = dx + row * C;
    float r = rstd[row];

    float sgx = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        sgx += to_f32(w[c]) * to_f32(dyr[c]) * to_f32(xr[c]) * r;
    float mgx = row_sum(sgx, scratch) / C;

    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float g = to_f32(w[c]) * to_f32(dyr[c]);
        float xh = to_f32(xr[c]) * r;
        dxr[c] = from_f32<T>(r * (g - xh * mgx));
    }
}

// blockDim = (32, 8); grid = (ceil(C/32), parts) from cols_config. dw_part holds parts·C floats,
// all written here.
template <typename T>
__device__ __forceinline__ void rms_norm_bwd_dw(const T* __restrict__ x,
                                                const float* __restrict__ rstd,
                                                const T* __restrict__ dy,
                                                float* __restrict__ dw_part, int n_rows, int C) {
    __shared__ float sw[8][32];
    int c = blockIdx.x * 32 + threadIdx.x;
    float aw = 0.f;
    if (c < C) {
        for (int64_t r = (int64_t)blockIdx.y * 8 + threadIdx.y; r < n_rows;
             r += (int64_t)gridDim.y * 8)
            aw += to_f32(dy[r * C + c]) * to_f32(x[r * C + c]) * rstd[r];
    }
    col_partial_store(aw, sw, dw_part, C);
}

#define RMS_NORM_KERNELS(T, S)                                                                    \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, float* rstd,       \
                                                int n_rows, int C, float eps) {                  \
        rms_norm_fwd<T>(x, w, y, rstd, n_rows, C, eps);                                          \
    }                                                                                            \
    extern "C" __global__ void rms_norm_bwd_dx_##S(const T* x, const T* w, const float* rstd,    \
                                                   const T* dy, T* dx, int n_rows, int C) {      \
        rms_norm_bwd_dx<T>(x, w, rstd, dy, dx, n_rows, C);                                       \
    }                                                                                            \
    extern "C" __global__ void rms_norm_bwd_dw_##S(const T* x, const float* rstd, const T* dy,   \
                                                   float* dw_part, int n_rows, int C) {          \
        rms_norm_bwd_dw<T>(x, rstd, dy, dw_part, n_rows, C);                                     \
    }

KILN_FOR_FLOATS(RMS_NORM_KERNELS)
