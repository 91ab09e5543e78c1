// Fused causal self-attention, FlashAttention-2 style: memory linear in T, never a T×T buffer.
// q, k, v, o: [B,H,T,D] contiguous; lse: [B,H,T] f32 (natural log).
//
// Forward (attention_fwd_d{32,64,128}_<dtype>): one block per (b·h, tile of BR query rows).
//   The Q tile sits in shared memory (pre-scaled by scale·log2 e so the softmax runs on exp2);
//   the block walks the key/value tiles of BC columns up to the causal diagonal, stages each K
//   then V tile in one shared buffer, and keeps an online softmax (running max m and sum l per
//   row, f32) with the output accumulated in f32 registers. Each thread owns a RM×CN micro-tile
//   of the score tile and the same RM rows × DP/8 columns of the output; the 8 threads sharing a
//   row are 8 consecutive lanes, so row max/sum are 3 shuffles. P goes through shared memory
//   for the P·V product. Query tiles are launched last-first: they hold the most work.
// Backward (FlashAttention-2): attention_bwd_delta computes Δ_i = Σ_d do_id·o_id (one warp per
//   row); attention_bwd_d{32,64,128} runs one block per (b·h, tile of BC key rows) with K and V
//   in shared memory and dK, dV in f32 registers, loops over the query tiles at or after the
//   diagonal, recomputes p = exp(s − lse) and ds = p·(do·v − Δ), accumulates dV += Pᵀ·dO and
//   dK += dSᵀ·Q, and adds each tile's dQ = dS·K into an f32 buffer with atomicAdd (one atomic
//   per element per (key tile, query tile) pair); attention_dq_cast converts it for bf16/f16.
//
// Dropout on the probabilities (the `_drop` kernels, DROP = true): P·V and the backward use
// p·z with z = drop.mul(((b·H + h)·T + i)·T + j) (philox.cuh, the CPU op's multipliers);
// the softmax sums and lse stay those of the undropped p, and dS = p·(z·dP − Δ).
//
// Head dims are padded to DP ∈ {32, 64, 128} (compile time: register tile sizes); the inner
// products loop over the real D and padded lanes of shared tiles are zero, as are rows ≥ T, so
// masked or padded entries contribute exactly 0 and are never written. Tile sizes keep static
// shared memory under 48 KB (rows padded by one float against bank conflicts), which is what
// forces the small 16×16 backward tile at D = 128.
//
// This first version uses plain f32 FMA loops (inputs converted to f32 when staged). The three
// inner products per tile (Q·Kᵀ, P·V, and in the backward Q·Kᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K) are
// each one self-contained loop over shared-memory tiles, so they can be swapped for mma/WMMA
// (tensor cores, operands kept in bf16/f16) without changing the block structure.
#include "common.cuh"
#include "philox.cuh"

namespace attn {

constexpr int NT = 128;       // threads per block
constexpr int TX = 8;         // threads sharing one row (consecutive lanes)
constexpr int TY = NT / TX;   // 16 row groups

// Reductions over the 8 consecutive lanes that share a row; every lane gets the result.
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
    for (int o = TX / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
    for (int o = TX / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sets a register tile to 0.
template <int R, int C> __device__ __forceinline__ void zero(float (&a)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) a[i][j] = 0.f;
}

// Stages rows [row0, row0+ROWS) of a [T, D] matrix as f32 into dst[ROWS][DP+1], times `mul`;
// rows ≥ T and columns ≥ D are zero. Consecutive threads read consecutive elements.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile(float (*dst)[DP + 1], const T* __restrict__ src,
                                          int row0, int t, int d_real, float mul) {
    for (int e = threadIdx.x; e < ROWS * DP; e += NT) {
        const int r = e / DP, d = e % DP, gr = row0 + r;
        float x = 0.f;
        if (gr < t && d < d_real) x = to_f32(src[(size_t)gr * d_real + d]) * mul;
        dst[r][d] = x;
    }
}

// Tile sizes. Forward: BR query rows × BC key columns. Backward: BC key rows × BR query rows.
template <int DP> struct FwdCfg;
template <> struct FwdCfg<32> { static constexpr int BR = 64, BC = 64; };
template <> struct FwdCfg<64> { static constexpr int BR = 64, BC = 32; };
template <> struct FwdCfg<128> { static constexpr int BR = 32, BC = 32; };
template <int DP> struct BwdCfg;
template <> struct BwdCfg<32> { static constexpr int BC = 64, BR = 32; };
template <> struct BwdCfg<64> { static constexpr int BC = 32, BR = 32; };
template <> struct BwdCfg<128> { static constexpr int BC = 16, BR = 16; };

// grid = (B·H, ceil(T/BR)), block = NT. scale_log2 = scale·log2(e).
template <typename T, int DP, bool DROP>
__device__ __forceinline__ void fwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ o,
                                    float* __restrict__ lse, int t, int d_real, float scale_log2,
                                    const Drop drop) {
    constexpr int BR = FwdCfg<DP>::BR, BC = FwdCfg<DP>::BC;
    constexpr int RM = BR / TY, CN = BC / TX, DN = DP / TX;
    static_assert(RM * TY == BR && CN * TX == BC && DN * TX == DP, "tile/thread mismatch");
    __shared__ float sQ[BR][DP + 1];
    __shared__ float sKV[BC][DP + 1];
    __shared__ float sP[BR][BC + 1];

    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heaviest (last) query tiles first
    const size_t bh = blockIdx.x;
    advance(bh * t * d_real, q, k, v, o);
    advance(bh * t, lse);

    load_tile<T, BR, DP>(sQ, q, q0, t, d_real, scale_log2);

    float m[RM], l[RM], acc[RM][DN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) acc[i][dn] = 0.f;
    }

    // Keys [0, min(q0+BR, T)); tile 0 always holds key 0, so every row's max is finite after it.
    const int n_tiles = (min(q0 + BR, t) + BC - 1) / BC;
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int k0 = kt * BC;
        load_tile<T, BC, DP>(sKV, k, k0, t, d_real, 1.f);
        __syncthreads();  // K (and, first time, Q) staged

        float s[RM][CN];
        zero(s);
#pragma unroll 4
        for (int d = 0; d < d_real; ++d) {
            float a[RM], b[CN];
#pragma unroll
            for (int i = 0; i < RM; ++i) a[i] = sQ[ty * RM + i][d];
#pragma unroll
            for (int j = 0; j < CN; ++j) b[j] = sKV[tx + TX * j][d];
#pragma unroll
            for (int i = 0; i < RM; ++i)
#pragma unroll
                for (int j = 0; j < CN; ++j) s[i][j] = fmaf(a[i], b[j], s[i][j]);
        }

#pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int r = q0 + ty * RM + i;
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                const int c = k0 + tx + TX * j;
                if (c > r || c >= t) s[i][j] = -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            const float m_new = fmaxf(m[i], row_max(mx));
            const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // never -inf - -inf
            const float corr = exp2f(m[i] - m_ref);
            m[i] = m_new;
            l[i] *= corr;
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) acc[i][dn] *= corr;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                const float p = exp2f(s[i][j] - m_ref);  // exactly 0 where masked
                l[i] += p;
                if constexpr (DROP) {
                    const int c = k0 + tx + TX * j;
                    const float z = (p != 0.f && r < t) ? drop.mul(((uint64_t)bh * t + r) * t + c)
                                                        : 0.f;
                    sP[ty * RM + i][tx + TX * j] = p * z;
                } else {
                    sP[ty * RM + i][tx + TX * j] = p;
                }
            }
        }
        __syncthreads();  // everyone is done with K
        load_tile<T, BC, DP>(sKV, v, k0, t, d_real, 1.f);
        __syncthreads();  // V and P staged

#pragma unroll 4
        for (int c = 0; c < BC; ++c) {
            float p[RM];
#pragma unroll
            for (int i = 0; i < RM; ++i) p[i] = sP[ty * RM + i][c];
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                const float vv = sKV[c][tx + TX * dn];
#pragma unroll
                for (int i = 0; i < RM; ++i) acc[i][dn] = fmaf(p[i], vv, acc[i][dn]);
            }
        }
        __syncthreads();  // before the next tile overwrites sKV and sP
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const float l_row = row_sum(l[i]);  // ≥ 1: the row max contributes exp2(0)
        const int r = q0 + ty * RM + i;
        if (r < t) {
            const float inv = 1.f / l_row;
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                const int d = tx + TX * dn;
                if (d < d_real) o[(size_t)r * d_real + d] = from_f32<T>(acc[i][dn] * inv);
            }
            if (tx == 0) lse[r] = (m[i] + log2f(l_row)) * LN2;
        }
    }
}

// delta[row] = Σ_d do·o over rows = B·H·T; one warp per row, 4 rows per block.
template <typename T>
__device__ __forceinline__ void bwd_delta(const T* __restrict__ o, const T* __restrict__ dout,
                                          float* __restrict__ delta, size_t rows, int d_real) {
    const size_t row = (size_t)blockIdx.x * (NT / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // warp-uniform
    const int lane = threadIdx.x % 32;
    o += row * d_real;
    dout += row * d_real;
    float acc = 0.f;
    for (int d = lane; d < d_real; d += 32) acc = fmaf(to_f32(o[d]), to_f32(dout[d]), acc);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

// grid = (B·H, ceil(T/BC)), block = NT. dq is f32 [B,H,T,D], zeroed, accumulated atomically.
template <typename T, int DP, bool DROP>
__device__ __forceinline__ void bwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, float* __restrict__ dq,
                                    T* __restrict__ dk, T* __restrict__ dv, int t, int d_real,
                                    float scale, const Drop drop) {
    constexpr int BC = BwdCfg<DP>::BC, BR = BwdCfg<DP>::BR;
    constexpr int RM = BC / TY;  // key rows per thread (S tile, dK, dV)
    constexpr int CN = BR / TX;  // query columns per thread (S tile)
    constexpr int RQ = BR / TY;  // query rows per thread (dQ tile)
    constexpr int DN = DP / TX;  // head-dim columns per thread
    static_assert(RM * TY == BC && CN * TX == BR && RQ * TY == BR && DN * TX == DP,
                  "tile/thread mismatch");
    __shared__ float sK[BC][DP + 1];
    __shared__ float sV[BC][DP + 1];
    __shared__ float sQ[BR][DP + 1];
    __shared__ float sdO[BR][DP + 1];
    __shared__ float sPt[BC][BR + 1];   // p, transposed: [key][query]
    __shared__ float sdSt[BC][BR + 1];  // ds, transposed
    __shared__ float sL[BR];            // lse·log2 e
    __shared__ float sD[BR];            // Δ

    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const int k0 = blockIdx.y * BC;  // the first key tiles see the most query tiles: first
    const size_t bh = blockIdx.x;
    advance(bh * t * d_real, q, k, v, dout, dq, dk, dv);
    advance(bh * t, lse, delta);
    const float scale_log2 = scale * LOG2E;

    load_tile<T, BC, DP>(sK, k, k0, t, d_real, 1.f);
    load_tile<T, BC, DP>(sV, v, k0, t, d_real, 1.f);

    float dk_acc[RM][DN], dv_acc[RM][DN];
    zero(dk_acc);
    zero(dv_acc);

    // Query rows r ≥ k0 see this key tile; earlier rows of the first query tile are masked.
    for (int q0 = (k0 / BR) * BR; q0 < t; q0 += BR) {
        load_tile<T, BR, DP>(sQ, q, q0, t, d_real, 1.f);
        load_tile<T, BR, DP>(sdO, dout, q0, t, d_real, 1.f);
        for (int r = threadIdx.x; r < BR; r += NT) {
            const bool ok = q0 + r < t;
            sL[r] = ok ? lse[q0 + r] * LOG2E : 0.f;
            sD[r] = ok ? delta[q0 + r] : 0.f;
        }
        __syncthreads();  // Q, dO, lse, Δ (and, first time, K, V) staged

        // sᵀ = K·Qᵀ and dpᵀ = V·dOᵀ on the thread's RM×CN micro-tile.
        float s[RM][CN], dp[RM][CN];
        zero(s);
        zero(dp);
#pragma unroll 2
        for (int d = 0; d < d_real; ++d) {
            float kk[RM], vv[RM], qq[CN], oo[CN];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
                kk[i] = sK[ty * RM + i][d];
                vv[i] = sV[ty * RM + i][d];
            }
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                qq[j] = sQ[tx + TX * j][d];
                oo[j] = sdO[tx + TX * j][d];
            }
#pragma unroll
            for (int i = 0; i < RM; ++i)
#pragma unroll
                for (int j = 0; j < CN; ++j) {
                    s[i][j] = fmaf(kk[i], qq[j], s[i][j]);
                    dp[i][j] = fmaf(vv[i], oo[j], dp[i][j]);
                }
        }
#pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int c = k0 + ty * RM + i;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                const int rl = tx + TX * j, r = q0 + rl;
                // c ≤ r < T also excludes padded keys (c ≥ T) and padded queries.
                const float p = (c <= r && r < t) ? exp2f(s[i][j] * scale_log2 - sL[rl]) : 0.f;
                if constexpr (DROP) {
                    const float z = p != 0.f ? drop.mul(((uint64_t)bh * t + r) * t + c) : 0.f;
                    sPt[ty * RM + i][rl] = p * z;
                    sdSt[ty * RM + i][rl] = p * (dp[i][j] * z - sD[rl]);
                } else {
                    sPt[ty * RM + i][rl] = p;
                    sdSt[ty * RM + i][rl] = p * (dp[i][j] - sD[rl]);
                }
            }
        }
        __syncthreads();  // P and dS staged

        // dV += Pᵀ·dO and dK += dSᵀ·Q for the thread's RM key rows.
#pragma unroll 2
        for (int rl = 0; rl < BR; ++rl) {
            float pt[RM], dst[RM];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
                pt[i] = sPt[ty * RM + i][rl];
                dst[i] = sdSt[ty * RM + i][rl];
            }
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                const float oo = sdO[rl][tx + TX * dn], qq = sQ[rl][tx + TX * dn];
#pragma unroll
                for (int i = 0; i < RM; ++i) {
                    dv_acc[i][dn] = fmaf(pt[i], oo, dv_acc[i][dn]);
                    dk_acc[i][dn] = fmaf(dst[i], qq, dk_acc[i][dn]);
                }
            }
        }

        // dQ += scale·dS·K for the thread's RQ query rows, added to global memory.
        float dq_acc[RQ][DN];
        zero(dq_acc);
#pragma unroll 2
        for (int c = 0; c < BC; ++c) {
            float ds[RQ];
#pragma unroll
            for (int i = 0; i < RQ; ++i) ds[i] = sdSt[c][ty * RQ + i];
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                const float kk = sK[c][tx + TX * dn];
#pragma unroll
                for (int i = 0; i < RQ; ++i) dq_acc[i][dn] = fmaf(ds[i], kk, dq_acc[i][dn]);
            }
        }
#pragma unroll
        for (int i = 0; i < RQ; ++i) {
            const int r = q0 + ty * RQ + i;
            if (r >= k0 && r < t) {  // rows before k0 got exact zeros
#pragma unroll
                for (int dn = 0; dn < DN; ++dn) {
                    const int d = tx + TX * dn;
                    if (d < d_real) atomicAdd(&dq[(size_t)r * d_real + d], dq_acc[i][dn] * scale);
                }
            }
        }
        __syncthreads();  // before the next query tile overwrites the shared tiles
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int c = k0 + ty * RM + i;
        if (c < t) {
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                const int d = tx + TX * dn;
                if (d < d_real) {
                    dk[(size_t)c * d_real + d] = from_f32<T>(dk_acc[i][dn] * scale);
                    dv[(size_t)c * d_real + d] = from_f32<T>(dv_acc[i][dn]);
                }
            }
        }
    }
}

}  // namespace attn

// The `_drop` kernels take the draw as five more arguments: key words, first Philox block,
// threshold and scale (src/dropout.rs's MaskSpec).
#define DROP_ARGS uint32_t k0, uint32_t k1, uint64_t first_block, uint64_t threshold, float keep
#define DROP_OF Drop{k0, k1, first_block, threshold, keep}
#define ATTN_FWD(T, S, DP)                                                                     \
    extern "C" __global__ void __launch_bounds__(attn::NT) attention_fwd_d##DP##_##S(         \
        const T* q, const T* k, const T* v, T* o, float* lse, int t, int d, float scale_log2) { \
        attn::fwd<T, DP, false>(q, k, v, o, lse, t, d, scale_log2, Drop{});                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(attn::NT) attention_fwd_drop_d##DP##_##S(    \
        const T* q, const T* k, const T* v, T* o, float* lse, int t, int d, float scale_log2, \
        DROP_ARGS) {                                                                           \
        attn::fwd<T, DP, true>(q, k, v, o, lse, t, d, scale_log2, DROP_OF);                   \
    }
#define ATTN_BWD(T, S, DP)                                                                     \
    extern "C" __global__ void __launch_bounds__(attn::NT) attention_bwd_d##DP##_##S(         \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                  \
        const float* delta, float* dq, T* dk, T* dv, int t, int d, float scale) {             \
        attn::bwd<T, DP, false>(q, k, v, dout, lse, delta, dq, dk, dv, t, d, scale, Drop{});  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(attn::NT) attention_bwd_drop_d##DP##_##S(    \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                  \
        const float* delta, float* dq, T* dk, T* dv, int t, int d, float scale, DROP_ARGS) {  \
        attn::bwd<T, DP, true>(q, k, v, dout, lse, delta, dq, dk, dv, t, d, scale, DROP_OF);  \
    }
// attention_dq_cast is cast_from_f32 (common.cuh) without __restrict__: with it nvcc loads
// through the non-coherent cache (ld.global.nc), other PTX than the kernels validated so far.
#define ATTN_ALL(T, S)                                                                         \
    ATTN_FWD(T, S, 32) ATTN_FWD(T, S, 64) ATTN_FWD(T, S, 128)                                  \
    ATTN_BWD(T, S, 32) ATTN_BWD(T, S, 64) ATTN_BWD(T, S, 128)                                  \
    extern "C" __global__ void __launch_bounds__(attn::NT) attention_bwd_delta_##S(            \
        const T* o, const T* dout, float* delta, size_t rows, int d) {                        \
        attn::bwd_delta<T>(o, dout, delta, rows, d);                                          \
    }                                                                                          \
    extern "C" __global__ void attention_dq_cast_##S(const float* src, T* dst, size_t n) {    \
        for (size_t i = grid_tid(); i < n; i += grid_stride()) dst[i] = from_f32<T>(src[i]);  \
    }
KILN_FOR_FLOATS(ATTN_ALL)
