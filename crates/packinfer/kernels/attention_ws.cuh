// ---- the warp-specialised kernel (sm_90a, head_dim <= 128) --------------------------------------
//
// The last warpgroup of the CTA is a producer, the PI_WARPS / 4 before it are consumers. The
// producer draws groups, resolves each item's rows, copies its Q tile into one of two item slots
// and streams its K and V blocks through rings of PI_STAGES stages; the consumers only compute
// (the pipelined wgmma loop) and write rows. They meet at mbarriers, never at a CTA barrier: the
// producer prepares the next item while the consumers finish this one's last blocks, and the
// consumer warpgroups drift apart instead of waiting for each other every block. Blocks of
// consecutive cache rows arrive by TMA (one box per 64 dims, issued by one thread), others by
// cp.async from all producer threads. Items of <= 16 rows run on the same wgmma path (a 64-row
// warpgroup tile with zero rows past num_rows). With one consumer warpgroup and 32-key blocks it
// is the short-prefill kernel: two CTAs per SM, each tile's Q and O by TMA where the tile is one
// request's consecutive tokens, so a consumer's tile costs little beyond its math, where the
// plain kernel's every warp also copied, addressed and waited at a CTA barrier per block
// (docs/performance-log.md#short-prefill-ctas).
#pragma once
#include "attend.cuh"

#define PI_CONSUMER_WGS (PI_WARPS / 4)
#define PI_PRODUCER_THREADS 128
// The chunks of an item the producer copies into its slot; consumers read further ones from the
// work list.
#define PI_SLOT_CHUNKS 16
// Registers per thread after the split (setmaxnreg): the producer needs few, the consumers hold
// the output, a score tile and P. Sums stay within the CTA's launch allocation (384 threads
// x 168, or 256 threads x 128 for two CTAs per SM).
// The consumers of 128-key blocks need 232 (at 224 ptxas serialises the wgmmas, C7512); the
// producer then spills, in code that waits on memory anyway. With one consumer warpgroup the
// producer gets 80 (at 64 it spilled and fed the consumers late). See
// docs/performance-log.md#register-split.
#ifndef PI_PRODUCER_REGS
#define PI_PRODUCER_REGS (PI_CONSUMER_WGS == 2 ? 40 : 80)
#endif
#ifndef PI_CONSUMER_REGS
#define PI_CONSUMER_REGS (PI_CONSUMER_WGS == 2 ? 232 : 176)
#endif
static_assert(PI_WARPS % 4 == 0 && (PI_STAGES & (PI_STAGES - 1)) == 0, "warpgroups, and a power-of-two ring");
static_assert(!PI_QO_TMA || PI_CONSUMER_WGS == 1, "O boxes are stored by one consumer warpgroup");

struct Smem {
    u16 q[2][PI_BLOCK_M * PI_HEAD_DIM];  // the item slots' Q tiles, swizzled (swz)
    u16 k[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM];
    u16 v[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM];
    RowInfo rows[2][PI_BLOCK_M];
    KvRange chunks[2][PI_SLOT_CHUNKS];
    WorkItem items[2];
    SegmentInfo segs[PI_BLOCK_M];              // the producer's scratch: the item's segments
    // full: the producer's data landed; empty: the consumers are done with it (every thread
    // arrives on q_empty, every warp on a stage's).
    u64 q_full[2], q_empty[2];
    u64 k_full[PI_STAGES], k_empty[PI_STAGES], v_full[PI_STAGES], v_empty[PI_STAGES];
    u32 last[2];  // set in a slot instead of an item: no more work
    u32 next_group;
    u32 pad;
};
static_assert(sizeof(Smem) == PI_SMEM_BYTES, "PI_SMEM_BYTES disagrees with sizeof(Smem)");

// The producer warpgroup's own barrier (named barrier 15; the consumers use 1 + their warpgroup).
__device__ __forceinline__ void producer_sync() { asm volatile("bar.sync 15, 128;" ::: "memory"); }
// A consumer warpgroup's own barrier.
__device__ __forceinline__ void consumer_sync(int wg) { asm volatile("bar.sync %0, 128;" :: "r"(wg + 1) : "memory"); }
// Whether every producer thread says yes (the same barrier).
__device__ __forceinline__ bool producer_all(bool v) {
    u32 r;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.and.pred q, 15, 128, p;\nselp.u32 %0, 1, 0, q;\n}"
                 : "=r"(r) : "r"((u32)v) : "memory");
    return r != 0;
}
// Item n lives in slot n % 2; likewise.
__device__ __forceinline__ u32 slot_parity(u32 n) { return (n >> 1) & 1; }

// The ring of wg_pipelined in a consumer: waits for the producer's full barriers (ready) and
// arrives on the empty ones (release). The lambdas are held by value (see wg_pipelined).
template <class Ready, class Release>
struct ConsumerRing : WgRing {
    Smem& sm;
    Ready ready;
    Release release;
    __device__ __forceinline__ ConsumerRing(Smem& sm, const Ready& ready, const Release& release) : sm(sm), ready(ready), release(release) {}
    __device__ __forceinline__ void need_k0() const { ready(sm.k_full, 0); }
    __device__ __forceinline__ void need_k(u32 b) const { ready(sm.k_full, b); }
    __device__ __forceinline__ void need_v(u32 b) const { ready(sm.v_full, b); }
    __device__ __forceinline__ void done_k(u32 b) const { release(sm.k_empty, b); }
    __device__ __forceinline__ void done_v(u32 b) const { release(sm.v_empty, b); }
};

// Whether the producer copies chunk ch's blocks by TMA from their rows alone: a chunk addressed
// by row with at least a block of keys. Its last block, where partial, is boxed as the chunk's
// last PI_BLOCK_N keys (box_key), reaching back over keys the block before had, which the
// consumers mask: rows past the chunk may hold anything, even NaN, which P V would carry (a
// shorter chunk goes by cp.async, which zero-fills past it).
__device__ __forceinline__ bool row_box(const KernelParams& p, const KvRange& ch) {
    return (p.flags & PI_FLAG_KV_TMA) && by_row(p, ch) && ch.key_begin + PI_BLOCK_N <= ch.key_end;
}
// The first key in the stage of chunk ch's block at key0 when row_box holds.
__device__ __forceinline__ u32 box_key(const KvRange& ch, u32 key0) { return min(key0, ch.key_end - PI_BLOCK_N); }

// Producer thread t (of 128).
__device__ __forceinline__ void produce(const KernelParams& p, Smem& sm, const PlanHeader& hdr, int t) {
    using C = KvCopy<PI_PRODUCER_THREADS>;
    const PageMap pm(hdr.page_size);
    const bool kv_vec = p.flags & PI_FLAG_KV_VEC, tma = p.flags & PI_FLAG_KV_TMA;
    u32 n = 0;    // items produced
    u32 seq = 0;  // K/V blocks produced
    for (;;) {
        if (t == 0) sm.next_group = atomicAdd(p.group_counter, 1u);
        producer_sync();
        const u32 g = sm.next_group;
        producer_sync();  // read by all before thread 0 draws again
        if (g >= hdr.num_groups) break;
        const u32 item_begin = p.group_offsets[g], item_end = p.group_offsets[g + 1];
        WorkItem next_item = {};  // read while the item before it streams
        if (item_begin < item_end) next_item = p.items[item_begin];
        for (u32 it = item_begin; it < item_end; ++it, ++n) {
            const WorkItem item = next_item;
            if (it + 1 < item_end) next_item = p.items[it + 1];
            const int slot = n & 1;
            // The item's segments and chunks, each thread's in parallel (a tile of short prompts has
            // little K/V to hide this read behind). Reading them an item ahead, or drawing the next
            // group while this one streams, was slower (docs/performance-log.md#producer-tables).
            const u32 seg_count = min(item.seg_count, (u32)PI_BLOCK_M);
            const bool has_seg = (u32)t < seg_count, has_chunk = (u32)t < min(item.chunk_count, (u32)PI_SLOT_CHUNKS);
            SegmentInfo seg = {};
            KvRange chunk = {};
            if (has_seg) seg = p.segments[item.seg_begin + t];
            if (has_chunk) chunk = p.chunks[item.chunk_begin + t];
            mbar_wait(&sm.q_empty[slot], slot_parity(n) ^ 1);  // item n - 2 is written out
            if (has_seg) sm.segs[t] = seg;
            if (has_chunk) sm.chunks[slot][t] = chunk;
            if (t == 0) {
                sm.items[slot] = item;
                sm.last[slot] = 0;
            }
            producer_sync();
            for (int r = t; r < PI_BLOCK_M; r += PI_PRODUCER_THREADS)
                sm.rows[slot][r] = row_info(p, hdr, item, sm.segs, seg_count, hdr.group_size, r);
            producer_sync();  // the Q copies below read other threads' rows
            if (PI_QO_TMA && one_request_tile(p, item, PI_FLAG_Q_TMA)) {
#if PI_QO_TMA
                if (t == 0) {  // a box per 64 dims
                    mbar_expect(&sm.q_full[slot], PI_BLOCK_M * PI_HEAD_DIM * 2);
#pragma unroll
                    for (int c = 0; c < PI_HEAD_DIM / 64; ++c)
                        tma_load(sm.q[slot] + c * PI_BLOCK_M * 64, &p.q_map, c * 64, item.kv_head * hdr.group_size,
                                 sm.segs[0].token0, &sm.q_full[slot], l2_evict_first());
                }
#endif
            } else {
                copy_q<PI_PRODUCER_THREADS, 1>(p, sm.q[slot], sm.rows[slot], item.num_rows, t);
            }
            mbar_arrive(&sm.q_full[slot]);            // the tables (and a Q tile stored element-wise)
            mbar_arrive_on_copies(&sm.q_full[slot]);  // the Q tile's copies
            for (u32 ci = 0; ci < item.chunk_count; ++ci) {
                const bool cached = ci < PI_SLOT_CHUNKS;
                const KvRange ch = cached ? sm.chunks[slot][ci] : p.chunks[item.chunk_begin + ci];
                const u32 nblocks = ch.key_end > ch.key_begin ? (ch.key_end - ch.key_begin + PI_BLOCK_N - 1) / PI_BLOCK_N : 0;
                if (nblocks == 0) continue;
                // K runs a block ahead of V, in the order the consumers use them: K(b + 1) before V(b);
                // page numbers are read two blocks ahead of the K copies that use them. A block of a
                // chunk addressed by row (row_box), or whose keys all lie in the chunk and sit in
                // consecutive cache rows (pages in order), is one TMA box per 64 dims, issued by
                // thread 0; others go by cp.async from every producer thread.
                using C = KvCopy<PI_PRODUCER_THREADS>;
                const int lane = t % 32;
                const u32 lane_key = (t / 32) * C::warp_keys_per_pass + (lane / C::warp_keys_per_pass) * C::keys_per_pass
                                     + lane % C::warp_keys_per_pass;  // the key kv_page reads, from the block's first
                struct BlockPages {
                    int page;   // this lane's page (kv_page)
                    int first;  // the page of the block's first key, where TMA may apply
                };
                auto pages_of = [&](u32 b) {
                    BlockPages r = {0, 0};
                    const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                    const bool whole = tma && key0 + PI_BLOCK_N <= ch.key_end;
                    if (b < nblocks && !row_box(p, ch)) {
                        r.page = kv_page<PI_PRODUCER_THREADS>(p, ch, key0, pm, t);
                        if (whole) r.first = __ldg(&p.pages[ch.page_start + pm.page(key0)]);
                    }
                    return r;
                };
                // The block's first cache row if TMA can copy it, else -1 (a vote of all producer threads).
                auto box_row = [&](u32 b, const BlockPages& bp) {
                    const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                    if (row_box(p, ch)) return (int)(ch.row0 - ch.key_begin + box_key(ch, key0));  // no vote needed
                    if (!tma || key0 + PI_BLOCK_N > ch.key_end) return -1;
                    const i64 row0 = (i64)bp.first * pm.size + pm.slot(key0);
                    const u32 key = key0 + lane_key;
                    const bool mine = lane >= C::warp_keys || (i64)bp.page * pm.size + pm.slot(key) == row0 + lane_key;
                    return producer_all(mine && row0 + PI_BLOCK_N <= 0x7fffffff) ? (int)row0 : -1;
                };
                auto fill = [&](u16 (*ring)[PI_BLOCK_N * PI_HEAD_DIM], u64* full, u64* empty, const void* src,
                                const TensorMap* map, u32 b, int page, int row) {
                    const u32 s = ring_stage(seq + b);
                    mbar_wait(&empty[s], ring_parity(seq + b) ^ 1);
                    if (row >= 0) {
                        if (t == 0) {
                            mbar_arrive_expect(&full[s], PI_BLOCK_N * PI_HEAD_DIM * 2);
#pragma unroll
                            for (int c = 0; c < PI_HEAD_DIM / 64; ++c)
                                tma_load(ring[s] + c * PI_BLOCK_N * 64, map, c * 64, item.kv_head, row, &full[s]);
                        } else {
                            mbar_arrive(&full[s]);
                        }
                        return;
                    }
                    u16* const dst[1] = {ring[s]};
                    const u16* const from[1] = {(const u16*)src};
                    copy_kv<PI_PRODUCER_THREADS, 1>(p, dst, from, ch.page_start, item.kv_head, ch.key_begin + b * PI_BLOCK_N, ch.key_end, pm, t, page);
                    if (kv_vec) mbar_arrive_on_copies(&full[s]); else mbar_arrive(&full[s]);
                };
                BlockPages pv = pages_of(0), pk = pages_of(1);
                int row_v = box_row(0, pv);
                fill(sm.k, sm.k_full, sm.k_empty, p.k, &p.k_map, 0, pv.page, row_v);
                for (u32 b = 0; b < nblocks; ++b) {
                    const BlockPages pn = pages_of(b + 2);
                    int row_k = -1;
                    if (b + 1 < nblocks) {
                        row_k = box_row(b + 1, pk);
                        fill(sm.k, sm.k_full, sm.k_empty, p.k, &p.k_map, b + 1, pk.page, row_k);
                    }
                    fill(sm.v, sm.v_full, sm.v_empty, p.v, &p.v_map, b, pv.page, row_v);
                    pv = pk;
                    pk = pn;
                    row_v = row_k;
                }
                seq += nblocks;
            }
        }
    }
    // No more work: the next slot says so.
    const int slot = n & 1;
    mbar_wait(&sm.q_empty[slot], slot_parity(n) ^ 1);
    if (t == 0) sm.last[slot] = 1;
    mbar_arrive(&sm.q_full[slot]);
    mbar_arrive_on_copies(&sm.q_full[slot]);
}

// Consumer thread tid (warp w of the consumers owns tile rows 16w .. 16w + 15).
__device__ __forceinline__ void consume(const KernelParams& p, Smem& sm, const PlanHeader& hdr, int tid) {
    const int warp = tid / 32, lane = tid % 32, wg = warp / 4;
    const float scale = hdr.sm_scale_log2;
    const int r0 = warp * 16 + lane / 4, r1 = r0 + 8;
    u32 seq = 0;  // K/V blocks consumed
    for (u32 n = 0;; ++n) {
        const int slot = n & 1;
        mbar_wait(&sm.q_full[slot], slot_parity(n));
        if (sm.last[slot]) break;
        fence_for_tensor_cores();  // the Q tile was written by cp.async
        const WorkItem item = sm.items[slot];
        const WgDesc dq = wg_desc(&sm.q[slot][wg * 64 * 64], 16);
        float acc[PI_HEAD_DIM / 8][4];
#pragma unroll
        for (int j = 0; j < PI_HEAD_DIM / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        float m0 = PI_NEG_INF, m1 = PI_NEG_INF;  // running max (base-2 scaled) of rows r0, r1
        float l0 = 0.f, l1 = 0.f;                // this thread's share of the running sums
        const u32 lim0 = sm.rows[slot][r0].key_limit, lim1 = sm.rows[slot][r1].key_limit;
        for (u32 ci = 0; ci < item.chunk_count; ++ci) {
            const KvRange ch = ci < PI_SLOT_CHUNKS ? sm.chunks[slot][ci] : p.chunks[item.chunk_begin + ci];
            const u32 nblocks = ch.key_end > ch.key_begin ? (ch.key_end - ch.key_begin + PI_BLOCK_N - 1) / PI_BLOCK_N : 0;
            if (nblocks == 0) continue;
            const bool in0 = ch.row_begin <= (u32)r0 && (u32)r0 < ch.row_end;
            const bool in1 = ch.row_begin <= (u32)r1 && (u32)r1 < ch.row_end;
            const u32 end0 = in0 ? min(ch.key_end, lim0) : 0;
            const u32 end1 = in1 ? min(ch.key_end, lim1) : 0;
            auto ready = [&](u64* full, u32 b) {
                mbar_wait(&full[ring_stage(seq + b)], ring_parity(seq + b));
                // Only stages filled by cp.async (the generic proxy) need the fence before
                // wgmma reads them (docs/performance-log.md#tma-fence).
                if (!row_box(p, ch)) fence_for_tensor_cores();
            };
            auto release = [&](u64* empty, u32 b) {
                __syncwarp();
                if (lane == 0) mbar_arrive(&empty[ring_stage(seq + b)]);
            };
            // The pipelined loop (wg_pipelined) waits on the producer's barriers, and releases
            // each stage as soon as its wgmmas have finished reading it.
            // Whether warpgroup w has rows in the chunk (the tile's rows 64w.. that are below
            // num_rows, from a 16-row slice on): every consumer thread computes the same answer.
            auto in_chunk = [&](u32 w) {
                const u32 lo = max(64 * w, ch.row_begin), hi = min(64 * w + 64, ch.row_end);
                return lo < hi && lo / 16 * 16 < item.num_rows;
            };
            if (in_chunk(wg)) {
                float alpha0, alpha1;  // the output's rescale before block b's P V
                auto scores = [&](float (&sc)[PI_BLOCK_N / 8][4], u32 b) {
                    const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                    // The rows' first visible keys (sliding window) and the run's soft-cap, read
                    // here: kept in registers for the whole item they made the kernel spill more.
                    // No custom mask: a launch runs masked plans on the plain kernel.
                    const ScoreMod mod = {sm.rows[slot][r0].key_start, sm.rows[slot][r1].key_start, p.softcap_in, p.softcap_out, nullptr, nullptr, nullptr, 0, 0};
                    // (A block visible in full is whole, so its stage starts at key0.)
                    const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1
                                                                    && key0 >= mod.lo0 && key0 >= mod.lo1);
                    const u32 first = row_box(p, ch) ? box_key(ch, key0) : key0;
                    softmax_scores<PI_BLOCK_N / 8, true>(sc, lane, first, key0, end0, end1, all_visible, scale, mod, m0, m1, l0, l1, alpha0, alpha1);
                };
                wg_pipelined(sm, seq, nblocks, dq, acc, alpha0, alpha1, ConsumerRing(sm, ready, release), scores);
            } else {
                // None of this warpgroup's rows is in the chunk: it only keeps the ring's count.
                for (u32 b = 0; b < nblocks; ++b) {
                    mbar_wait(&sm.k_full[ring_stage(seq + b)], ring_parity(seq + b));
                    release(sm.k_empty, b);
                    mbar_wait(&sm.v_full[ring_stage(seq + b)], ring_parity(seq + b));
                    release(sm.v_empty, b);
                }
            }
            seq += nblocks;
        }
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#if PI_QO_TMA
        // The short-prefill kernel's final rows leave through the slot's Q tile, as whole rows
        // (see store_rows) or, for a whole one-request tile, as boxes by TMA; the slot is
        // released once the boxes have read it. (The 8-warp kernel's consumers have no registers
        // for this: ptxas serialised their wgmmas, C7512.)
        const bool staged = item.partial_slot == PI_FINAL_OUTPUT && (p.flags & PI_FLAG_O_VEC);
        const bool o_by_tma = staged && one_request_tile(p, item, PI_FLAG_O_TMA);
        if (staged) consumer_sync(wg);  // the warpgroup's wgmmas have read the Q tile
        store_rows(p, hdr, item, sm.rows[slot], r0, r1, lane, acc, m0, m1, l0, l1, staged ? sm.q[slot] : nullptr, warp, o_by_tma);
        if (o_by_tma) {
            fence_for_tensor_cores();  // the staged rows are read next by TMA
            consumer_sync(wg);
            if (tid == 0) {
#pragma unroll
                for (int c = 0; c < PI_HEAD_DIM / 64; ++c)
                    tma_store(&p.o_map, sm.q[slot] + c * PI_BLOCK_M * 64, c * 64, item.kv_head * hdr.group_size, sm.rows[slot][0].token, l2_evict_first());
                bulk_commit();
                bulk_wait_read();
            }
        }
        else if (staged) fence_for_tensor_cores();  // the producer may fill the slot by TMA next
#else
        store_rows(p, hdr, item, sm.rows[slot], r0, r1, lane, acc, m0, m1, l0, l1);
#endif
        // Every consumer thread arrives, since every one read the slot's tables. (With lane 0
        // arriving for its warp after __syncwarp, as the stages are released, racecheck reported
        // the producer's next writes to the slot as hazards in the short-prefill kernel; the
        // time is the same either way: docs/performance-log.md#q-empty-arrive.)
        mbar_arrive(&sm.q_empty[slot]);
    }
}

extern "C" __global__ void __launch_bounds__(PI_THREADS + PI_PRODUCER_THREADS, PI_CONSUMER_WGS == 1 ? 2 : 1)
packed_attention(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // The swizzle needs 1024-byte aligned tiles; the host adds 1024 bytes of slack for this.
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u));
    const int tid = threadIdx.x;
    const PlanHeader hdr = *p.header;
    if (tid == 0) {
        for (int i = 0; i < 2; ++i) {
            mbar_init(&sm.q_full[i], 2 * PI_PRODUCER_THREADS);
            mbar_init(&sm.q_empty[i], PI_THREADS);
        }
        for (int s = 0; s < PI_STAGES; ++s) {
            mbar_init(&sm.k_full[s], PI_PRODUCER_THREADS);
            mbar_init(&sm.v_full[s], PI_PRODUCER_THREADS);
            mbar_init(&sm.k_empty[s], PI_WARPS);
            mbar_init(&sm.v_empty[s], PI_WARPS);
        }
    }
    __syncthreads();
    if (tid >= PI_THREADS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(PI_PRODUCER_REGS));
        produce(p, sm, hdr, tid - PI_THREADS);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(PI_CONSUMER_REGS));
        consume(p, sm, hdr, tid);
    }
}
