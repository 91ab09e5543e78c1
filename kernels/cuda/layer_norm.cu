// Layer norm over the last dim: y = (x − mean)·rstd·w + b, rstd = 1/sqrt(var + eps).
//
// Forward (layer_norm_fwd): one row per warp for rows up to 1024 wide (8 rows per block, no
// shared memory or __syncthreads), one row per block for wider rows. Two-pass statistics
// (mean, then Σ(x − mean)²) rather than E[x²] − mean², which loses precision; the row is
// re-read from L1/L2 for each pass. mean and rstd are saved in f32 for the backward.
//
// Backward, split in two kernels so that neither needs more than 32 floats of shared memory
// whatever C is (llm.c's fused version keeps C-wide dw/db partials in shared memory instead):
// - layer_norm_bwd_dx: one row per warp/block, like the forward;
//     dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = w·dy, x̂ = (x − mean)·rstd.
// - layer_norm_bwd_dwdb: blocks of 32 columns × 8 row lanes walk down the rows, so loads are
//   coalesced along C; each block reduces its rows in shared memory and writes one f32 partial
//   per column into dw_part/db_part [gridDim.y, C] (no atomics). colsum_partials (colsum.cu)
//   then sums each column's partials in a fixed order into dw/db of the input's dtype, so dw
//   and db are bitwise reproducible.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                               const T* __restrict__ b, T* __restrict__ y,
                                               float* __restrict__ mean_out,
                                               float* __restrict__ rstd_out, int n_rows, int C,
                                               float eps) {
    __shared__ float scratch[32];
    int64_t row = row_index();
    if (row >= n_rows) return;  // whole warps only: rows > n_rows exist only for warp rows
    const T* xr = x + row * C;
    T* yr = y + row * C;

    float sum = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) sum += to_f32(xr[c]);
    float mean = row_sum(sum, scratch) / C;

    float sq = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = to_f32(xr[c]) - mean;
        sq += d * d;
    }
    float rstd = rsqrtf(row_sum(sq, scratch) / C + eps);

    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float xh = (to_f32(xr[c]) - mean) * rstd;
        yr[c] = from_f32<T>(xh * to_f32(w[c]) + to_f32(b[c]));
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ w,
                                                  const float* __restrict__ mean,
                                                  const float* __restrict__ rstd,
                                                  const T* __restrict__ dy, T* __restrict__ dx,
                                                  int n_rows, int C) {
    __shared__ float scratch[32];
    int64_t row = row_index();
    if (row >= n_rows) return;
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    T* dxr = dx + row * C;
    float m = mean[row], r = rstd[row];

    float sg = 0.f, sgx = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float g = to_f32(w[c]) * to_f32(dyr[c]);
        float xh = (to_f32(xr[c]) - m) * r;
        sg += g;
        sgx += g * xh;
    }
    float mg = row_sum(sg, scratch) / C;
    float mgx = row_sum(sgx, scratch) / C;

    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float g = to_f32(w[c]) * to_f32(dyr[c]);
        float xh = (to_f32(xr[c]) - m) * r;
        dxr[c] = from_f32<T>(r * (g - mg - xh * mgx));
    }
}

// blockDim = (32, 8); grid = (ceil(C/32), parts) from cols_config. dw_part and db_part hold
// parts·C floats, all written here.
template <typename T>
__device__ __forceinline__ void layer_norm_bwd_dwdb(const T* __restrict__ x,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd,
                                                    const T* __restrict__ dy,
                                                    float* __restrict__ dw_part,
                                                    float* __restrict__ db_part, int n_rows,
                                                    int C) {
    __shared__ float sw[8][32];
    __shared__ float sb[8][32];
    int c = blockIdx.x * 32 + threadIdx.x;
    float aw = 0.f, ab = 0.f;
    if (c < C) {
        for (int64_t r = (int64_t)blockIdx.y * 8 + threadIdx.y; r < n_rows;
             r += (int64_t)gridDim.y * 8) {
            float d = to_f32(dy[r * C + c]);
            float xh = (to_f32(x[r * C + c]) - mean[r]) * rstd[r];
            aw += d * xh;
            ab += d;
        }
    }
    col_partial_store(aw, sw, dw_part, C);
    col_partial_store(ab, sb, db_part, C);
}

#define LAYER_NORM_KERNELS(T, S)                                                                  \
    extern "C" __global__ void layer_norm_fwd_##S(const T* x, const T* w, const T* b, T* y,      \
                                                  float* mean, float* rstd, int n_rows, int C,   \
                                                  float eps) {                                   \
        layer_norm_fwd<T>(x, w, b, y, mean, rstd, n_rows, C, eps);                               \
    }                                                                                            \
    extern "C" __global__ void layer_norm_bwd_dx_##S(const T* x, const T* w, const float* mean,  \
                                                     const float* rstd, const T* dy, T* dx,      \
                                                     int n_rows, int C) {                        \
        layer_norm_bwd_dx<T>(x, w, mean, rstd, dy, dx, n_rows, C);                               \
    }                                                                                            \
    extern "C" __global__ void layer_norm_bwd_dwdb_##S(const T* x, const float* mean,            \
                                                       const float* rstd, const T* dy,           \
                                                       float* dw_part, float* db_part,           \
                                                       int n_rows, int C) {                      \
        layer_norm_bwd_dwdb<T>(x, mean, rstd, dy, dw_part, db_part, n_rows, C);                  \
    }

KILN_FOR_FLOATS(LAYER_NORM_KERNELS)
