// Philox4x32-10 and the dropout draw shared by cuda/dropout.cu (a mask tensor) and the
// attention kernels (multipliers computed where the probabilities are): element e of a call
// is dropped when word e % 4 of Philox4x32-10(counter (first_block + e / 4 as lo, hi, 0, 0),
// key) is below `threshold`, else multiplied by `scale`. The same function as
// `philox4x32_10` and `MaskSpec` in src/dropout.rs, so CPU and GPU draw the same masks.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint4 philox(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// One call's draw. A default (zero) Drop keeps everything; kernels instantiated without
// dropout never read it.
struct Drop {
    uint32_t k0, k1;
    uint64_t first_block, threshold;
    float scale;

    // The Philox output of block b of the call.
    __device__ __forceinline__ uint4 block(uint64_t b) const {
        const uint64_t ctr = first_block + b;
        return philox(make_uint4((uint32_t)ctr, (uint32_t)(ctr >> 32), 0u, 0u), k0, k1);
    }

    __device__ __forceinline__ float keep(uint32_t word) const {
        return (uint64_t)word < threshold ? 0.f : scale;
    }

    // The multiplier of element e: 0 or scale.
    __device__ __forceinline__ float mul(uint64_t e) const {
        const uint4 r = block(e / 4);
        const uint32_t w = e % 4;
        return keep(w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w);
    }

    // The multipliers of elements e and e + 1 (one Philox block unless e % 4 == 3).
    __device__ __forceinline__ float2 mul2(uint64_t e) const {
        const uint4 r = block(e / 4);
        switch (e % 4) {
            case 0: return make_float2(keep(r.x), keep(r.y));
            case 1: return make_float2(keep(r.y), keep(r.z));
            case 2: return make_float2(keep(r.z), keep(r.w));
            default: return make_float2(keep(r.w), keep(block(e / 4 + 1).x));
        }
    }
};
