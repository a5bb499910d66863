// The packed-attention kernel and the merge kernel.
//
// Compiled by NVRTC once per variant with -DPI_HEAD_DIM=64|128|256, -DPI_BF16=0|1,
// -DPI_BLOCK_N (keys per inner step) and -DPI_WARPS (4 or 8 warps of 16 tile rows each);
// work.cuh is prepended by the host.
//
// Execution model (the planner's contract, src/plan/work.rs): persistent CTAs take groups from a
// device counter (work stealing, so a CTA that drew short groups takes more) and run each
// group's items back to back, in order. An item is a tile of up to
// PI_BLOCK_M query rows (several requests and GQA heads, listed by row segments) against a list of
// KV chunks; each chunk applies to a contiguous range of the tile's rows. Each warp owns a
// 16-row slice; for a chunk, only the slices that intersect its rows do math. QK^T and PV run on
// tensor cores (mma.sync m16n8k16, operands through ldmatrix), K/V blocks arrive by cp.async into
// a two-stage ring, softmax is online, in fp32, in base 2.

#ifndef PI_HEAD_DIM
#error "PI_HEAD_DIM must be defined"
#endif
#ifndef PI_BLOCK_N
#define PI_BLOCK_N 64
#endif
#ifndef PI_WARPS
#define PI_WARPS 4
#endif
#define PI_BLOCK_M (16 * PI_WARPS)
#define PI_THREADS (PI_WARPS * 32)
// Shared-memory rows are padded by 16 bytes so ldmatrix's 8 row addresses hit distinct banks.
#define PI_LD (PI_HEAD_DIM + 8)

#define PI_NEG_INF (__int_as_float(0xff800000))

// ---- element conversions, written with PTX so no CUDA header is needed -------------------------

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if PI_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ u16 to_elem(float x) {
    u16 r;
#if PI_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// ---- tensor-core and async-copy primitives ------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if PI_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

// ---- shared memory --------------------------------------------------------------------------

struct RowInfo {
    i64 q_offset;  // element offset of the row's query vector (token, head)
    u32 token, head;
    u32 key_limit;  // keys >= key_limit of the row's request are masked; 0 for rows past num_rows
    u32 pad;
};

struct Smem {
    u16 q[PI_BLOCK_M * PI_LD];
    u16 k[2][PI_BLOCK_N * PI_LD];
    u16 v[2][PI_BLOCK_N * PI_LD];
    RowInfo rows[PI_BLOCK_M];
    u32 next_group;
    u32 pad[3];
};
// The host sizes the dynamic shared memory from the same formula (attention_smem_bytes in
// src/backend/cuda/compile.rs) and passes it in; a mismatch fails the compile, not the launch.
static_assert(sizeof(Smem) == PI_SMEM_BYTES, "PI_SMEM_BYTES disagrees with sizeof(Smem)");

// Loads keys [key0, key0 + PI_BLOCK_N) of `req` (those < key_end; zeros past it) into stage `s`.
__device__ __forceinline__ void load_kv_block(const KernelParams& p, Smem& sm, int s, const RequestInfo& req,
                                              u32 kv_head, u32 key0, u32 key_end, u32 page_size) {
    const int tid = threadIdx.x;
    const u16* kb = (const u16*)p.k;
    const u16* vb = (const u16*)p.v;
    if (p.flags & PI_FLAG_KV_VEC) {
        constexpr int VECS = PI_HEAD_DIM / 8;  // 16-byte vectors per key
        for (int i = tid; i < PI_BLOCK_N * VECS; i += PI_THREADS) {
            int n = i / VECS, c = (i % VECS) * 8;
            u32 key = key0 + n;
            bool valid = key < key_end;
            i64 off = 0;
            if (valid) {
                int page = p.pages[req.page_start + key / page_size];
                off = (i64)page * p.kv_stride_page + (i64)(key % page_size) * p.kv_stride_token
                    + (i64)kv_head * p.kv_stride_head + c;
            }
            cp_async16(&sm.k[s][n * PI_LD + c], kb + off, valid);
            cp_async16(&sm.v[s][n * PI_LD + c], vb + off, valid);
        }
    } else {
        for (int i = tid; i < PI_BLOCK_N * PI_HEAD_DIM; i += PI_THREADS) {
            int n = i / PI_HEAD_DIM, c = i % PI_HEAD_DIM;
            u32 key = key0 + n;
            u16 kx = 0, vx = 0;
            if (key < key_end) {
                int page = p.pages[req.page_start + key / page_size];
                i64 off = (i64)page * p.kv_stride_page + (i64)(key % page_size) * p.kv_stride_token
                        + (i64)kv_head * p.kv_stride_head + (i64)c * p.kv_stride_dim;
                kx = kb[off];
                vx = vb[off];
            }
            sm.k[s][n * PI_LD + c] = kx;
            sm.v[s][n * PI_LD + c] = vx;
        }
    }
    cp_async_commit();
}

// Q fragments stay in registers for the whole item where they fit next to the accumulators.
#ifndef PI_Q_REGS
#define PI_Q_REGS (PI_HEAD_DIM <= 128)
#endif
#define PI_QF (PI_Q_REGS ? PI_HEAD_DIM / 16 : 1)
// A tile of at most 16 rows (a decode, a few packed short rows) has one warp's worth of rows;
// then the warps split each key block instead (warp w takes 16 keys), and combine at the end.
#define PI_SPLIT_WARPS (PI_BLOCK_N / 16)

// One warp's share of a K/V block: its 16 rows against NT 8-key tiles starting at row `kbase` of
// the stage (absolute key `key_first`), masked by the rows' visible-key ends, folded into the
// online softmax state and the output accumulators.
template <int NT>
__device__ __forceinline__ void attend(const Smem& sm, int slice, int lane, const u32 (&qf)[PI_QF][4],
                                       const u16* ks, const u16* vs, int kbase, u32 key_first, u32 end0,
                                       u32 end1, bool all_visible, float scale, float& m0, float& m1, float& l0, float& l1,
                                       float (&acc)[PI_HEAD_DIM / 8][4]) {
    const int col = 2 * (lane % 4);
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < PI_HEAD_DIM / 16; ++kk) {
        u32 a[4];
        if constexpr (PI_Q_REGS) {
            a[0] = qf[kk][0]; a[1] = qf[kk][1]; a[2] = qf[kk][2]; a[3] = qf[kk][3];
        } else {
            ldmatrix_x4(a, &sm.q[(slice * 16 + lane % 16) * PI_LD + kk * 16 + (lane / 16) * 8]);
        }
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            u32 b[4];
            ldmatrix_x4(b, &ks[(kbase + 16 * j + lane % 8 + (lane / 16) * 8) * PI_LD + kk * 16 + ((lane / 8) % 2) * 8]);
            mma16816(s[2 * j], a, b[0], b[1]);
            mma16816(s[2 * j + 1], a, b[2], b[3]);
        }
    }
    // Mask (unless the whole warp sees every key of its range), scale, online softmax (base 2).
    float bm0 = PI_NEG_INF, bm1 = PI_NEG_INF;
    if (all_visible) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[j][e] *= scale;
                s[j][2 + e] *= scale;
                bm0 = fmaxf(bm0, s[j][e]);
                bm1 = fmaxf(bm1, s[j][2 + e]);
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 key = key_first + 8 * j + col + e;
                s[j][e] = key < end0 ? s[j][e] * scale : PI_NEG_INF;
                s[j][2 + e] = key < end1 ? s[j][2 + e] * scale : PI_NEG_INF;
                bm0 = fmaxf(bm0, s[j][e]);
                bm1 = fmaxf(bm1, s[j][2 + e]);
            }
        }
    }
    bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 1));
    bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 2));
    bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 1));
    bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 2));
    const float n0 = fmaxf(m0, bm0), n1 = fmaxf(m1, bm1);
    // A row that has seen no key yet keeps max -inf; subtract 0 then, not -inf.
    const float base0 = n0 == PI_NEG_INF ? 0.f : n0;
    const float base1 = n1 == PI_NEG_INF ? 0.f : n1;
    const float alpha0 = exp2_approx(m0 - base0), alpha1 = exp2_approx(m1 - base1);
    m0 = n0;
    m1 = n1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
        acc[j][0] *= alpha0;
        acc[j][1] *= alpha0;
        acc[j][2] *= alpha1;
        acc[j][3] *= alpha1;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        s[j][0] = exp2_approx(s[j][0] - base0);
        s[j][1] = exp2_approx(s[j][1] - base0);
        s[j][2] = exp2_approx(s[j][2] - base1);
        s[j][3] = exp2_approx(s[j][3] - base1);
        l0 += s[j][0] + s[j][1];
        l1 += s[j][2] + s[j][3];
    }
    // O += P V: the S accumulators of two 8-key tiles are the A fragment of one 16-key step.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        u32 a[4];
        a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int j = 0; j < PI_HEAD_DIM / 16; ++j) {
            u32 b[4];
            ldmatrix_x4_trans(b, &vs[(kbase + 16 * kk + lane % 8 + ((lane / 8) % 2) * 8) * PI_LD + 16 * j + (lane / 16) * 8]);
            mma16816(acc[2 * j], a, b[0], b[1]);
            mma16816(acc[2 * j + 1], a, b[2], b[3]);
        }
    }
}

// Where split warps leave their state for warp 0 to combine (over the K stages, free by then).
struct SplitState {
    float acc[PI_SPLIT_WARPS][16][PI_HEAD_DIM];
    float m[PI_SPLIT_WARPS][16];
    float l[PI_SPLIT_WARPS][16];
};
static_assert(sizeof(SplitState) <= sizeof(((Smem*)0)->k) + sizeof(((Smem*)0)->v), "split state must fit the K/V stages");

extern "C" __global__ void __launch_bounds__(PI_THREADS)
packed_attention(const KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
    SplitState& split_state = *reinterpret_cast<SplitState*>(&sm.k[0][0]);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const PlanHeader hdr = *p.header;
    const u32 group = hdr.group_size;
    const float scale = hdr.sm_scale_log2;
    const u16* qb = (const u16*)p.q;
    const int col = 2 * (lane % 4);

    for (;;) {
        if (tid == 0) sm.next_group = atomicAdd(p.group_counter, 1u);
        __syncthreads();
        const u32 g = sm.next_group;
        __syncthreads();  // everyone has read it before thread 0 draws again
        if (g >= hdr.num_groups) break;
        const u32 item_end = p.group_offsets[g + 1];
        for (u32 it = p.group_offsets[g]; it < item_end; ++it) {
            const WorkItem item = p.items[it];
            const bool split = item.num_rows <= 16;
            // The warp's 16-row slice of the tile, and this thread's two rows in it.
            const int slice = split ? 0 : warp;
            const int r0 = slice * 16 + lane / 4, r1 = r0 + 8;
            // Row table: which (token, head) each tile row is, and how many of its keys it sees.
            for (int r = tid; r < PI_BLOCK_M; r += PI_THREADS) {
                RowInfo ri = {0, 0, 0, 0, 0};
                if ((u32)r < item.num_rows) {
                    RowSegment seg = p.segments[item.seg_begin];
                    for (u32 s = 1; s < item.seg_count; ++s) {
                        RowSegment t = p.segments[item.seg_begin + s];
                        if (t.row_begin <= (u32)r) seg = t;
                    }
                    const RequestInfo req = p.requests[seg.request];
                    u32 q = seg.q_begin + ((u32)r - seg.row_begin) / group;
                    ri.token = req.q_start + q;
                    ri.head = item.kv_head * group + ((u32)r - seg.row_begin) % group;
                    ri.key_limit = hdr.causal ? req.kv_len - req.q_len + q + 1 : req.kv_len;
                    ri.q_offset = (i64)ri.token * p.q_stride_token + (i64)ri.head * p.q_stride_head;
                }
                sm.rows[r] = ri;
            }
            __syncthreads();
            // Q tile; rows past num_rows are zeros.
            if (p.flags & PI_FLAG_Q_VEC) {
                constexpr int VECS = PI_HEAD_DIM / 8;
                for (int i = tid; i < PI_BLOCK_M * VECS; i += PI_THREADS) {
                    int r = i / VECS, c = (i % VECS) * 8;
                    cp_async16(&sm.q[r * PI_LD + c], qb + sm.rows[r].q_offset + c, (u32)r < item.num_rows);
                }
                cp_async_commit();
            } else {
                for (int i = tid; i < PI_BLOCK_M * PI_HEAD_DIM; i += PI_THREADS) {
                    int r = i / PI_HEAD_DIM, c = i % PI_HEAD_DIM;
                    sm.q[r * PI_LD + c] = (u32)r < item.num_rows ? qb[sm.rows[r].q_offset + c] : (u16)0;
                }
            }
            u32 qf[PI_QF][4];
            if constexpr (PI_Q_REGS) {
                cp_async_wait<0>();
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < PI_QF; ++kk)
                    ldmatrix_x4(qf[kk], &sm.q[(slice * 16 + lane % 16) * PI_LD + kk * 16 + (lane / 16) * 8]);
            }

            float acc[PI_HEAD_DIM / 8][4];
#pragma unroll
            for (int j = 0; j < PI_HEAD_DIM / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
            float m0 = PI_NEG_INF, m1 = PI_NEG_INF;  // running max (base-2 scaled) of rows r0, r1
            float l0 = 0.f, l1 = 0.f;                // this thread's share of the running sums
            const u32 lim0 = sm.rows[r0].key_limit, lim1 = sm.rows[r1].key_limit;

            for (u32 ci = 0; ci < item.chunk_count; ++ci) {
                const KvChunk ch = p.chunks[item.chunk_begin + ci];
                const RequestInfo req = p.requests[ch.request];
                const bool active = (u32)(slice * 16) < ch.row_end && ch.row_begin < (u32)(slice * 16 + 16)
                                    && (u32)(slice * 16) < item.num_rows && (!split || warp < PI_SPLIT_WARPS);
                const bool in0 = ch.row_begin <= (u32)r0 && (u32)r0 < ch.row_end;
                const bool in1 = ch.row_begin <= (u32)r1 && (u32)r1 < ch.row_end;
                const u32 end0 = in0 ? min(ch.key_end, lim0) : 0;
                const u32 end1 = in1 ? min(ch.key_end, lim1) : 0;
                int stage = 0;
                if (ch.key_begin < ch.key_end)
                    load_kv_block(p, sm, 0, req, item.kv_head, ch.key_begin, ch.key_end, hdr.page_size);
                for (u32 key0 = ch.key_begin; key0 < ch.key_end; key0 += PI_BLOCK_N) {
                    // Prefetch the next block into the other stage while this one is used.
                    if (key0 + PI_BLOCK_N < ch.key_end) {
                        load_kv_block(p, sm, stage ^ 1, req, item.kv_head, key0 + PI_BLOCK_N, ch.key_end, hdr.page_size);
                        cp_async_wait<1>();
                    } else {
                        cp_async_wait<0>();
                    }
                    __syncthreads();
                    // This warp's keys of the block: all of them, or its 16 when splitting.
                    const u32 first = split ? key0 + 16 * warp : key0;
                    // Skip the math when none of the warp's rows sees one of its keys.
                    const bool any = __any_sync(0xffffffffu, active && (first < end0 || first < end1));
                    if (any) {
                        const u32 width = split ? 16 : PI_BLOCK_N;
                        const bool all_visible = __all_sync(0xffffffffu, first + width <= end0 && first + width <= end1);
                        if (split)
                            attend<2>(sm, slice, lane, qf, sm.k[stage], sm.v[stage], 16 * warp, first, end0, end1,
                                      all_visible, scale, m0, m1, l0, l1, acc);
                        else
                            attend<PI_BLOCK_N / 8>(sm, slice, lane, qf, sm.k[stage], sm.v[stage], 0, key0, end0, end1,
                                                   all_visible, scale, m0, m1, l0, l1, acc);
                    }
                    __syncthreads();  // the stage is overwritten by the prefetch two blocks on
                    stage ^= 1;
                }
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
            const float LN2 = 0.6931471805599453f;
            const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
            const float lse0 = l0 > 0.f ? (m0 + __log2f(l0)) * LN2 : PI_NEG_INF;
            const float lse1 = l1 > 0.f ? (m1 + __log2f(l1)) * LN2 : PI_NEG_INF;
            const bool writer = !split || warp == 0;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = half ? r1 : r0;
                if (!writer || (u32)r >= item.num_rows) continue;
                const float inv = half ? inv1 : inv0;
                const float lse = half ? lse1 : lse0;
                const RowInfo ri = sm.rows[r];
                if (item.partial_slot == PI_FINAL_OUTPUT) {
                    u16* ob = (u16*)p.o + (i64)ri.token * p.o_stride_token + (i64)ri.head * p.o_stride_head;
#pragma unroll
                    for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                        ob[8 * j + col] = to_elem(acc[j][2 * half] * inv);
                        ob[8 * j + col + 1] = to_elem(acc[j][2 * half + 1] * inv);
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
            __syncthreads();  // the row table, Q tile and split state are rewritten by the next item
        }
    }
}

// Combines the partial rows of split and prefix pieces by log-sum-exp (exact; a piece that saw
// no key has LSE -inf and weight 0). One warp per merge row; the grid is fixed, warps stride.
extern "C" __global__ void __launch_bounds__(128)
merge_partials(const KernelParams p) {
    const PlanHeader hdr = *p.header;
    // The attention kernel has finished (stream order): rewind its group counter for the next run.
    if (blockIdx.x == 0 && threadIdx.x == 0) *p.group_counter = 0;
    const int lane = threadIdx.x % 32;
    const u32 warps = gridDim.x * (blockDim.x / 32);
    const float* part_lse = p.scratch + (i64)hdr.num_slots * PI_HEAD_DIM;
    constexpr int PER_LANE = PI_HEAD_DIM / 32;
    for (u32 w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; w < hdr.num_merges; w += warps) {
        const MergeRow m = p.merges[w];
        float mx = PI_NEG_INF;
        for (u32 i = 0; i < m.slot_count; ++i) mx = fmaxf(mx, part_lse[p.merge_slots[m.slot_begin + i]]);
        float out[PER_LANE];
#pragma unroll
        for (int d = 0; d < PER_LANE; ++d) out[d] = 0.f;
        float total = 0.f;
        if (mx != PI_NEG_INF) {
            for (u32 i = 0; i < m.slot_count; ++i) {
                const u32 slot = p.merge_slots[m.slot_begin + i];
                const float w8 = expf(part_lse[slot] - mx);
                total += w8;
                const float* row = p.scratch + (i64)slot * PI_HEAD_DIM;
#pragma unroll
                for (int d = 0; d < PER_LANE; ++d) out[d] += w8 * row[lane + 32 * d];
            }
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        u16* ob = (u16*)p.o + (i64)m.q_token * p.o_stride_token + (i64)m.qo_head * p.o_stride_head;
#pragma unroll
        for (int d = 0; d < PER_LANE; ++d) ob[lane + 32 * d] = to_elem(out[d] * inv);
        if (p.lse && lane == 0) p.lse[(i64)m.q_token * p.num_qo_heads + m.qo_head] = total > 0.f ? mx + logf(total) : PI_NEG_INF;
    }
}
