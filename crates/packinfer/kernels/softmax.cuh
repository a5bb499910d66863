// The online softmax in base 2: masks, running maxima and sums, the output's rescale, and P
// packed as the A operand of the next MMA.
#pragma once
#include "ptx.cuh"
#include "mask.cuh"

#ifndef PI_RESCALE_SLACK
#define PI_RESCALE_SLACK 8.0f
#endif
// Whether any row of the warp needs its output rescaled (softmax_scores's alpha != 1).
__device__ __forceinline__ bool needs_rescale(float alpha0, float alpha1) {
    return __any_sync(0xffffffffu, alpha0 != 1.f || alpha1 != 1.f);
}

// What the scores of a thread's two rows r0, r1 go through besides the key ends: the rows' first
// visible keys (the sliding window; 0 without one), the run's soft-cap (mask.cuh; cap_in 0
// without one) and the plan's custom mask (null without one). The mask's per-row offsets are
// read only where a block is masked, from the row table (rows, r0, r1) and mask_bit0: values
// that live through the block's MMAs made the plain kernels spill.
struct ScoreMod {
    u32 lo0, lo1;
    float cap_in, cap_out;
    const unsigned char* mask;
    const u32* mask_bit0;
    const RowInfo* rows;
    int r0, r1;
};

// Applies a custom mask to a block's scores (before the key-end masks, which then also see the
// block as not all visible): keys the mask hides become -inf. Only keys a row sees otherwise,
// [lo, end), are looked up: past its end the bits are the next query's, or past the mask.
// Compiled into the masked variant of the plain kernel only (PI_CUSTOM_MASK).
template <int NT>
__device__ __forceinline__ void custom_mask(float (&s)[NT][4], int lane, u32 key_first, u32 end0, u32 end1, const ScoreMod& mod) {
    const int col = 2 * (lane % 4);
    const u32 mb0 = __ldg(mod.mask_bit0 + mod.rows[mod.r0].token), mb1 = __ldg(mod.mask_bit0 + mod.rows[mod.r1].token);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const u32 k = key_first + 8 * j + col + e;
            if (k >= mod.lo0 && k < end0 && !mask_allows(mod.mask, mb0 + k)) s[j][e] = PI_NEG_INF;
            if (k >= mod.lo1 && k < end1 && !mask_allows(mod.mask, mb1 + k)) s[j][2 + e] = PI_NEG_INF;
        }
}

// Soft-caps (with one) and masks (unless every key of the block is visible to both rows) the
// keys outside [max(key_lo, mod.lo0), end0) and [max(key_lo, mod.lo1), end1), scales and folds a
// block's scores into the online softmax state: S
// becomes P (unnormalised, base 2), the running maxima move and the running sums are rescaled; returns, in alpha0/alpha1, the factors by which the
// output accumulators must be rescaled before this block's P V is added (rescale_output).
// The layout is the m16n8 accumulator's, which mma.sync and wgmma share: s[j][0..1] are row
// r0's keys 8j + col + {0,1}, s[j][2..3] row r1's.
// Only blocks boxed back over keys an earlier block had (box_key) start below key_lo; the
// KEY_LO form, which counts keys from key_lo (those below wrap to large values and fail both
// tests), is for the kernels that have them: in the plain ones it made ptxas spill
// (docs/performance-log.md#key-lo).
template <int NT, bool KEY_LO = false>
__device__ __forceinline__ void softmax_scores(float (&s)[NT][4], int lane, u32 key_first, u32 key_lo, u32 end0,
                                               u32 end1, bool all_visible, float scale, const ScoreMod& mod,
                                               float& m0, float& m1, float& l0, float& l1, float& alpha0,
                                               float& alpha1) {
    const int col = 2 * (lane % 4);
    // Per row: KEY_LO counts keys from the row's first visible key (those below wrap to large
    // values and fail the one test); otherwise keys below it fail a second test.
    const u32 lo0 = KEY_LO ? max(key_lo, mod.lo0) : mod.lo0;
    const u32 lo1 = KEY_LO ? max(key_lo, mod.lo1) : mod.lo1;
    const u32 first0 = KEY_LO ? key_first - lo0 : key_first;
    const u32 first1 = KEY_LO ? key_first - lo1 : key_first;
    const u32 lim0 = !KEY_LO ? end0 : end0 > lo0 ? end0 - lo0 : 0;
    const u32 lim1 = !KEY_LO ? end1 : end1 > lo1 ? end1 - lo1 : 0;
    // The soft-cap is monotonic, so it comes first and the rest sees capped scores.
    if (mod.cap_in != 0.f) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = soft_cap(s[j][e], mod.cap_in, mod.cap_out);
    }
    const bool masked = PI_CUSTOM_MASK && mod.mask != nullptr;
    if (masked) custom_mask<NT>(s, lane, key_first, end0, end1, mod);
    // The maximum is taken over the raw scores (scale > 0 keeps the order); the scale is folded
    // into the exponent's FMA.
    float bm0 = PI_NEG_INF, bm1 = PI_NEG_INF;
    if (all_visible && !masked) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            bm0 = fmaxf(bm0, fmaxf(s[j][0], s[j][1]));
            bm1 = fmaxf(bm1, fmaxf(s[j][2], s[j][3]));
        }
    } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 key0 = first0 + 8 * j + col + e, key1 = first1 + 8 * j + col + e;
                if (key0 >= lim0 || (!KEY_LO && key0 < lo0)) s[j][e] = PI_NEG_INF;
                if (key1 >= lim1 || (!KEY_LO && key1 < lo1)) s[j][2 + e] = PI_NEG_INF;
                bm0 = fmaxf(bm0, s[j][e]);
                bm1 = fmaxf(bm1, s[j][2 + e]);
            }
        }
    }
    bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 1));
    bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 2));
    bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 1));
    bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 2));
    // The running max moves only when a block's max exceeds it by more than PI_RESCALE_SLACK
    // (base 2): P then stays below 2^slack, and most blocks of a row need no output rescale
    // (alpha is exactly 1; the callers skip it when every row of the warp says so). The result
    // is the same softmax: the sums and the LSE use the same max as P
    // (docs/performance-log.md#rescale-slack).
    const float n0 = bm0 * scale > m0 + PI_RESCALE_SLACK ? bm0 * scale : m0;
    const float n1 = bm1 * scale > m1 + PI_RESCALE_SLACK ? bm1 * scale : m1;
    // A row that has seen no key yet keeps max -inf; subtract 0 then, not -inf.
    const float base0 = n0 == PI_NEG_INF ? 0.f : n0;
    const float base1 = n1 == PI_NEG_INF ? 0.f : n1;
    alpha0 = exp2_approx(m0 - base0);
    alpha1 = exp2_approx(m1 - base1);
    m0 = n0;
    m1 = n1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        s[j][0] = exp2_approx(fmaf(s[j][0], scale, -base0));
        s[j][1] = exp2_approx(fmaf(s[j][1], scale, -base0));
        s[j][2] = exp2_approx(fmaf(s[j][2], scale, -base1));
        s[j][3] = exp2_approx(fmaf(s[j][3], scale, -base1));
        l0 += s[j][0] + s[j][1];
        l1 += s[j][2] + s[j][3];
    }
}

__device__ __forceinline__ void rescale_output(float (&acc)[PI_HEAD_DIM / 8][4], float alpha0, float alpha1) {
#pragma unroll
    for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
        acc[j][0] *= alpha0;
        acc[j][1] *= alpha0;
        acc[j][2] *= alpha1;
        acc[j][3] *= alpha1;
    }
}

// Both, for the paths that add P V right away. Most blocks of a long row leave its maximum where
// it was: the rescale is skipped then.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], int lane, u32 key_first, u32 end0, u32 end1,
                                               bool all_visible, float scale, const ScoreMod& mod, float& m0,
                                               float& m1, float& l0, float& l1, float (&acc)[PI_HEAD_DIM / 8][4]) {
    float alpha0, alpha1;
    softmax_scores<NT>(s, lane, key_first, key_first, end0, end1, all_visible, scale, mod, m0, m1, l0, l1, alpha0, alpha1);
    if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
}

// P's A operand for the 16-key step kk: the accumulators of two 8-key tiles, packed to 16 bits.
template <int NT>
__device__ __forceinline__ void p_fragment(u32 (&a)[4], const float (&s)[NT][4], int kk) {
    a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}
