// Fused multi-tensor AdamW (the "multi_tensor_apply" pattern of apex/llm.c): one launch updates
// every tensor of a (gradient dtype, copy dtype) group in place, instead of one launch (or
// several composed ops) per parameter tensor.
//
// The host uploads one table per group, struct-of-arrays of u64, n tensors:
//   [0n) param f32*  [1n) grad G*  [2n) m f32*  [3n) v f32*  [4n) copy C* (0 if none)
//   [5n) element count  [6n) weight decay (f32 bits)  [7n, 8n] chunk prefix sum (n + 1 entries)
// Tensor i owns blocks chunk[i] .. chunk[i+1] - 1, each covering `chunk` elements. A block finds
// its tensor by binary search over the prefix sum (n is ~100s: a few cached loads), so tiny
// bias vectors and 40M-element embeddings share one grid with no per-tensor launch.
//
// Each thread loads UNROLL elements of every stream before computing, for memory-level
// parallelism (the pointers may alias as far as the compiler knows, so it would not hoist the
// loads itself). The arithmetic uses explicit round-to-nearest intrinsics, in the order of
// `update` in src/adamw.rs, so nvcc cannot contract it into FMAs: the result is bit-identical
// to the CPU's f32 update.
#include "common.cuh"

#define ADAMW_UNROLL 4

struct NoCopy {};
template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

template <typename G, typename C>
__device__ void adamw(const uint64_t* __restrict__ table, uint32_t n, uint32_t chunk, float lr,
                      float beta1, float beta2, float eps, float bc1, float bc2,
                      float grad_scale) {
    const uint64_t* starts = table + 7 * (size_t)n;
    const uint64_t b = blockIdx.x;
    // Invariant starts[lo] <= b < starts[hi]; empty tensors (starts[i] == starts[i+1]) are
    // skipped because lo only moves to an index whose start is <= b.
    uint32_t lo = 0, hi = n;
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) >> 1;
        if (starts[mid] <= b) lo = mid; else hi = mid;
    }
    float* p = reinterpret_cast<float*>(table[lo]);
    const G* g = reinterpret_cast<const G*>(table[n + lo]);
    float* m = reinterpret_cast<float*>(table[2 * (size_t)n + lo]);
    float* v = reinterpret_cast<float*>(table[3 * (size_t)n + lo]);
    C* c = reinterpret_cast<C*>(table[4 * (size_t)n + lo]);
    const uint64_t numel = table[5 * (size_t)n + lo];
    const float wd = __uint_as_float((uint32_t)table[6 * (size_t)n + lo]);

    // Rebase the pointers on this block's chunk so the loop indexes with 32 bits.
    const uint64_t start = (b - starts[lo]) * (uint64_t)chunk;
    const uint32_t len = (uint32_t)min((uint64_t)chunk, numel - start);
    p += start;
    g += start;
    m += start;
    v += start;
    if constexpr (!same_type<C, NoCopy>::value) c += start;  // c is null without a copy
    const float decay = __fsub_rn(1.f, __fmul_rn(lr, wd));
    const float step = __fdiv_rn(lr, bc1);
    const float omb1 = __fsub_rn(1.f, beta1), omb2 = __fsub_rn(1.f, beta2);

    for (uint32_t base = threadIdx.x; base < len; base += blockDim.x * ADAMW_UNROLL) {
        float pv[ADAMW_UNROLL], gv[ADAMW_UNROLL], mv[ADAMW_UNROLL], vv[ADAMW_UNROLL];
#pragma unroll
        for (int k = 0; k < ADAMW_UNROLL; k++) {
            uint32_t i = base + k * blockDim.x;
            if (i < len) {
                pv[k] = p[i];
                gv[k] = to_f32(g[i]);
                mv[k] = m[i];
                vv[k] = v[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ADAMW_UNROLL; k++) {
            uint32_t i = base + k * blockDim.x;
            if (i < len) {
                float gi = __fmul_rn(gv[k], grad_scale);
                float mi = __fadd_rn(__fmul_rn(beta1, mv[k]), __fmul_rn(omb1, gi));
                float vi = __fadd_rn(__fmul_rn(beta2, vv[k]), __fmul_rn(__fmul_rn(omb2, gi), gi));
                float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, bc2)), eps);
                float pi = __fsub_rn(__fmul_rn(pv[k], decay), __fdiv_rn(__fmul_rn(step, mi), denom));
                p[i] = pi;
                m[i] = mi;
                v[i] = vi;
                if constexpr (!same_type<C, NoCopy>::value) c[i] = from_f32<C>(pi);
            }
        }
    }
}

#define ADAMW_KERNEL(G, gname, C, cname)                                                      \
    extern "C" __global__ void __launch_bounds__(256) adamw_##gname##_##cname(               \
        const uint64_t* table, uint32_t n, uint32_t chunk, float lr, float beta1, float beta2, \
        float eps, float bc1, float bc2, float grad_scale) {                                  \
        adamw<G, C>(table, n, chunk, lr, beta1, beta2, eps, bc1, bc2, grad_scale);            \
    }
#define ADAMW_FOR_COPY(G, gname)                                                              \
    ADAMW_KERNEL(G, gname, NoCopy, none)                                                      \
    ADAMW_KERNEL(G, gname, float, f32)                                                        \
    ADAMW_KERNEL(G, gname, __nv_bfloat16, bf16)                                               \
    ADAMW_KERNEL(G, gname, __half, f16)
KILN_FOR_FLOATS(ADAMW_FOR_COPY)
