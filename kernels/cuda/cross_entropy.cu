// Fused cross-entropy forward + backward (llm.c's "fused classifier" idea): the loss and the
// gradient of the mean loss w.r.t. the logits come out of one kernel, so the [N, V]
// probabilities are never stored and the logits are read twice (the second read mostly hits
// L2), written once.
//
//   ce_count      one block: count = #{rows whose target is valid} into a device u32, and the
//                 first row whose target is neither a class id nor IGNORE (with that target),
//                 which the host reads to raise the CPU's error.
//   ce_rows_<T>   one block per row. Pass 1: each thread keeps an online (max, sum of exp)
//                 over its strided elements, then the block merges them (block_max, rescale,
//                 block_sum) -> lse. Pass 2 (only when a gradient is wanted):
//                 dlogits = exp(x - lse) - onehot, unscaled. The per-row loss lse - x[target]
//                 goes to an f32 buffer.
//   ce_mean       one block: a fixed-order sum of the per-row losses / count (deterministic,
//                 no float atomics), and 1/count for the backward.
//   ce_scale_<T>  the backward: dlogits *= upstream · (1/count), in place, in f32
//                 (applying 1/count before rounding to f16 would underflow at GPT-2 sizes).
//
// Loads are 16-byte vectors after a short scalar head that brings the row pointer to 16-byte
// alignment (row starts are unaligned when V is odd or the input has an offset); pass 2 uses
// vectors only when the logits and dlogits rows share the same misalignment, scalars otherwise.
//
// A target >= V that is not IGNORE is treated as ignored by the row kernels (no out-of-bounds
// read); ce_count reports it and the launcher turns it into the CPU's error.
#include "common.cuh"

#define CE_IGNORE 0xffffffffu

__device__ __forceinline__ bool ce_valid(uint32_t t, int V) {
    return t != CE_IGNORE && t < (uint32_t)V;
}

// 16 bytes of T: 4 f32 or 8 bf16/f16.
template <typename T> struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Elements to process one by one before `p` is 16-byte aligned (p is at least T-aligned).
template <typename T> __device__ __forceinline__ int ce_head(const T* p, int V) {
    int mis = (int)(reinterpret_cast<uintptr_t>(p) & 15);
    int head = ((16 - mis) & 15) / (int)sizeof(T);
    return head < V ? head : V;
}

// Online softmax state: m = running max, s = sum of exp(x - m) over the elements seen, except
// one occurrence of the max (whose term is exactly 1). Keeping that 1 out of s lets the row
// compute ln z = log1p(rest) accurately when one logit dominates: 1 + rest would round a tiny
// loss away in f32 (the CPU kernel does the same). m == -inf means "nothing finite yet"; the
// guards keep -inf - -inf from producing NaN. A NaN logit makes s NaN whenever it comes (s is
// 0 or NaN while m == -inf, and is kept), so it poisons the row's loss as on the CPU.
__device__ __forceinline__ void ce_online(float& m, float& s, float x) {
    if (x > m) {
        s = (m == -INFINITY) ? s : (s + 1.f) * expf(m - x);
        m = x;
    } else if (m != -INFINITY || x != x) {
        s += expf(x - m);
    }
}

// bad[0] = the first row whose target is neither < V nor IGNORE (0xffffffff if none), bad[1] =
// its target.
extern "C" __global__ void ce_count(const uint32_t* __restrict__ targets, int N, int V,
                                    uint32_t* __restrict__ count, uint32_t* __restrict__ bad) {
    __shared__ uint32_t total, first_bad;
    if (threadIdx.x == 0) {
        total = 0;
        first_bad = 0xffffffffu;
    }
    __syncthreads();
    uint32_t c = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const uint32_t t = targets[i];
        if (ce_valid(t, V)) c++;
        else if (t != CE_IGNORE) atomicMin(&first_bad, (uint32_t)i);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(&total, c);  // integers: order does not matter
    __syncthreads();
    if (threadIdx.x == 0) {
        *count = total;
        bad[0] = first_bad;
        bad[1] = first_bad == 0xffffffffu ? 0u : targets[first_bad];
    }
}

template <typename T>
__device__ void ce_rows(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                        float* __restrict__ losses, T* __restrict__ dlogits, int V, int grad) {
    __shared__ float scratch[32];
    constexpr int VN = Vec16<T>::N;
    const int tid = threadIdx.x, nt = blockDim.x;
    const size_t row = blockIdx.x;
    const T* x = logits + row * (size_t)V;
    T* dx = dlogits + row * (size_t)V;
    const uint32_t target = targets[row];

    if (!ce_valid(target, V)) {
        if (grad)
            for (int i = tid; i < V; i += nt) dx[i] = from_f32<T>(0.f);
        if (tid == 0) losses[row] = 0.f;
        return;  // the whole block leaves together: no barrier is skipped by part of it
    }

    // Pass 1: online max and sum.
    const int head = ce_head(x, V);
    const int nvec = (V - head) / VN;
    const int tail = head + nvec * VN;
    const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(x + head);
    float m = -INFINITY, s = 0.f;
    for (int i = tid; i < head; i += nt) ce_online(m, s, to_f32(x[i]));
    for (int j = tid; j < nvec; j += nt) {
        Vec16<T> a = xv[j];
#pragma unroll
        for (int k = 0; k < VN; k++) ce_online(m, s, to_f32(a.v[k]));
    }
    for (int i = tail + tid; i < V; i += nt) ce_online(m, s, to_f32(x[i]));

    // Merge: rest = sum over the row of exp(x - M), less one max term. Each thread holding the
    // max left its own max term out, so the k such threads add k - 1 ones back (exact in f32).
    const float M = block_max(m, scratch);
    const bool owns_max = m == M && m != -INFINITY;
    const float part = owns_max ? s : (m == -INFINITY ? s : (s + 1.f) * expf(m - M));
    const float sum = block_sum(part, scratch);
    const float ties = block_sum(owns_max ? 1.f : 0.f, scratch);
    const float rest = sum + (ties - 1.f);
    const float ln_z = log1pf(rest);
    const float lse = M + ln_z;
    const float xt = to_f32(x[target]);
    if (tid == 0) losses[row] = ln_z - (xt - M);

    if (!grad) return;

    // Pass 2: dlogits = p - onehot. For the target, 1 - p_t = rest / (1 + rest) when it is the
    // max, without the cancellation of p_t - 1.
    const float dt = xt == M ? -(rest / (1.f + rest)) : expf(xt - lse) - 1.f;
    const int t = (int)target;
    if (ce_head(dx, V) == head) {
        Vec16<T>* dv = reinterpret_cast<Vec16<T>*>(dx + head);
        for (int i = tid; i < head; i += nt)
            dx[i] = from_f32<T>(i == t ? dt : expf(to_f32(x[i]) - lse));
        for (int j = tid; j < nvec; j += nt) {
            Vec16<T> a = xv[j], d;
            const int base = head + j * VN;
#pragma unroll
            for (int k = 0; k < VN; k++)
                d.v[k] = from_f32<T>(base + k == t ? dt : expf(to_f32(a.v[k]) - lse));
            dv[j] = d;
        }
        for (int i = tail + tid; i < V; i += nt)
            dx[i] = from_f32<T>(i == t ? dt : expf(to_f32(x[i]) - lse));
    } else {
        for (int i = tid; i < V; i += nt)
            dx[i] = from_f32<T>(i == t ? dt : expf(to_f32(x[i]) - lse));
    }
}

// dlogits[i] *= scale[0] (= upstream · 1/count, computed by the caller), in f32; grid-stride.
template <typename T>
__device__ void ce_scale(T* __restrict__ d, size_t n, const float* __restrict__ scale) {
    const float s = scale[0];
    for (size_t i = grid_tid(); i < n; i += grid_stride()) d[i] = from_f32<T>(to_f32(d[i]) * s);
}

#define CE_ROWS(T, suffix)                                                                    \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        ce_rows_##suffix(const T* logits, const uint32_t* targets, float* losses, T* dlogits, \
                         int V, int grad) {                                                   \
        ce_rows<T>(logits, targets, losses, dlogits, V, grad);                                \
    }                                                                                         \
    extern "C" __global__ void ce_scale_##suffix(T* d, size_t n, const float* scale) {        \
        ce_scale<T>(d, n, scale);                                                             \
    }
KILN_FOR_FLOATS(CE_ROWS)

// One block (blockDim.x a multiple of 32): each thread sums a fixed strided subset, then the
// shuffle tree of block_sum; same order every run.
extern "C" __global__ void ce_mean(const float* __restrict__ losses, int N,
                                   const uint32_t* __restrict__ count, float* __restrict__ loss,
                                   float* __restrict__ inv_count) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) acc += losses[i];
    float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const uint32_t c = *count;  // sum x (1/count), as the CPU kernel computes it
        const float inv = 1.f / (float)(c > 0 ? c : 1u);
        *loss = total * inv;
        *inv_count = inv;
    }
}
