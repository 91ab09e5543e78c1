// Dropout mask on the device: mask[e] = 0 if Philox4x32-10(key, block of e)[e % 4] < threshold,
// else `scale`, with block(e) = first_block + e / 4 as the counter (lo, hi, 0, 0). The same
// function as `philox4x32_10` and `MaskSpec::cpu` in src/dropout.rs, so CPU and GPU masks agree
// bit for bit. One thread per Philox block (four elements), grid-stride.
#include "common.cuh"
#include "philox.cuh"

template <typename T>
__device__ __forceinline__ void dropout_mask(T* __restrict__ mask, size_t n, uint32_t k0,
                                             uint32_t k1, uint64_t first_block,
                                             uint64_t threshold, float scale) {
    const T keep = from_f32<T>(scale), drop = from_f32<T>(0.f);
    const size_t blocks = (n + 3) / 4;
    for (size_t b = grid_tid(); b < blocks; b += grid_stride()) {
        const uint64_t ctr = first_block + b;
        const uint4 r = philox(make_uint4((uint32_t)ctr, (uint32_t)(ctr >> 32), 0u, 0u), k0, k1);
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
        const size_t e0 = 4 * b;
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (e0 + i < n) mask[e0 + i] = (uint64_t)words[i] < threshold ? drop : keep;
    }
}

#define DROPOUT_KERNELS(T, S)                                                                 \
    extern "C" __global__ void dropout_mask_##S(T* mask, size_t n, uint32_t k0, uint32_t k1,  \
                                                uint64_t first_block, uint64_t threshold,     \
                                                float scale) {                                \
        dropout_mask<T>(mask, n, k0, k1, first_block, threshold, scale);                      \
    }

KILN_FOR_FLOATS(DROPOUT_KERNELS)
