// Fused causal self-attention on tensor cores (bf16 / f16 inputs, f32 accumulation),
// FlashAttention-2 style. Same contract as attention.cu, whose f32 FMA kernels stay the
// reference (f32 inputs, other head dims, KILN_ATTENTION_KERNEL=fma): q, k, v, o [B,H,T,D]
// contiguous, lse [B,H,T] f32 (natural log), dq accumulated in a zeroed f32 buffer. Head dims
// 64 and 128 only (compile-time DH), rows 16-byte aligned (checked by the launcher).
//
// STATUS: run on an H200 on 2026-12-04 (benches/RESULTS.md): o, dq, dk, dv match the CPU op and
// the FMA kernel at the test shapes (bf16 [2,12,1024,64]: 2.2e-3 / 2.7e-3 relative), memcheck
// clean; forward 203 TFLOP/s at [16,12,1024,64], the backward still slow (≈ 2.5 ms there).
// ptxas sm_90a (CUDA 13.0), no spills: forward 127 registers at DH 64, 172 at DH 128; backward
// 213 and 255.
//
// Every MMA is mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: A 16×16 (4 regs of 2
// halves), B 16×8 (2 regs), C/D 16×8 f32 (4 regs). With g = lane/4 and c = lane%4, a thread
// holds C rows g and g+8, columns 2c and 2c+1, which is also how it holds A (k columns 2c,2c+1
// in regs 0/1 and 2c+8,2c+9 in regs 2/3): two neighbouring 16×8 accumulators, rounded to
// halves, are the A operand of the next MMA without any data movement. Operands come from
// shared memory with ldmatrix.x4 (four 8×8 matrices; lanes 8i..8i+7 give the row addresses
// of matrix i); .trans where the reduction runs along the rows of the stored tile (V, dO, Q
// and K as the B of the second products, dSᵀ as the A of dQ). Shared tiles are 64 rows of
// DH + 8 halves: the 16-byte pad puts the 8 rows of an ldmatrix in 8 different bank groups.
//
// Forward (attention_tc_fwd_d{64,128}_<dtype>): grid (B·H, ceil(T/64)), 128 threads, one
//   block per 64 query rows (heaviest tiles launched first), warp w owns rows 16w..16w+15.
//   The block walks the 64-key tiles up to the diagonal; K and V are double-buffered in shared
//   memory with cp.async (tile j+1 loads while tile j is used; rows ≥ T zero-filled). S = Q·Kᵀ
//   stays in registers (16 rows × 64 keys per warp), the online softmax (exp2, scale·log2 e
//   applied to the f32 scores, running max/sum per row, quad shuffles) runs on the accumulator
//   fragments, P is rounded to bf16/f16 in registers and O += P·V accumulates in f32
//   registers. Only the diagonal tile is masked (tiles are 64×64 and aligned).
// Backward (attention_tc_bwd_d{64,128}_<dtype>): grid (B·H, ceil(T/64)), 128 threads, one
//   block per 64 key rows, warp w owns keys 16w..16w+15; K and V stay in shared memory, the
//   query tiles from the diagonal on are double-buffered (Q, dO by cp.async; lse·log2 e and Δ
//   staged beside them). Per query tile (in passes of 64 query columns at DH 64, 32 at DH
//   128, to bound registers) each warp computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ in registers,
//   Pᵀ = exp2(Sᵀ·scale·log2 e − lse) (0 where masked) and dSᵀ = Pᵀ∘(dPᵀ − Δ), then
//   dV += Pᵀ·dO and dK += dSᵀ·Q (A operands straight from those registers, f32 accumulators
//   for the whole loop). dSᵀ also goes to shared memory (as halves) so that
//   each warp computes 16 query rows of dQ = dS·K and adds scale·dQ into the f32 dq buffer
//   with atomicAdd, exactly as the FMA backward does. Δ = rowsum(dO∘O) and the dq cast are
//   attention.cu's kernels (attention_bwd_delta, attention_dq_cast), launched by the same
//   Rust code.
// Everything in those loops is on tensor cores except the softmax arithmetic (exp2, max,
// sums) and the dq atomics. Rounding: P and dS are rounded to the input dtype before their
// MMAs (as FlashAttention-2 does); all sums are f32.
//
// Dropout (the `_drop` kernels, DROP = true; see attention.cu): the forward multiplies P's
// fragments by z after the row sums, before P·V, one Philox block per key pair (Drop::mul2);
// the backward uses Pᵀ∘Z for dV and dSᵀ = Pᵀ∘(Z∘dPᵀ − Δ).
//
// Dynamic shared memory (the launcher passes these sizes; each kernel traps if given less):
//   forward  (1 Q + 2 K + 2 V tiles) · 64·(DH+8)·2 B = 46,080 B (DH 64), 87,040 B (DH 128)
//   backward (K, V, 2 Q, 2 dO tiles) · 64·(DH+8)·2 B + dSᵀ 64·72·2 B + 2·2·64·4 B (lse, Δ)
//            = 65,536 B (DH 64), 114,688 B (DH 128)
#include "common.cuh"
#include "philox.cuh"

namespace attn_tc {

constexpr int NT = 128;  // threads per block: 4 warps
constexpr int BM = 64;   // query rows per tile
constexpr int BN = 64;   // key rows per tile
constexpr int PAD = 8;   // halves of padding per shared row (16 bytes)

template <int DH> struct Smem {
    static constexpr int STR = DH + PAD;             // row stride of a [64][DH] tile, halves
    static constexpr int TILE = 64 * STR;            // halves per tile
    static constexpr int SSTR = BN + PAD;            // row stride of the dSᵀ tile, halves
    static constexpr int FWD_BYTES = 5 * TILE * 2;   // Q, 2 K, 2 V
    static constexpr int BWD_BYTES = (6 * TILE + 64 * SSTR) * 2 + 4 * 64 * 4;
};

// Query columns per pass of the backward's score computation (see bwd): the whole 64-row tile
// at DH 64; two passes of 32 at DH 128, where 64 columns of Sᵀ and dPᵀ beside the 128 dK/dV
// accumulator registers made ptxas spill.
template <int DH> struct BwdPass { static constexpr int QW = DH == 64 ? 64 : 32; };

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronously; zero-filled when !pred (src is then not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// Per input dtype: packing two f32 into one register of halves (lo = lower column) and the MMA.
template <typename T> struct Tc;
template <> struct Tc<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Tc<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Traps when the launch gave less dynamic shared memory than the kernel lays out.
__device__ __forceinline__ void check_smem(uint32_t need) {
    uint32_t have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

// Issues the cp.async copies of rows [row0, row0+64) of a [t, DH] matrix into a shared tile
// (row stride DH + PAD); rows ≥ t are zero-filled. Consecutive threads copy consecutive 16
// bytes of a row.
template <int DH, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int row0, int t) {
    constexpr int CPR = DH / 8;  // 16-byte chunks per row
    constexpr int STR = DH + PAD;
    static_assert((64 * CPR) % NT == 0, "chunks per thread");
#pragma unroll
    for (int i = 0; i < 64 * CPR / NT; ++i) {
        const int c = threadIdx.x + i * NT;
        const int r = c / CPR, col = (c % CPR) * 8;
        const int gr = row0 + r;
        const bool ok = gr < t;
        cp_async16(smem_u32(dst + r * STR + col), ok ? src + (size_t)gr * DH + col : src, ok);
    }
}

// ldmatrix.x4 row-address patterns (lane l supplies the address of row l%8 of matrix l/8),
// as (row, column) offsets inside a 16×16 block of the stored tile:
//   A, stored [m][k] (Q, K, V in the first products):       row l%16,               col (l/16)·8
//     → regs a0..a3 = (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
//   B, stored [n][k] (K, Q, dO as the B of Q·Kᵀ, K·Qᵀ, V·dOᵀ): row l%8 + (l/16)·8, col ((l/8)%2)·8
//     → b0,b1 of n-tile n0 (regs 0, 1) and of n-tile n0+8 (regs 2, 3).
//   B, stored [k][n] with .trans (V, dO, Q, K in P·V, Pᵀ·dO, dSᵀ·Q, dS·K):
//                                                           row l%16,               col (l/16)·8
//     → b0,b1 of n-tile n0 (regs 0, 1) and of n-tile n0+8 (regs 2, 3).
//   A, stored [k][m] with .trans (dSᵀ as the A of dS·K):    row l%8 + (l/16)·8, col ((l/8)%2)·8
//     → a0..a3 as for A above.
struct Lanes {
    int lane, warp, g, c;         // g = lane/4: fragment row; c = lane%4: fragment column pair
    int r16, c16;                 // l%16, (l/16)·8
    int r8, c8;                   // l%8 + (l/16)·8, ((l/8)%2)·8
    __device__ __forceinline__ Lanes() {
        lane = threadIdx.x % 32;
        warp = threadIdx.x / 32;
        g = lane / 4;
        c = lane % 4;
        r16 = lane % 16;
        c16 = (lane / 16) * 8;
        r8 = lane % 8 + (lane / 16) * 8;
        c8 = ((lane / 8) % 2) * 8;
    }
};

// ---- Forward ----

// grid = (B·H, ceil(T/64)), block = NT, dynamic shared memory Smem<DH>::FWD_BYTES.
template <typename T, int DH, bool DROP>
__device__ __forceinline__ void fwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ o,
                                    float* __restrict__ lse, int t, float scale_log2,
                                    const Drop drop) {
    using S = Smem<DH>;
    constexpr int STR = S::STR;
    constexpr int DT = DH / 8;  // 8-wide output column tiles per warp
    check_smem(S::FWD_BYTES);
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = sQ + S::TILE;      // 2 stages
    T* sV = sK + 2 * S::TILE;  // 2 stages

    const Lanes ln;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;  // heaviest (last) query tiles first
    const size_t bh = blockIdx.x;
    // Spelled out, not common.cuh's advance() as in attention.cu: with it nvcc emits other
    // instructions and register use here than the PTX measured above (STATUS); also in bwd.
    q += bh * t * DH;
    k += bh * t * DH;
    v += bh * t * DH;
    o += bh * t * DH;
    lse += bh * t;

    // Key tiles 0..=q0/64: tile q0/64 is the diagonal (BM == BN), the only one masked.
    const int n_tiles = q0 / BN + 1;

    load_tile<DH>(sQ, q, q0, t);
    load_tile<DH>(sK, k, 0, t);
    load_tile<DH>(sV, v, 0, t);
    cp_async_commit();

    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    // Rows g and g+8 of the warp's 16: running max (log2 units) and this thread's partial sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    const uint32_t q_base = smem_u32(sQ + (ln.warp * 16 + ln.r16) * STR + ln.c16);

    for (int j = 0; j < n_tiles; ++j) {
        // Tile j is the only group in flight; once every thread has waited and passed the
        // barrier, stage (j+1)%2 (last read in iteration j-1) is free for tile j+1.
        cp_async_wait_all();
        __syncthreads();
        if (j + 1 < n_tiles) {
            const int nx = (j + 1) & 1;
            load_tile<DH>(sK + nx * S::TILE, k, (j + 1) * BN, t);
            load_tile<DH>(sV + nx * S::TILE, v, (j + 1) * BN, t);
            cp_async_commit();
        }
        const T* Kt = sK + (j & 1) * S::TILE;
        const T* Vt = sV + (j & 1) * S::TILE;

        // S = Q·Kᵀ: 16 rows × 64 keys per warp, 8 accumulators of 16×8.
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
        const uint32_t k_base = smem_u32(Kt + ln.r8 * STR + ln.c8);
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(a, q_base + kk * 16 * 2);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t b[4];
                ldsm_x4(b, k_base + (np * 16 * STR + kk * 16) * 2);
                Tc<T>::mma(s[2 * np], a, b[0], b[1]);
                Tc<T>::mma(s[2 * np + 1], a, b[2], b[3]);
            }
        }

        // Online softmax on the fragments: s[n][e] is row g + 8·(e/2), key 8n + 2c + e%2.
        const bool diag = j == n_tiles - 1;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[n][e] * scale_log2;
                if (diag) {  // keys and rows share the tile origin: key > row is masked
                    const int key = n * 8 + 2 * ln.c + (e & 1);
                    const int row = ln.warp * 16 + ln.g + (e >> 1) * 8;
                    if (key > row) x = -INFINITY;
                }
                s[n][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float m_ref[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // The 4 lanes of a quad hold the same row.
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
            const float m_new = fmaxf(m[i], mx[i]);
            // Every row sees key 0 in tile 0, so m_new is finite; the guard keeps -inf - -inf
            // out regardless.
            m_ref[i] = m_new == -INFINITY ? 0.f : m_new;
            const float corr = exp2f(m[i] - m_ref[i]);
            m[i] = m_new;
            l[i] *= corr;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                acc[d][2 * i] *= corr;
                acc[d][2 * i + 1] *= corr;
            }
        }
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[n][e] - m_ref[e >> 1]);  // exactly 0 where masked
                s[n][e] = p;
                l[e >> 1] += p;
            }
        if constexpr (DROP) {
            // Rows g and g+8 of the warp; s[n][2i], s[n][2i+1] are keys 8n + 2c and the next.
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = q0 + ln.warp * 16 + ln.g + 8 * i;
                if (r < t) {
                    const uint64_t e0 = ((uint64_t)bh * t + r) * t + j * BN + 2 * ln.c;
#pragma unroll
                    for (int n = 0; n < 8; ++n) {
                        const float2 z = drop.mul2(e0 + 8 * n);
                        s[n][2 * i] *= z.x;
                        s[n][2 * i + 1] *= z.y;
                    }
                }
            }
        }

        // O += P·V: P's accumulators 2kk and 2kk+1 are the A operand for keys 16kk..16kk+15.
        const uint32_t v_base = smem_u32(Vt + ln.r16 * STR + ln.c16);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint32_t a[4] = {
                Tc<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Tc<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Tc<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Tc<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                uint32_t b[4];
                ldsm_x4_t(b, v_base + (kk * 16 * STR + dp * 16) * 2);
                Tc<T>::mma(acc[2 * dp], a, b[0], b[1]);
                Tc<T>::mma(acc[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);  // ≥ 1: the row max contributes exp2(0)
        const int r = q0 + ln.warp * 16 + ln.g + 8 * i;
        if (r < t) {
            const float inv = 1.f / l[i];
            T* orow = o + (size_t)r * DH + 2 * ln.c;
#pragma unroll
            for (int d = 0; d < DT; ++d)
                *reinterpret_cast<uint32_t*>(orow + d * 8) =
                    Tc<T>::pack(acc[d][2 * i] * inv, acc[d][2 * i + 1] * inv);
            if (ln.c == 0) lse[r] = (m[i] + log2f(l[i])) * LN2;
        }
    }
}

// ---- Backward ----

// grid = (B·H, ceil(T/64)), block = NT, dynamic shared memory Smem<DH>::BWD_BYTES.
// dq is f32 [B,H,T,D], zeroed, accumulated atomically; lse and delta are [B,H,T] f32.
template <typename T, int DH, bool DROP>
__device__ __forceinline__ void bwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, float* __restrict__ dq,
                                    T* __restrict__ dk, T* __restrict__ dv, int t, float scale,
                                    const Drop drop) {
    using S = Smem<DH>;
    constexpr int STR = S::STR, SSTR = S::SSTR;
    constexpr int DT = DH / 8;
    constexpr int QW = BwdPass<DH>::QW;
    check_smem(S::BWD_BYTES);
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = sK + S::TILE;
    T* sQ = sV + S::TILE;       // 2 stages
    T* sdO = sQ + 2 * S::TILE;  // 2 stages
    T* sdS = sdO + 2 * S::TILE; // dSᵀ: [64 keys][SSTR]
    float* sL = reinterpret_cast<float*>(sdS + 64 * SSTR);  // [2][64]: lse·log2 e
    float* sD = sL + 2 * 64;                                 // [2][64]: Δ

    const Lanes ln;
    const int k0 = blockIdx.y * BN;  // the first key tiles see the most query tiles: first
    const size_t bh = blockIdx.x;
    const size_t off = bh * t * DH;  // no advance(): see fwd
    q += off;
    k += off;
    v += off;
    dout += off;
    dq += off;
    dk += off;
    dv += off;
    lse += bh * t;
    delta += bh * t;
    const float scale_log2 = scale * LOG2E;

    // Query tiles k0, k0+64, ... (< t): the first is the diagonal, earlier ones see no key here.
    const int n_tiles = (t - k0 + BM - 1) / BM;

    // Stages lse·log2 e and Δ of query rows [q0, q0+64) (0 past t) into stage st; plain
    // stores, read after the next barrier.
    auto stage_stats = [&](int q0, int st) {
        const int i = threadIdx.x % 64, r = q0 + i;
        if (threadIdx.x < 64)
            sL[st * 64 + i] = r < t ? lse[r] * LOG2E : 0.f;
        else
            sD[st * 64 + i] = r < t ? delta[r] : 0.f;
    };

    load_tile<DH>(sK, k, k0, t);
    load_tile<DH>(sV, v, k0, t);
    load_tile<DH>(sQ, q, k0, t);
    load_tile<DH>(sdO, dout, k0, t);
    cp_async_commit();
    stage_stats(k0, 0);

    float dk_acc[DT][4], dv_acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

    // The warp's 16 key rows as A operands (K·Qᵀ, V·dOᵀ).
    const uint32_t k_a = smem_u32(sK + (ln.warp * 16 + ln.r16) * STR + ln.c16);
    const uint32_t v_a = smem_u32(sV + (ln.warp * 16 + ln.r16) * STR + ln.c16);

    for (int it = 0; it < n_tiles; ++it) {
        const int q0 = k0 + it * BM, st = it & 1;
        // As in the forward: the only group in flight is this tile's; after the barrier the
        // other stage (read in iteration it-1) takes the next tile.
        cp_async_wait_all();
        __syncthreads();
        if (it + 1 < n_tiles) {
            load_tile<DH>(sQ + (st ^ 1) * S::TILE, q, q0 + BM, t);
            load_tile<DH>(sdO + (st ^ 1) * S::TILE, dout, q0 + BM, t);
            cp_async_commit();
            stage_stats(q0 + BM, st ^ 1);
        }
        const T* Qt = sQ + st * S::TILE;
        const T* dOt = sdO + st * S::TILE;
        const float* L = sL + st * 64;
        const float* Dl = sD + st * 64;

        // Per pass of QW query columns: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (16 keys × QW queries per
        // warp), Pᵀ and dSᵀ, then dV += Pᵀ·dO and dK += dSᵀ·Q for those queries. Passes keep
        // the score registers small beside the dK, dV accumulators.
        const uint32_t q_b = smem_u32(Qt + ln.r8 * STR + ln.c8);
        const uint32_t o_b = smem_u32(dOt + ln.r8 * STR + ln.c8);
        const uint32_t o_t = smem_u32(dOt + ln.r16 * STR + ln.c16);
        const uint32_t q_t = smem_u32(Qt + ln.r16 * STR + ln.c16);
#pragma unroll
        for (int pass = 0; pass < BM / QW; ++pass) {
            const int qc = pass * QW;  // first query column of the pass
            float s[QW / 8][4], dp[QW / 8][4];
#pragma unroll
            for (int n = 0; n < QW / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                uint32_t ak[4], av[4];
                ldsm_x4(ak, k_a + kk * 16 * 2);
                ldsm_x4(av, v_a + kk * 16 * 2);
#pragma unroll
                for (int np = 0; np < QW / 16; ++np) {
                    uint32_t bq[4], bo[4];
                    ldsm_x4(bq, q_b + ((qc + np * 16) * STR + kk * 16) * 2);
                    ldsm_x4(bo, o_b + ((qc + np * 16) * STR + kk * 16) * 2);
                    Tc<T>::mma(s[2 * np], ak, bq[0], bq[1]);
                    Tc<T>::mma(s[2 * np + 1], ak, bq[2], bq[3]);
                    Tc<T>::mma(dp[2 * np], av, bo[0], bo[1]);
                    Tc<T>::mma(dp[2 * np + 1], av, bo[2], bo[3]);
                }
            }

            // s[n][e]: key row ln.warp·16 + g + 8·(e/2), query column qc + 8n + 2c + e%2.
            // Pᵀ = exp2(s·scale·log2 e − lse·log2 e) where key ≤ query < t, else 0;
            // dSᵀ = Pᵀ·(dPᵀ − Δ). Both rounded into A fragments for the query chunks of 16.
            uint32_t pa[QW / 16][4], da[QW / 16][4];
#pragma unroll
            for (int n = 0; n < QW / 8; ++n) {
                float p[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + ln.warp * 16 + ln.g + (e >> 1) * 8;
                    const int rl = qc + n * 8 + 2 * ln.c + (e & 1), r = q0 + rl;
                    p[e] = (key <= r && r < t) ? exp2f(s[n][e] * scale_log2 - L[rl]) : 0.f;
                    if constexpr (DROP) {
                        const uint64_t el = ((uint64_t)bh * t + r) * t + key;
                        const float z = p[e] != 0.f ? drop.mul(el) : 0.f;
                        ds[e] = p[e] * (dp[n][e] * z - Dl[rl]);
                        p[e] *= z;  // what multiplied V in the forward
                    } else {
                        ds[e] = p[e] * (dp[n][e] - Dl[rl]);
                    }
                }
                // Accumulator n is columns 8(n%2).. of chunk n/2: A regs (n%2)·2 + {0, 1}.
                pa[n / 2][(n % 2) * 2] = Tc<T>::pack(p[0], p[1]);
                pa[n / 2][(n % 2) * 2 + 1] = Tc<T>::pack(p[2], p[3]);
                da[n / 2][(n % 2) * 2] = Tc<T>::pack(ds[0], ds[1]);
                da[n / 2][(n % 2) * 2 + 1] = Tc<T>::pack(ds[2], ds[3]);
            }
            // dSᵀ to shared memory (rows g and g+8 of the warp's keys), for dQ = dS·K.
            {
                T* row = sdS + (ln.warp * 16 + ln.g) * SSTR + qc + 2 * ln.c;
#pragma unroll
                for (int n = 0; n < QW / 8; ++n) {
                    *reinterpret_cast<uint32_t*>(row + n * 8) = da[n / 2][(n % 2) * 2];
                    *reinterpret_cast<uint32_t*>(row + 8 * SSTR + n * 8) =
                        da[n / 2][(n % 2) * 2 + 1];
                }
            }

            // dV += Pᵀ·dO and dK += dSᵀ·Q over the pass's query chunks of 16.
#pragma unroll
            for (int kk = 0; kk < QW / 16; ++kk) {
#pragma unroll
                for (int dd = 0; dd < DH / 16; ++dd) {
                    uint32_t bo[4], bq[4];
                    ldsm_x4_t(bo, o_t + ((qc + kk * 16) * STR + dd * 16) * 2);
                    ldsm_x4_t(bq, q_t + ((qc + kk * 16) * STR + dd * 16) * 2);
                    Tc<T>::mma(dv_acc[2 * dd], pa[kk], bo[0], bo[1]);
                    Tc<T>::mma(dv_acc[2 * dd + 1], pa[kk], bo[2], bo[3]);
                    Tc<T>::mma(dk_acc[2 * dd], da[kk], bq[0], bq[1]);
                    Tc<T>::mma(dk_acc[2 * dd + 1], da[kk], bq[2], bq[3]);
                }
            }
        }
        __syncthreads();  // dSᵀ complete

        // dQ = dS·K for the warp's 16 query rows, 64 head-dim columns at a time (registers),
        // added to dq.
        const uint32_t ds_a = smem_u32(sdS + ln.r8 * SSTR + ln.warp * 16 + ln.c8);
        const uint32_t k_t = smem_u32(sK + ln.r16 * STR + ln.c16);
        constexpr int HALF = 64;
#pragma unroll
        for (int h = 0; h < DH / HALF; ++h) {
            float dqa[HALF / 8][4];
#pragma unroll
            for (int i = 0; i < HALF / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) dqa[i][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[4];
                ldsm_x4_t(a, ds_a + kk * 16 * SSTR * 2);
#pragma unroll
                for (int dd = 0; dd < HALF / 16; ++dd) {
                    uint32_t b[4];
                    ldsm_x4_t(b, k_t + (kk * 16 * STR + h * HALF + dd * 16) * 2);
                    Tc<T>::mma(dqa[2 * dd], a, b[0], b[1]);
                    Tc<T>::mma(dqa[2 * dd + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = q0 + ln.warp * 16 + ln.g + 8 * i;
                if (r < t) {
                    float* dst = dq + (size_t)r * DH + h * HALF + 2 * ln.c;
#pragma unroll
                    for (int d = 0; d < HALF / 8; ++d) {
                        atomicAdd(dst + d * 8, dqa[d][2 * i] * scale);
                        atomicAdd(dst + d * 8 + 1, dqa[d][2 * i + 1] * scale);
                    }
                }
            }
        }
        // The next iteration's barrier (after its wait) orders these reads of sdS, Q, dO
        // before any thread overwrites them.
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int c = k0 + ln.warp * 16 + ln.g + 8 * i;
        if (c < t) {
            T* krow = dk + (size_t)c * DH + 2 * ln.c;
            T* vrow = dv + (size_t)c * DH + 2 * ln.c;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                *reinterpret_cast<uint32_t*>(krow + d * 8) =
                    Tc<T>::pack(dk_acc[d][2 * i] * scale, dk_acc[d][2 * i + 1] * scale);
                *reinterpret_cast<uint32_t*>(vrow + d * 8) =
                    Tc<T>::pack(dv_acc[d][2 * i], dv_acc[d][2 * i + 1]);
            }
        }
    }
}

}  // namespace attn_tc

// The `_drop` kernels take the draw as five more arguments (attention.cu's DROP_ARGS).
#define DROP_ARGS uint32_t k0, uint32_t k1, uint64_t first_block, uint64_t threshold, float keep
#define DROP_OF Drop{k0, k1, first_block, threshold, keep}
#define ATTN_TC_FWD(T, S, DH)                                                                 \
    extern "C" __global__ void __launch_bounds__(attn_tc::NT) attention_tc_fwd_d##DH##_##S(  \
        const T* q, const T* k, const T* v, T* o, float* lse, int t, float scale_log2) {     \
        attn_tc::fwd<T, DH, false>(q, k, v, o, lse, t, scale_log2, Drop{});                  \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(attn_tc::NT)                                \
        attention_tc_fwd_drop_d##DH##_##S(const T* q, const T* k, const T* v, T* o,          \
                                          float* lse, int t, float scale_log2, DROP_ARGS) {  \
        attn_tc::fwd<T, DH, true>(q, k, v, o, lse, t, scale_log2, DROP_OF);                  \
    }
#define ATTN_TC_BWD(T, S, DH)                                                                 \
    extern "C" __global__ void __launch_bounds__(attn_tc::NT) attention_tc_bwd_d##DH##_##S(  \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
        const float* delta, float* dq, T* dk, T* dv, int t, float scale) {                   \
        attn_tc::bwd<T, DH, false>(q, k, v, dout, lse, delta, dq, dk, dv, t, scale, Drop{}); \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(attn_tc::NT) attention_tc_bwd_drop_d##DH##_##S( \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
        const float* delta, float* dq, T* dk, T* dv, int t, float scale, DROP_ARGS) {        \
        attn_tc::bwd<T, DH, true>(q, k, v, dout, lse, delta, dq, dk, dv, t, scale, DROP_OF); \
    }
#define ATTN_TC_ALL(T, S)                                                                     \
    ATTN_TC_FWD(T, S, 64) ATTN_TC_FWD(T, S, 128) ATTN_TC_BWD(T, S, 64) ATTN_TC_BWD(T, S, 128)
ATTN_TC_ALL(__nv_bfloat16, bf16)
ATTN_TC_ALL(__half, f16)
