// A tile's data: the swizzled shared-memory layout, the row table, the key -> page map, the
// copies of K/V blocks and Q tiles into shared memory, and the stores of finished rows.
#pragma once
#include "ptx.cuh"
#include "mask.cuh"

// Shared-memory tiles (Q, K, V) use the 128-byte swizzle that wgmma's descriptors describe: a
// tile of ROWS rows x PI_HEAD_DIM elements is stored as PI_HEAD_DIM_TILE / 64 column blocks, each
// ROWS rows of 128 bytes, and the 16-byte chunk c of row r sits at chunk position c ^ (r % 8)
// (the column blocks start on 1024-byte boundaries, so the hardware's swizzle, which works on
// address bits, sees the same pattern). ldmatrix reads it without bank conflicts as well, so
// the mma.sync path uses the same layout. Returns the element offset of (row, chunk * 8).
template <int ROWS>
__device__ __forceinline__ int swz(int row, int chunk) {
    return (chunk >> 3) * (ROWS * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// Key -> (page, slot) by a multiply and a shift (Granlund and Montgomery's division by an
// invariant: with l = ceil(log2 size) and magic = ceil(2^(31 + l) / size) < 2^32, key / size ==
// (key * magic) >> (31 + l) == umulhi(2 key, magic) >> l for every key < 2^31). A division per
// key, or a "power of two ? shift : divide" select (the compiler predicates both sides), cost
// a large share of the kernels' instructions (docs/performance-log.md#page-map).
struct PageMap {
    u32 size, magic, shift;
    __device__ __forceinline__ explicit PageMap(u32 page_size) : size(page_size) {
        shift = page_size > 1 ? 32 - __clz(page_size - 1) : 0;
        magic = (u32)((((u64)1 << (31 + shift)) + page_size - 1) / page_size);
    }
    __device__ __forceinline__ u32 page(u32 key) const { return __umulhi(key << 1, magic) >> shift; }
    __device__ __forceinline__ u32 slot(u32 key) const { return key - page(key) * size; }
};

// K/V copies with 16-byte vectors by NT threads: thread t copies chunk t % vecs of keys
// t / vecs + j * keys_per_pass, j < passes. A warp's threads touch warp_keys distinct keys of a
// block; lane l < warp_keys looks up the page of the l-th (kv_page) and the copies take it by
// shuffle, so each thread does one dependent read per block, not `passes`.
template <int NT>
struct KvCopy {
    // Chunks >= PI_HEAD_DIM / 8 (fp8: / 16) are not copied.
    static constexpr int vecs = PI_KV_VECS;
    static constexpr int keys_per_pass = NT / vecs;
    static constexpr int passes = PI_BLOCK_N / keys_per_pass;
    static constexpr int warp_keys_per_pass = 32 / vecs;
    static constexpr int warp_keys = passes * warp_keys_per_pass;
    static_assert(NT % vecs == 0 && PI_BLOCK_N % keys_per_pass == 0 && warp_keys <= 32, "K/V copy shape");
};

// Whether chunk ch's keys are addressed by cache row (they sit in consecutive rows, and the
// cache has a row view): then key k is row ch.row0 - ch.key_begin + k, with no page to read.
__device__ __forceinline__ bool by_row(const KernelParams& p, const KvRange& ch) {
    return (p.flags & PI_FLAG_KV_ROWS) && ch.row0 != PI_NO_ROW;
}

// The page number that lane t % 32 holds for the block of chunk ch at key0 (see KvCopy). Read
// ahead of the copies that use it (the loops below), so the latency of this dependent read hides
// behind other work: read right before the copies it was the largest stall of the prefill kernel
// (docs/performance-log.md#page-lookahead). A chunk addressed by row has its pages computed,
// not read.
template <int NT>
__device__ __forceinline__ int kv_page(const KernelParams& p, const KvRange& ch, u32 key0, const PageMap& pm, int t) {
    using C = KvCopy<NT>;
    const int lane = t % 32;
    if (!(p.flags & PI_FLAG_KV_VEC) || lane >= C::warp_keys) return 0;  // the scalar path looks pages up itself
    const u32 key = key0 + (t / 32) * C::warp_keys_per_pass + (lane / C::warp_keys_per_pass) * C::keys_per_pass
                    + lane % C::warp_keys_per_pass;
    if (key >= ch.key_end) return 0;
    // row0 - key_begin is a multiple of the page size (row0 = page * size + key_begin % size), so
    // the computed page pairs with the key's slot as a read one would.
    return by_row(p, ch) ? (int)pm.page(ch.row0 - ch.key_begin + key) : __ldg(&p.pages[ch.page_start + pm.page(key)]);
}

// Thread t's share of copying keys [key0, key0 + PI_BLOCK_N) of the request whose page list starts
// at page_start (those < key_end; zeros
// past it) from each cache src[i] (K, V or both: they share the address math) into the swizzled
// block dst[i], given the warp's page numbers from kv_page. With 16-byte vectors by cp.async
// (the caller commits or arrives); otherwise element by element with plain loads and stores.
// Every lane of the warp calls it.
template <int NT, int N>
__device__ __forceinline__ void copy_kv(const KernelParams& p, u16* const (&dst)[N], const u16* const (&src)[N],
                                        u32 page_start, u32 kv_head, u32 key0, u32 key_end, const PageMap& pm,
                                        int t, int page_lane) {
    using C = KvCopy<NT>;
    if (p.flags & PI_FLAG_KV_VEC) {
        const int ch = t % C::vecs;
#pragma unroll
        for (int j = 0; j < C::passes; ++j) {
            const int n = t / C::vecs + j * C::keys_per_pass;
            const u32 key = key0 + n;
            const int page = __shfl_sync(0xffffffffu, page_lane, j * C::warp_keys_per_pass + (t % 32) / C::vecs);
            const bool valid = key < key_end;
#if PI_WS
            // The producer has 40 registers (beside two 232-register consumer warpgroups): the
            // form below made it spill twice as much and run slower
            // (docs/performance-log.md#kv-addressing).
            const i64 off = valid ? (i64)page * p.kv_stride_page + (i64)pm.slot(key) * p.kv_stride_token
                                        + (i64)kv_head * p.kv_stride_head + ch * 8
                                  : 0;
#else
            // Page numbers and slots are unsigned 32-bit (a page list holds u32s): one wide
            // multiply each; no branch, since a key past the end reads nothing (source size 0)
            // from whatever address (docs/performance-log.md#kv-addressing).
            const i64 off = (i64)kv_head * p.kv_stride_head + ch * 8 + (i64)((u64)(u32)page * (u64)p.kv_stride_page)
                            + (i64)((u64)pm.slot(key) * (u64)p.kv_stride_token);
#endif
            if (ch * 8 < PI_HEAD_DIM) {
#pragma unroll
                for (int i = 0; i < N; ++i) cp_async16(&dst[i][swz<PI_BLOCK_N>(n, ch)], src[i] + off, valid);
            }
        }
    } else {
        for (int i = t; i < PI_BLOCK_N * PI_HEAD_DIM; i += NT) {
            const int n = i / PI_HEAD_DIM, c = i % PI_HEAD_DIM;
            const u32 key = key0 + n;
            i64 off = -1;
            if (key < key_end)
                off = (i64)p.pages[page_start + pm.page(key)] * p.kv_stride_page + (i64)pm.slot(key) * p.kv_stride_token
                      + (i64)kv_head * p.kv_stride_head + (i64)c * p.kv_stride_dim;
#pragma unroll
            for (int i = 0; i < N; ++i) dst[i][swz<PI_BLOCK_N>(n, c / 8) + c % 8] = off >= 0 ? src[i][off] : (u16)0;
        }
    }
}

#if PI_KV_FP8
// fp8 K/V: a block lands as bytes in a row-major tile (PI_HEAD_DIM_TILE bytes a row, no swizzle:
// the conversion reads it a 16-byte chunk per thread, consecutive threads consecutive chunks),
// then convert_kv8 writes it as a swizzled 16-bit tile, which the MMAs read as any 16-bit block.
// Converting in shared memory, once per element, costs a CTA barrier per block; converting in
// registers would redo it for every warp that reads the block (each of a tile's warps reads all
// of it) and needs fragment layouts that ldmatrix and wgmma cannot produce from bytes.
__device__ __forceinline__ int kv8_at(int n, int chunk) { return n * PI_HEAD_DIM_TILE + chunk * 16; }

// copy_kv for fp8 caches: the same threads and page lookups (KvCopy with PI_KV_VECS), each
// 16-byte chunk 16 codes; strides and offsets count bytes (one per element).
template <int NT, int N>
__device__ __forceinline__ void copy_kv8(const KernelParams& p, unsigned char* const (&dst)[N], const unsigned char* const (&src)[N],
                                         u32 page_start, u32 kv_head, u32 key0, u32 key_end, const PageMap& pm, int t,
                                         int page_lane) {
    using C = KvCopy<NT>;
    if (p.flags & PI_FLAG_KV_VEC) {
        const int ch = t % C::vecs;
#pragma unroll
        for (int j = 0; j < C::passes; ++j) {
            const int n = t / C::vecs + j * C::keys_per_pass;
            const u32 key = key0 + n;
            const int page = __shfl_sync(0xffffffffu, page_lane, j * C::warp_keys_per_pass + (t % 32) / C::vecs);
            const bool valid = key < key_end;
            const i64 off = (i64)kv_head * p.kv_stride_head + ch * 16 + (i64)((u64)(u32)page * (u64)p.kv_stride_page)
                            + (i64)((u64)pm.slot(key) * (u64)p.kv_stride_token);
            if (ch * 16 < PI_HEAD_DIM) {
#pragma unroll
                for (int i = 0; i < N; ++i) cp_async16(&dst[i][kv8_at(n, ch)], src[i] + off, valid);
            }
        }
    } else {
        for (int i = t; i < PI_BLOCK_N * PI_HEAD_DIM; i += NT) {
            const int n = i / PI_HEAD_DIM, c = i % PI_HEAD_DIM;
            const u32 key = key0 + n;
            i64 off = -1;
            if (key < key_end)
                off = (i64)p.pages[page_start + pm.page(key)] * p.kv_stride_page + (i64)pm.slot(key) * p.kv_stride_token
                      + (i64)kv_head * p.kv_stride_head + (i64)c * p.kv_stride_dim;
#pragma unroll
            for (int i = 0; i < N; ++i) dst[i][n * PI_HEAD_DIM_TILE + c] = off >= 0 ? src[i][off] : (unsigned char)0;
        }
    }
}

// Thread t's share of converting a landed byte block into the swizzled 16-bit tile dst.
template <int NT>
__device__ __forceinline__ void convert_kv8(u16* dst, const unsigned char* src, int t) {
    constexpr int VECS = PI_HEAD_DIM_TILE / 16, CHUNKS = PI_BLOCK_N * VECS;
#pragma unroll
    for (int j = 0; j < (CHUNKS + NT - 1) / NT; ++j) {
        const int i = t + j * NT, n = i / VECS, c = i % VECS;
        if ((CHUNKS % NT == 0 || i < CHUNKS) && c * 16 < PI_HEAD_DIM) {
            const uint4 x = *reinterpret_cast<const uint4*>(&src[kv8_at(n, c)]);
            uint4 a, b;
            a.x = e4m3x2_to_elem2(x.x & 0xffffu);
            a.y = e4m3x2_to_elem2(x.x >> 16);
            a.z = e4m3x2_to_elem2(x.y & 0xffffu);
            a.w = e4m3x2_to_elem2(x.y >> 16);
            b.x = e4m3x2_to_elem2(x.z & 0xffffu);
            b.y = e4m3x2_to_elem2(x.z >> 16);
            b.z = e4m3x2_to_elem2(x.w & 0xffffu);
            b.w = e4m3x2_to_elem2(x.w >> 16);
            *reinterpret_cast<uint4*>(&dst[swz<PI_BLOCK_N>(n, 2 * c)]) = a;
            *reinterpret_cast<uint4*>(&dst[swz<PI_BLOCK_N>(n, 2 * c + 1)]) = b;
        }
    }
}

// The run's K or V scale for KV head h: the per-tensor one times the head's entry (no array: 1).
__device__ __forceinline__ float kv_scale(float tensor, const float* heads, u32 h) {
    return heads ? tensor * heads[h] : tensor;
}
#endif

// Thread t's share of the Q tile's rows (rows past num_rows are zeros), by cp.async where
// 16-byte vectors are allowed (the caller commits or arrives). The loop is unrolled UNROLL
// times: fully in the compute kernels (the swizzled destinations fold into constants); not in
// the warp-specialised producer, whose 40 registers the unrolled form overflowed
// (docs/performance-log.md#copy-q-unroll).
template <int NT, int UNROLL>
__device__ __forceinline__ void copy_q(const KernelParams& p, u16* dst, const RowInfo* rows, u32 num_rows, int t) {
    const u16* qb = (const u16*)p.q;
    if (p.flags & PI_FLAG_Q_VEC) {
        // Thread t copies chunk t % VECS of rows t / VECS + j * ROWS_PER_PASS.
        constexpr int VECS = PI_ROW_VECS, ROWS_PER_PASS = NT / VECS;  // chunks >= PI_HEAD_DIM / 8 idle
        static_assert(NT % VECS == 0 && PI_BLOCK_M % ROWS_PER_PASS == 0, "Q copy shape");
        const u64 once = l2_evict_first();
        const int ch = t % VECS;
#pragma unroll UNROLL
        for (int j = 0; j < PI_BLOCK_M / ROWS_PER_PASS; ++j) {
            const int r = t / VECS + j * ROWS_PER_PASS;
            if (ch * 8 < PI_HEAD_DIM) cp_async16(&dst[swz<PI_BLOCK_M>(r, ch)], qb + rows[r].q_offset + ch * 8, (u32)r < num_rows, once);
        }
    } else {
        for (int i = t; i < PI_BLOCK_M * PI_HEAD_DIM; i += NT) {
            const int r = i / PI_HEAD_DIM, c = i % PI_HEAD_DIM;
            dst[swz<PI_BLOCK_M>(r, c / 8) + c % 8] = (u32)r < num_rows ? qb[rows[r].q_offset + c] : (u16)0;
        }
    }
}

// Tile row r of `item`: which (token, head) it is and how many keys it sees, from the item's
// resolved segments (the last one starting at or before r); zeros past num_rows.
__device__ __forceinline__ RowInfo row_info(const KernelParams& p, const PlanHeader& hdr, const WorkItem& item,
                                            const SegmentInfo* segs, u32 seg_count, u32 group, u32 r) {
    RowInfo ri = {0, 0, 0, 0, 0};
    if (r < item.num_rows) {
        u32 lo = 0, hi = seg_count;
        while (hi - lo > 1) {
            const u32 mid = (lo + hi) / 2;
            if (segs[mid].row_begin <= r) lo = mid; else hi = mid;
        }
        const SegmentInfo seg = segs[lo];
        const u32 q = (r - seg.row_begin) / group;
        ri.token = seg.token0 + q;
        ri.head = item.kv_head * group + (r - seg.row_begin) % group;
        row_keys(seg.limit0 + seg.step * q, hdr.window_left, hdr.causal != 0, ri.key_start, ri.key_limit);
        ri.q_offset = (i64)ri.token * p.q_stride_token + (i64)ri.head * p.q_stride_head;
    }
    return ri;
}

// Element offset of dims [8c, 8c + 8) of tile row r in a 16-bit tile kept as 64-dim halves
// (half h: PI_BLOCK_M rows of 128 bytes), with the row's 16-byte chunks XOR-swizzled by r % 8 so
// that eight rows' same chunk fall in different banks.
__device__ __forceinline__ int staged_at(int r, int c) { return (c / 8) * PI_BLOCK_M * 64 + r * 64 + ((c % 8) ^ (r % 8)) * 8; }

// Finishes this thread's two rows r0, r1 of a tile (l0, l1 already summed over the quad):
// normalises them and writes the final output and LSE, or the partial row and LSE to scratch.
// With `stage` (the tile's Q in shared memory, free once the warp's slice `slice` has been
// read for the last time; final output with 16-byte aligned rows) the warp's 16 rows go through
// it and leave as whole rows of 16-byte stores: stored straight from the accumulators, 4 bytes
// per thread, each 32-byte sector reaches L2 in two halves, and a half-written sector costs a
// DRAM read (docs/performance-log.md#o-staging). With `staged_only` the rows stay staged for
// the caller, which stores the whole tile by TMA.
__device__ __forceinline__ void store_rows(const KernelParams& p, const PlanHeader& hdr, const WorkItem& item,
                                           const RowInfo* rows, int r0, int r1, int lane,
                                           const float (&acc)[PI_HEAD_DIM / 8][4], float m0, float m1, float l0, float l1,
                                           u16* stage = nullptr, int slice = 0, bool staged_only = false) {
    const int col = 2 * (lane % 4);
    const float LN2 = 0.6931471805599453f;
    // The approximate reciprocal (about 1 ulp): IEEE division was a subroutine call
    // (docs/performance-log.md#rcp-approx).
    float inv0 = 0.f, inv1 = 0.f;
    if (l0 > 0.f) asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inv0) : "f"(l0));
    if (l1 > 0.f) asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inv1) : "f"(l1));
    const float lse0 = l0 > 0.f ? (m0 + __log2f(l0)) * LN2 : PI_NEG_INF;
    const float lse1 = l1 > 0.f ? (m1 + __log2f(l1)) * LN2 : PI_NEG_INF;
    if (stage) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = half ? r1 : r0;
            const float inv = half ? inv1 : inv0;
#pragma unroll
            for (int j = 0; j < PI_HEAD_DIM / 8; ++j)
                *reinterpret_cast<u32*>(&stage[staged_at(r, j) + col]) = pack2(acc[j][2 * half] * inv, acc[j][2 * half + 1] * inv);
            if (p.lse && lane % 4 == 0 && (u32)r < item.num_rows)
                p.lse[(i64)rows[r].token * p.num_qo_heads + rows[r].head] = half ? lse1 : lse0;
        }
        if (staged_only) return;  // the caller stores the staged tile (by TMA)
        __syncwarp();
        const u64 once = l2_evict_first();  // see cp_async16
        constexpr int CHUNKS = PI_HEAD_DIM / 8;                  // 16-byte chunks of a row
        constexpr int ROW_LANES = PI_ROW_VECS < 32 ? PI_ROW_VECS : 32;  // lanes per row, a chunk each
        static_assert(CHUNKS <= ROW_LANES && 32 % ROW_LANES == 0, "a lane per chunk (head_dim <= 256)");
#pragma unroll
        for (int i = 0; i < 16 * ROW_LANES / 32; ++i) {
            const int r = slice * 16 + i * (32 / ROW_LANES) + lane / ROW_LANES, c = lane % ROW_LANES;
            if ((u32)r < item.num_rows && c < CHUNKS) {
                const RowInfo ri = rows[r];
                u16* ob = (u16*)p.o + (i64)ri.token * p.o_stride_token + (i64)ri.head * p.o_stride_head;
                const uint4 v = *reinterpret_cast<const uint4*>(&stage[staged_at(r, c)]);
                asm volatile("st.global.L2::cache_hint.v4.b32 [%0], {%1, %2, %3, %4}, %5;"
                             :: "l"(&ob[8 * c]), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(once) : "memory");
            }
        }
        return;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = half ? r1 : r0;
        if ((u32)r >= item.num_rows) continue;
        const float inv = half ? inv1 : inv0;
        const float lse = half ? lse1 : lse0;
        const RowInfo ri = rows[r];
        if (item.partial_slot == PI_FINAL_OUTPUT) {
            u16* ob = (u16*)p.o + (i64)ri.token * p.o_stride_token + (i64)ri.head * p.o_stride_head;
            if ((reinterpret_cast<u64>(ob) & 3) == 0) {  // the pair as one 4-byte store
#pragma unroll
                for (int j = 0; j < PI_HEAD_DIM / 8; ++j)
                    *reinterpret_cast<u32*>(&ob[8 * j + col]) = pack2(acc[j][2 * half] * inv, acc[j][2 * half + 1] * inv);
            } else {
#pragma unroll
                for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                    ob[8 * j + col] = to_elem(acc[j][2 * half] * inv);
                    ob[8 * j + col + 1] = to_elem(acc[j][2 * half + 1] * inv);
                }
            }
            if (p.lse && lane % 4 == 0) p.lse[(i64)ri.token * p.num_qo_heads + ri.head] = lse;
        } else {
            const u32 slot = item.partial_slot + r;
            float* ob = p.scratch + (i64)slot * PI_HEAD_DIM;
#pragma unroll
            for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                ob[8 * j + col] = acc[j][2 * half] * inv;
                ob[8 * j + col + 1] = acc[j][2 * half + 1] * inv;
            }
            if (lane % 4 == 0) p.scratch[(i64)hdr.num_slots * PI_HEAD_DIM + slot] = lse;
        }
    }
}

// Whether item w is a whole tile of one request's consecutive tokens (one row segment, every
// row), which a TMA box of q_map / o_map covers, and `flag` allows it.
__device__ __forceinline__ bool one_request_tile(const KernelParams& p, const WorkItem& w, u32 flag) {
    return (p.flags & flag) && w.seg_count == 1 && w.num_rows == PI_BLOCK_M;
}
