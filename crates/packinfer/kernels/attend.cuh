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
                                       u32 end1, bool all_visible, float scale, const ScoreMod& mod, float& m0, float& m1,
                                       float& l0, float& l1, float (&acc)[PI_HEAD_DIM / 8][4]) {
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
    online_softmax<NT>(s, lane, key_first, end0, end1, all_visible, scale, mod, m0, m1, l0, l1, acc);
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
                                          const ScoreMod& mod, float& m0, float& m1, float& l0, float& l1,
                                          float (&acc)[PI_HEAD_DIM / 8][4]) {
    float s[PI_BLOCK_N / 8][4];
    u32 pf[PI_BLOCK_N / 16][4];
    wg_qk_issue(s, wg_desc(&q[wg * 64 * 64], 16), ks);
    wg_wait_all();
    pin(s);
    online_softmax<PI_BLOCK_N / 8>(s, lane, key_first, end0, end1, all_visible, scale, mod, m0, m1, l0, l1, acc);
    pack_p(pf, s);
    wg_pv_issue(acc, pf, vs);
    wg_wait_all();
    pin(acc);
    pin(pf);
}

// Block seq of a K/V stream lives in stage seq % PI_STAGES; its uses of that stage alternate
// parity.
__device__ __forceinline__ u32 ring_stage(u32 seq) { return seq % PI_STAGES; }
__device__ __forceinline__ u32 ring_parity(u32 seq) { return (seq / PI_STAGES) & 1; }

// A kernel's K/V ring as wg_pipelined sees it, for block b: before K(0), K(b) (b >= 1) or V(b)
// is read (need_*), right after O += P(b) V(b) is issued (pv_issued: work to overlap with the
// tensor cores), and once the wgmmas that read K(b) or V(b) have finished (done_*). A kernel's
// ring derives from this and hides the hooks it needs; the others do nothing.
struct WgRing {
    __device__ __forceinline__ void need_k0() const {}
    __device__ __forceinline__ void need_k(u32) const {}
    __device__ __forceinline__ void need_v(u32) const {}
    __device__ __forceinline__ void pv_issued(u32) const {}
    __device__ __forceinline__ void done_k(u32) const {}
    __device__ __forceinline__ void done_v(u32) const {}
};

// The pipelined wgmma loop over a chunk's nblocks (>= 1) K/V blocks, for one warpgroup (the
// order FlashAttention-3 uses): while S(b + 1) = Q K(b + 1)^T runs, the output is rescaled and
// O += P(b) V(b) issued; while that runs, the softmax of block b + 1 turns S(b + 1) into
// P(b + 1). The wgmma groups and waits follow one fixed pattern with no branch around an issue,
// and the output is touched only when no wgmma writing it is in flight, so ptxas can keep them
// asynchronous (otherwise it serialises every wgmma: warning C7515). Both attention kernels run
// it: block b is in stage ring_stage(seq + b) of sm.k and sm.v; `ring` (a WgRing) waits for,
// overlaps and releases stages as the kernel's ring needs; scores(s, b) turns S(b) into P(b) by
// the online softmax and sets alpha0/alpha1, the output's rescale before P(b) V(b).
// This form keeps each kernel's generated code what it was with the loop written out in the
// kernel: alpha0/alpha1 are the caller's (its scores lambda captures them), the rings hold
// copies of the kernels' lambdas, and stages are found by ring_stage. Other forms tried (alpha
// as scores' arguments, rings of references, the stage as an inline %) changed the
// warp-specialised kernel's code, the last also its spills.
template <class Sm, class Ring, class Scores>
__device__ __forceinline__ void wg_pipelined(Sm& sm, u32 seq, u32 nblocks, WgDesc dq, float (&acc)[PI_HEAD_DIM / 8][4],
                                             float& alpha0, float& alpha1, const Ring& ring, Scores& scores) {
    float s_a[PI_BLOCK_N / 8][4], s_b[PI_BLOCK_N / 8][4];
    u32 pf[PI_BLOCK_N / 16][4];
    // On entry P(b) is in pf and O has no wgmma in flight; on exit the same for b + 1.
    auto step = [&](float (&sn)[PI_BLOCK_N / 8][4], u32 b) {
        ring.need_k(b + 1);
        wg_qk_issue(sn, dq, sm.k[ring_stage(seq + b + 1)]);
        if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
        ring.need_v(b);
        wg_pv_issue(acc, pf, sm.v[ring_stage(seq + b)]);
        ring.pv_issued(b);
        wg_wait<1>();  // S(b + 1) done; O += P(b) V(b) may run on
        pin(sn);
        ring.done_k(b + 1);
        scores(sn, b + 1);
        wg_wait<0>();  // O += P(b) V(b) done
        pin(acc);
        pin(pf);
        ring.done_v(b);
        pack_p(pf, sn);
    };
    ring.need_k0();
    wg_qk_issue(s_a, dq, sm.k[ring_stage(seq)]);
    wg_wait<0>();
    pin(s_a);
    ring.done_k(0);
    scores(s_a, 0);
    pack_p(pf, s_a);
    u32 b = 0;
    for (; b + 2 < nblocks; b += 2) {
        step(s_b, b);
        step(s_a, b + 1);
    }
    if (b + 1 < nblocks) step(s_b, b++);
    if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
    ring.need_v(b);
    wg_pv_issue(acc, pf, sm.v[ring_stage(seq + b)]);
    wg_wait<0>();
    pin(acc);
    pin(pf);
    ring.done_v(b);
}
#endif
