// One K/V block's math for a tile's rows, S = Q K^T, the online softmax, O += P V: per warp
// with mma.sync (any architecture), or per warpgroup with wgmma (sm_90a).
#pragma once
#include "softmax.cuh"
#include "tile.cuh"

// Q fragments stay in registers for the whole item where they fit next to the accumulators
// (not in wgmma builds, where only the split path would use them: the registers go to the
// wgmma accumulators, and the split path reads Q through ldmatrix each time).
#ifndef PI_Q_REGS
#define PI_Q_REGS (PI_HEAD_DIM <= 128 && !PI_WGMMA)
#endif
#define PI_QF (PI_Q_REGS ? PI_HEAD_DIM / 16 : 1)

// One warp's share of a K/V block with mma.sync: its 16 rows against NT 8-key tiles starting at
// row `kbase` of the stage (absolute key `key_first`), masked by the rows' visible-key ends.
template <int NT>
__device__ __forceinline__ void attend(const u16* q, int slice, int lane, const u32 (&qf)[PI_QF][4],
                                       const u16* ks, const u16* vs, int kbase, u32 key_first, u32 end0,
                                       u32 end1, bool all_visible, float scale, float& m0, float& m1, float& l0, float& l1,
                                       float (&acc)[PI_HEAD_DIM / 8][4]) {
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < PI_HEAD_DIM / 16; ++kk) {
        u32 a[4];
        if constexpr (PI_Q_REGS) {
            a[0] = qf[kk][0]; a[1] = qf[kk][1]; a[2] = qf[kk][2]; a[3] = qf[kk][3];
        } else {
            ldmatrix_x4(a, &q[swz<PI_BLOCK_M>(slice * 16 + lane % 16, 2 * kk + lane / 16)]);
        }
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            u32 b[4];
            ldmatrix_x4(b, &ks[swz<PI_BLOCK_N>(kbase + 16 * j + lane % 8 + (lane / 16) * 8, 2 * kk + (lane / 8) % 2)]);
            mma16816(s[2 * j], a, b[0], b[1]);
            mma16816(s[2 * j + 1], a, b[2], b[3]);
        }
    }
    online_softmax<NT>(s, lane, key_first, end0, end1, all_visible, scale, m0, m1, l0, l1, acc);
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        u32 a[4];
        p_fragment<NT>(a, s, kk);
#pragma unroll
        for (int j = 0; j < PI_HEAD_DIM / 16; ++j) {
            u32 b[4];
            ldmatrix_x4_trans(b, &vs[swz<PI_BLOCK_N>(kbase + 16 * kk + lane % 8 + ((lane / 8) % 2) * 8, 2 * j + lane / 16)]);
            mma16816(acc[2 * j], a, b[0], b[1]);
            mma16816(acc[2 * j + 1], a, b[2], b[3]);
        }
    }
}

#if PI_WGMMA
// A warpgroup's 64 rows (from row 64 * wg of the tile, descriptor dq) against a K/V block with
// wgmma, in two halves that the pipelined loop interleaves with other work. Both only issue and
// commit; the caller waits (wg_wait) before touching the registers they write or read.
//   S = Q K^T (Q and K from shared memory; s is overwritten).
__device__ __forceinline__ void wg_qk_issue(float (&s)[PI_BLOCK_N / 8][4], WgDesc dq, const u16* ks) {
    // Each step's descriptor is the first one plus a constant byte offset (in 16-byte units; the
    // 14-bit address field cannot carry over for shared-memory addresses).
    const WgDesc dk = wg_desc(ks, 16);
    wg_fence();
    wgmma_qk_first(s, dq, dk);
#pragma unroll
    for (int kk = 1; kk < PI_HEAD_DIM / 16; ++kk)
        wgmma_qk(s, dq + (((kk / 4) * (PI_BLOCK_M * 128) + (kk % 4) * 32) >> 4),
                 dk + (((kk / 4) * (PI_BLOCK_N * 128) + (kk % 4) * 32) >> 4), 1);
    wg_commit();
}
//   O += P V, P packed by pack_p; the instructions read pf until they finish.
__device__ __forceinline__ void pack_p(u32 (&pf)[PI_BLOCK_N / 16][4], const float (&s)[PI_BLOCK_N / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < PI_BLOCK_N / 16; ++kk) p_fragment<PI_BLOCK_N / 8>(pf[kk], s, kk);
}
__device__ __forceinline__ void wg_pv_issue(float (&acc)[PI_HEAD_DIM / 8][4], const u32 (&pf)[PI_BLOCK_N / 16][4],
                                            const u16* vs) {
    const WgDesc dv = wg_desc(vs, PI_BLOCK_N * 128);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < PI_BLOCK_N / 16; ++kk) wgmma_pv(acc, pf[kk], dv + ((kk * 16 * 128) >> 4));
    wg_commit();
}

// The whole block at once (kernels with too few stages for the pipelined loop).
__device__ __forceinline__ void attend_wg(const u16* q, int wg, int lane, const u16* ks, const u16* vs,
                                          u32 key_first, u32 end0, u32 end1, bool all_visible, float scale,
                                          float& m0, float& m1, float& l0, float& l1,
                                          float (&acc)[PI_HEAD_DIM / 8][4]) {
    float s[PI_BLOCK_N / 8][4];
    u32 pf[PI_BLOCK_N / 16][4];
    wg_qk_issue(s, wg_desc(&q[wg * 64 * 64], 16), ks);
    wg_wait_all();
    pin(s);
    online_softmax<PI_BLOCK_N / 8>(s, lane, key_first, end0, end1, all_visible, scale, m0, m1, l0, l1, acc);
    pack_p(pf, s);
    wg_pv_issue(acc, pf, vs);
    wg_wait_all();
    pin(acc);
    pin(pf);
}
#endif
