// Embedding backward: dW[id] += dy[n] for every row n with id = ids[n] < vocab.
//
// embedding_bwd: one row of dy per warp (C up to 1024, 8 rows per block) or per block (wider
// rows); the threads of a row stride along C, so both the dy loads and the f32 atomicAdds
// into dW's row are coalesced. Atomics collide only when rows share an id (repeated tokens),
// which is cheap next to a sort-by-id pass; the summation order, hence the last bits of a
// repeated token's gradient, is not deterministic. Ids ≥ vocab (IGNORE_INDEX = u32::MAX
// included) are skipped. For bf16/f16 the f32 scratch is cast by embedding_cast; for f32 it
// is the output.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embedding_bwd(const uint32_t* __restrict__ ids,
                                              const T* __restrict__ dy, float* __restrict__ dw32,
                                              int n_rows, int C, uint32_t vocab) {
    int64_t row = row_index();
    if (row >= n_rows) return;
    uint32_t id = ids[row];
    if (id >= vocab) return;
    const T* dyr = dy + row * C;
    float* dwr = dw32 + (int64_t)id * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(dwr + c, to_f32(dyr[c]));
}

#define EMBEDDING_KERNELS(T, S)                                                                   \
    extern "C" __global__ void embedding_bwd_##S(const uint32_t* ids, const T* dy, float* dw32,  \
                                                 int n_rows, int C, uint32_t vocab) {            \
        embedding_bwd<T>(ids, dy, dw32, n_rows, C, vocab);                                       \
    }                                                                                            \
    extern "C" __global__ void embedding_cast_##S(const float* src, T* dst, size_t n) {          \
        cast_from_f32<T>(src, dst, n);                                                           \
    }

KILN_FOR_FLOATS(EMBEDDING_KERNELS)
