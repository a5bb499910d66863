// ---- the plain persistent kernel (any architecture, head_dim, tile size) ---------------------
//
// Every warp both copies and computes: the CTA's threads copy K/V blocks by cp.async into a ring
// of PI_STAGES stages and meet at a CTA barrier per block (attention.cu describes the rest).
#pragma once
#include "attend.cuh"

// A tile of at most 16 rows (a decode, a few packed short rows) has one warp's worth of rows;
// then the warps split each key block instead (warp w takes 16 keys), and combine at the end.
#define PI_SPLIT_WARPS (PI_BLOCK_N / 16)

struct Smem {
    u16 q[PI_BLOCK_M * PI_HEAD_DIM_TILE];  // swizzled (swz); every tile a multiple of 1024 bytes
#if PI_KV_FP8
    // The block being computed, converted to 16 bits (one stage), and the ring of landing bytes.
    u16 k[1][PI_BLOCK_N * PI_HEAD_DIM_TILE];
    u16 v[1][PI_BLOCK_N * PI_HEAD_DIM_TILE];
    unsigned char k8[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM_TILE];
    unsigned char v8[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM_TILE];
#else
    u16 k[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM_TILE];
    u16 v[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM_TILE];
#endif
    RowInfo rows[PI_BLOCK_M];
    SegmentInfo segs[PI_BLOCK_M];  // an item has at most one segment per row
    alignas(16) WorkItem next_item;  // the group's next item, copied in while this one runs
    u32 next_group;
    u32 pad[3];
};
// The host sizes the dynamic shared memory from the same formula (attention_smem_bytes in
// src/backend/cuda/compile.rs, plus 1024 bytes to align the base for the swizzle) and passes it
// in; a mismatch fails the compile, not the launch.
static_assert(sizeof(Smem) == PI_SMEM_BYTES, "PI_SMEM_BYTES disagrees with sizeof(Smem)");

// Where split warps leave their state for warp 0 to combine (over the K stages, free by then).
struct SplitState {
    float acc[PI_SPLIT_WARPS][16][PI_HEAD_DIM];
    float m[PI_SPLIT_WARPS][16];
    float l[PI_SPLIT_WARPS][16];
};
#if PI_KV_FP8
static_assert(sizeof(SplitState) <= sizeof(((Smem*)0)->k) + sizeof(((Smem*)0)->v) + sizeof(((Smem*)0)->k8) + sizeof(((Smem*)0)->v8),
              "split state must fit the K/V tiles and stages");
#else
static_assert(sizeof(SplitState) <= sizeof(((Smem*)0)->k) + sizeof(((Smem*)0)->v), "split state must fit the K/V stages");
#endif

#if PI_WG_PIPELINE
// The ring of wg_pipelined in the plain kernel: block b >= 1 is waited for at a CTA barrier
// (landed; block 0 was before the loop), and the next copies are issued while O += P V runs.
// The lambdas are held by value (see wg_pipelined).
template <class Landed, class Refill>
struct CtaRing : WgRing {
    Landed landed;
    Refill refill;
    __device__ __forceinline__ CtaRing(const Landed& landed, const Refill& refill) : landed(landed), refill(refill) {}
    __device__ __forceinline__ void need_k(u32) const { landed(); }
    __device__ __forceinline__ void pv_issued(u32 b) const { refill(b); }
};
#endif

extern "C" __global__ void __launch_bounds__(PI_THREADS)
packed_attention(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // The swizzle needs 1024-byte aligned tiles; the host adds 1024 bytes of slack for this.
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u));
    SplitState& split_state = *reinterpret_cast<SplitState*>(&sm.k[0][0]);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const PlanHeader hdr = *p.header;
    const u32 group = hdr.group_size;
    const float scale = hdr.sm_scale_log2;
    const PageMap pm(hdr.page_size);
    const int col = 2 * (lane % 4);

    for (;;) {
        if (tid == 0) sm.next_group = atomicAdd(p.group_counter, 1u);
        __syncthreads();
        const u32 g = sm.next_group;
        __syncthreads();  // everyone has read it before thread 0 draws again
        if (g >= hdr.num_groups) break;
        const u32 item_end = p.group_offsets[g + 1];
        const u32 item_begin = p.group_offsets[g];
        WorkItem first_item = {};
        if (item_begin < item_end) first_item = p.items[item_begin];
        for (u32 it = item_begin; it < item_end; ++it) {
            // Items after the first were copied into shared memory while the one before ran (as
            // a register prefetch, the compiler moved each into uniform registers right after its
            // load and waited there: docs/performance-log.md#next-item-smem).
            const WorkItem item = it == item_begin ? first_item : sm.next_item;
            const bool split = item.num_rows <= 16;
            // The warp's 16-row slice of the tile, and this thread's two rows in it.
            const int slice = split ? 0 : warp;
            const int r0 = slice * 16 + lane / 4, r1 = r0 + 8;
            // Segment table (one thread per segment, so their reads overlap), then the row table:
            // which (token, head) each tile row is, and how many of its keys it sees. The first
            // chunk and its first block's page numbers are read alongside: each is a link in the
            // chain of dependent reads before the tile's first K/V bytes can be asked for, and a
            // tile of a short prompt has few blocks to hide that chain behind.
            static_assert(PI_BLOCK_M <= PI_THREADS, "one thread per segment");
            const u32 seg_count = min(item.seg_count, (u32)PI_BLOCK_M);
            const bool has_seg = (u32)tid < seg_count;
            SegmentInfo seg = {};
            if (has_seg) seg = p.segments[item.seg_begin + tid];
            KvRange ch0 = {};
            if (item.chunk_count > 0) ch0 = p.chunks[item.chunk_begin];
            const int page0 = ch0.key_end > ch0.key_begin ? kv_page<PI_THREADS>(p, ch0, ch0.key_begin, pm, tid) : 0;
            if (has_seg) sm.segs[tid] = seg;
            __syncthreads();  // also: every thread has read sm.next_item
            static_assert(sizeof(WorkItem) == 32, "two 16-byte copies");
            if (tid < 2 && it + 1 < item_end) cp_async16(reinterpret_cast<uint4*>(&sm.next_item) + tid, reinterpret_cast<const uint4*>(&p.items[it + 1]) + tid, true);
            for (int r = tid; r < PI_BLOCK_M; r += PI_THREADS) sm.rows[r] = row_info(p, hdr, item, sm.segs, seg_count, group, r);
            __syncthreads();
            // Q tile; rows past num_rows are zeros. The next item's copy lands with it.
            copy_q<PI_THREADS, PI_BLOCK_M * PI_ROW_VECS / PI_THREADS>(p, sm.q, sm.rows, item.num_rows, tid);
            cp_async_commit();
            // Q fragments for the mma.sync path, read from the tile once it has landed (with the
            // item's first K/V block, so the two loads overlap). wgmma reads Q from shared memory.
            u32 qf[PI_QF][4];
            bool qf_loaded = !PI_Q_REGS || (PI_WGMMA && !split);

            float acc[PI_HEAD_DIM / 8][4];
#pragma unroll
            for (int j = 0; j < PI_HEAD_DIM / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
            float m0 = PI_NEG_INF, m1 = PI_NEG_INF;  // running max (base-2 scaled) of rows r0, r1
            float l0 = 0.f, l1 = 0.f;                // this thread's share of the running sums
            const u32 lim0 = sm.rows[r0].key_limit, lim1 = sm.rows[r1].key_limit;
            // The rows' first visible keys (sliding window) and the run's soft-cap, read where they
            // are used: kept in registers for the whole item they made the kernel spill.
#if PI_KV_FP8
            // The head's K scale multiplies every raw score: folded into the score scale, and
            // into the soft-cap's input (its output, in raw units, divided by it), so the cap
            // sees the dequantized scores. The V scale multiplies the output rows (below).
            const float k_sc = kv_scale(p.k_scale, p.k_head_scales, item.kv_head);
            const float item_scale = scale * k_sc;
            auto score_mod = [&]() {
                return ScoreMod{sm.rows[r0].key_start, sm.rows[r1].key_start, p.softcap_in * k_sc, __fdividef(p.softcap_out, k_sc),
                                nullptr, nullptr, sm.rows, r0, r1};
            };
#else
            const float item_scale = scale;
            auto score_mod = [&]() {
                return ScoreMod{sm.rows[r0].key_start, sm.rows[r1].key_start, p.softcap_in, p.softcap_out, p.mask, p.mask_bit0, sm.rows, r0, r1};
            };
#endif

            for (u32 ci = 0; ci < item.chunk_count; ++ci) {
                const KvRange ch = ci == 0 ? ch0 : p.chunks[item.chunk_begin + ci];
                const bool active = (u32)(slice * 16) < ch.row_end && ch.row_begin < (u32)(slice * 16 + 16)
                                    && (u32)(slice * 16) < item.num_rows && (!split || warp < PI_SPLIT_WARPS);
                const bool in0 = ch.row_begin <= (u32)r0 && (u32)r0 < ch.row_end;
                const bool in1 = ch.row_begin <= (u32)r1 && (u32)r1 < ch.row_end;
                const u32 end0 = in0 ? min(ch.key_end, lim0) : 0;
                const u32 end1 = in1 ? min(ch.key_end, lim1) : 0;
                // A ring of PI_STAGES K/V stages: block b lives in stage b % PI_STAGES, and the loads
                // run PI_STAGES - 1 blocks ahead (one commit group per block, empty past the end).
                const u32 nblocks = ch.key_end > ch.key_begin ? (ch.key_end - ch.key_begin + PI_BLOCK_N - 1) / PI_BLOCK_N : 0;
                // `page` is this lane's page number of the next block to issue (the first chunk's
                // first block's was read with the segment table).
                int page = page0;
                auto gather = [&](u32 b) {
                    if (b < nblocks && (b > 0 || ci > 0)) page = kv_page<PI_THREADS>(p, ch, ch.key_begin + b * PI_BLOCK_N, pm, tid);
                };
                auto issue = [&](u32 b) {
                    if (b < nblocks) {
                        const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
#if PI_KV_FP8
                        unsigned char* const dst[2] = {sm.k8[b % PI_STAGES], sm.v8[b % PI_STAGES]};
                        const unsigned char* const src[2] = {(const unsigned char*)p.k, (const unsigned char*)p.v};
                        copy_kv8<PI_THREADS, 2>(p, dst, src, ch.page_start, item.kv_head, key0, ch.key_end, pm, tid, page);
#else
                        u16* const dst[2] = {sm.k[b % PI_STAGES], sm.v[b % PI_STAGES]};
                        const u16* const src[2] = {(const u16*)p.k, (const u16*)p.v};
                        copy_kv<PI_THREADS, 2>(p, dst, src, ch.page_start, item.kv_head, key0, ch.key_end, pm, tid, page);
#endif
                    }
                    cp_async_commit();  // one group per block, empty past the end
                };
#if PI_WG_PIPELINE
                if (!split) {
                    // Software-pipelined per warpgroup (wg_pipelined), the loads running AHEAD
                    // blocks ahead. A warpgroup none of whose rows belong to the chunk skips it;
                    // one that does computes every block of it (the masks zero what its rows cannot
                    // see; under a causal mask that is at most the last block).
                    constexpr u32 AHEAD = PI_STAGES - 2;
                    const int wg = warp / 4;
                    const WgDesc dq = wg_desc(&sm.q[wg * 64 * 64], 16);
#pragma unroll
                    for (u32 b = 0; b <= AHEAD; ++b) {
                        gather(b);
                        issue(b);
                    }
                    gather(AHEAD + 1);
                    cp_async_wait<AHEAD>();  // block 0 and the Q tile landed
                    fence_for_tensor_cores();
                    __syncthreads();
                    // Block b + 1 landed for everyone, and the stage refilled next is free (its
                    // last reader, the PV of block b + 1 + AHEAD - PI_STAGES <= b - 1, has finished).
                    auto block_landed = [&]() {
                        cp_async_wait<AHEAD - 1>();
                        fence_for_tensor_cores();
                        __syncthreads();
                    };
                    auto refill = [&](u32 b) {
                        issue(b + 1 + AHEAD);
                        gather(b + 2 + AHEAD);
                    };
                    const bool wg_rows = warpgroup_any(__any_sync(0xffffffffu, active), wg);
                    if (wg_rows && nblocks > 0) {
                        float alpha0, alpha1;  // the output's rescale before block b's P V
                        auto scores = [&](float (&sc)[PI_BLOCK_N / 8][4], u32 b) {
                            const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                            const ScoreMod mod = score_mod();
                            const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1
                                                                            && key0 >= mod.lo0 && key0 >= mod.lo1);
                            softmax_scores<PI_BLOCK_N / 8>(sc, lane, key0, key0, end0, end1, all_visible, scale, mod, m0, m1, l0, l1, alpha0, alpha1);
                        };
                        wg_pipelined(sm, 0, nblocks, dq, acc, alpha0, alpha1, CtaRing(block_landed, refill), scores);
                    } else {
                        for (u32 b = 0; b + 1 < nblocks; ++b) {
                            block_landed();
                            refill(b);
                        }
                    }
                    __syncthreads();  // the next chunk's first loads reuse this chunk's stages
                    continue;
                }
#endif
#pragma unroll
                for (u32 b = 0; b + 1 < PI_STAGES; ++b) {
                    gather(b);
                    issue(b);
                }
                gather(PI_STAGES - 1);
                for (u32 b = 0; b < nblocks; ++b) {
                    cp_async_wait<PI_STAGES - 2>();  // block b (and the Q tile) landed
                    fence_for_tensor_cores();
                    __syncthreads();  // for every thread; and block b - 1's stage is free again
                    issue(b + PI_STAGES - 1);
                    gather(b + PI_STAGES);
#if PI_KV_FP8
                    // Block b's bytes landed for every thread, and every warp is done with block
                    // b - 1's converted tile (the barrier above): convert block b into it.
                    convert_kv8<PI_THREADS>(sm.k[0], sm.k8[b % PI_STAGES], tid);
                    convert_kv8<PI_THREADS>(sm.v[0], sm.v8[b % PI_STAGES], tid);
                    fence_for_tensor_cores();
                    __syncthreads();
                    const int stage = 0;
#else
                    const int stage = b % PI_STAGES;
#endif
                    const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                    if (!qf_loaded) {
#pragma unroll
                        for (int kk = 0; kk < PI_QF; ++kk)
                            ldmatrix_x4(qf[kk], &sm.q[swz<PI_BLOCK_M>(slice * 16 + lane % 16, 2 * kk + lane / 16)]);
                        qf_loaded = true;
                    }
                    // This warp's keys of the block: all of them, or its 16 when splitting.
                    const u32 first = split ? key0 + 16 * warp : key0;
                    // Skip the math when none of the warp's rows sees one of its keys.
                    const bool any = __any_sync(0xffffffffu, active && (first < end0 || first < end1));
#if PI_WGMMA
                    if (!split) {
                        if (warpgroup_any(any, warp / 4)) {
                            const ScoreMod mod = score_mod();
                            const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1
                                                                            && key0 >= mod.lo0 && key0 >= mod.lo1);
                            attend_wg(sm.q, warp / 4, lane, sm.k[stage], sm.v[stage], key0, end0, end1, all_visible, item_scale,
                                      mod, m0, m1, l0, l1, acc);
                        }
                    } else
#endif
                    if (any) {
                        const u32 width = split ? 16 : PI_BLOCK_N;
                        const ScoreMod mod = score_mod();
                        const bool all_visible = __all_sync(0xffffffffu, first + width <= end0 && first + width <= end1
                                                                        && first >= mod.lo0 && first >= mod.lo1);
                        if (split)
                            attend<2>(sm.q, slice, lane, qf, sm.k[stage], sm.v[stage], 16 * warp, first, end0, end1,
                                      all_visible, item_scale, mod, m0, m1, l0, l1, acc);
                        else
                            attend<PI_BLOCK_N / 8>(sm.q, slice, lane, qf, sm.k[stage], sm.v[stage], 0, key0, end0, end1,
                                                   all_visible, item_scale, mod, m0, m1, l0, l1, acc);
                    }
                }
                __syncthreads();  // the next chunk's first loads reuse this chunk's stages
            }
            cp_async_wait<0>();  // an item without keys still issued its Q copies

            // Finish the rows: total sums across the quad, LSE in natural log, write out.
            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            if (split) {
                // Warps 1.. hand their state to warp 0, which rescales everything to the common max.
                __syncthreads();  // all warps are done with the K/V stages the state overwrites
                if (warp < PI_SPLIT_WARPS) {
                    const int a = lane / 4, b = a + 8;
#pragma unroll
                    for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                        split_state.acc[warp][a][8 * j + col] = acc[j][0];
                        split_state.acc[warp][a][8 * j + col + 1] = acc[j][1];
                        split_state.acc[warp][b][8 * j + col] = acc[j][2];
                        split_state.acc[warp][b][8 * j + col + 1] = acc[j][3];
                    }
                    if (lane % 4 == 0) {
                        split_state.m[warp][a] = m0;
                        split_state.m[warp][b] = m1;
                        split_state.l[warp][a] = l0;
                        split_state.l[warp][b] = l1;
                    }
                }
                __syncthreads();
                if (warp == 0) {
                    const int a = lane / 4, b = a + 8;
                    float M0 = PI_NEG_INF, M1 = PI_NEG_INF;
#pragma unroll
                    for (int w = 0; w < PI_SPLIT_WARPS; ++w) {
                        M0 = fmaxf(M0, split_state.m[w][a]);
                        M1 = fmaxf(M1, split_state.m[w][b]);
                    }
                    float f0[PI_SPLIT_WARPS], f1[PI_SPLIT_WARPS];
                    l0 = l1 = 0.f;
#pragma unroll
                    for (int w = 0; w < PI_SPLIT_WARPS; ++w) {
                        f0[w] = M0 == PI_NEG_INF ? 0.f : exp2_approx(split_state.m[w][a] - M0);
                        f1[w] = M1 == PI_NEG_INF ? 0.f : exp2_approx(split_state.m[w][b] - M1);
                        l0 += f0[w] * split_state.l[w][a];
                        l1 += f1[w] * split_state.l[w][b];
                    }
#pragma unroll
                    for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                        float x0 = 0.f, x1 = 0.f, x2 = 0.f, x3 = 0.f;
#pragma unroll
                        for (int w = 0; w < PI_SPLIT_WARPS; ++w) {
                            x0 += f0[w] * split_state.acc[w][a][8 * j + col];
                            x1 += f0[w] * split_state.acc[w][a][8 * j + col + 1];
                            x2 += f1[w] * split_state.acc[w][b][8 * j + col];
                            x3 += f1[w] * split_state.acc[w][b][8 * j + col + 1];
                        }
                        acc[j][0] = x0;
                        acc[j][1] = x1;
                        acc[j][2] = x2;
                        acc[j][3] = x3;
                    }
                    m0 = M0;
                    m1 = M1;
                }
            }
#if PI_KV_FP8
            // The head's V scale, on final rows and on the partial rows of split keys alike (the
            // merge then combines dequantized rows).
            {
                const float v_sc = kv_scale(p.v_scale, p.v_head_scales, item.kv_head);
#pragma unroll
                for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                    acc[j][0] *= v_sc;
                    acc[j][1] *= v_sc;
                    acc[j][2] *= v_sc;
                    acc[j][3] *= v_sc;
                }
            }
#endif
            // Final rows leave through the Q tile once every warp is done reading it (see store_rows).
            const bool staged = item.partial_slot == PI_FINAL_OUTPUT && (p.flags & PI_FLAG_O_VEC);
            if (staged && !split) __syncthreads();
            if (!split || warp == 0)
                store_rows(p, hdr, item, sm.rows, r0, r1, lane, acc, m0, m1, l0, l1, staged ? sm.q : nullptr, slice);
            __syncthreads();  // the row table, Q tile and split state are rewritten by the next item
        }
    }
}
