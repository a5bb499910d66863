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
#ifndef PI_MT
#define PI_MT 1
#endif
#define PI_BLOCK_M (16 * PI_WARPS * PI_MT)
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

// Each warp owns PI_MT 16-row m-tiles of the Q tile (PI_MT = 2 reuses every K/V fragment twice).
#ifndef PI_MT
#define PI_MT 1
#endif
// Q fragments stay in registers for the whole item where they fit next to the accumulators.
#ifndef PI_Q_REGS
#define PI_Q_REGS (PI_HEAD_DIM <= 128 && PI_MT == 1)
#endif
#define PI_QF (PI_Q_REGS ? PI_HEAD_DIM / 16 : 1)
// A tile of at most 16 rows (a decode, a few packed short rows) has one m-tile's worth of rows;
// then the warps split each key block instead (warp w takes 16 keys), and combine at the end.
#define PI_SPLIT_WARPS (PI_BLOCK_N / 16 < PI_WARPS ? PI_BLOCK_N / 16 : PI_WARPS)

// One warp's share of a K/V block: its MTN m-tiles of rows (from tile row `row_base`) against NT
// 8-key tiles starting at row `kbase` of the stage (absolute key `key_first`), masked by the
// rows' visible-key ends, folded into the online softmax state and the output accumulators.
// Thread rows: m-tile t, half h is tile row row_base + 16t + 8h + lane/4.
template <int NT, int MTN>
__device__ __forceinline__ void attend(const Smem& sm, int row_base, int lane, const u32 (&qf)[PI_QF][4],
                                       const u16* ks, const u16* vs, int kbase, u32 key_first,
                                       const u32 (&end)[PI_MT][2], bool all_visible, float scale,
                                       float (&m)[PI_MT][2], float (&l)[PI_MT][2],
                                       float (&acc)[PI_MT][PI_HEAD_DIM / 8][4]) {
    const int col = 2 * (lane % 4);
    float s[MTN][NT][4];
#pragma unroll
    for (int t = 0; t < MTN; ++t)
#pragma unroll
        for (int j = 0; j < NT; ++j) s[t][j][0] = s[t][j][1] = s[t][j][2] = s[t][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < PI_HEAD_DIM / 16; ++kk) {
        u32 a[MTN][4];
#pragma unroll
        for (int t = 0; t < MTN; ++t) {
            if constexpr (PI_Q_REGS) {
                a[t][0] = qf[kk][0]; a[t][1] = qf[kk][1]; a[t][2] = qf[kk][2]; a[t][3] = qf[kk][3];
            } else {
                ldmatrix_x4(a[t], &sm.q[(row_base + 16 * t + lane % 16) * PI_LD + kk * 16 + (lane / 16) * 8]);
            }
        }
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            u32 b[4];
            ldmatrix_x4(b, &ks[(kbase + 16 * j + lane % 8 + (lane / 16) * 8) * PI_LD + kk * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
            for (int t = 0; t < MTN; ++t) {
                mma16816(s[t][2 * j], a[t], b[0], b[1]);
                mma16816(s[t][2 * j + 1], a[t], b[2], b[3]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MTN; ++t) {
        // Mask (unless the whole warp sees every key of its range), scale, online softmax (base 2).
        float bm[2] = {PI_NEG_INF, PI_NEG_INF};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e / 2;
                if (all_visible) {
                    s[t][j][e] *= scale;
                } else {
                    const u32 key = key_first + 8 * j + col + (e & 1);
                    s[t][j][e] = key < end[t][h] ? s[t][j][e] * scale : PI_NEG_INF;
                }
                bm[h] = fmaxf(bm[h], s[t][j][e]);
            }
        }
        float base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            bm[h] = fmaxf(bm[h], __shfl_xor_sync(0xffffffffu, bm[h], 1));
            bm[h] = fmaxf(bm[h], __shfl_xor_sync(0xffffffffu, bm[h], 2));
            const float n = fmaxf(m[t][h], bm[h]);
            // A row that has seen no key yet keeps max -inf; subtract 0 then, not -inf.
            base[h] = n == PI_NEG_INF ? 0.f : n;
            const float alpha = exp2_approx(m[t][h] - base[h]);
            m[t][h] = n;
            l[t][h] *= alpha;
#pragma unroll
            for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                acc[t][j][2 * h] *= alpha;
                acc[t][j][2 * h + 1] *= alpha;
            }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[t][j][e] = exp2_approx(s[t][j][e] - base[e / 2]);
                l[t][e / 2] += s[t][j][e];
            }
        }
    }
    // O += P V: the S accumulators of two 8-key tiles are the A fragment of one 16-key step.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        u32 a[MTN][4];
#pragma unroll
        for (int t = 0; t < MTN; ++t) {
            a[t][0] = pack2(s[t][2 * kk][0], s[t][2 * kk][1]);
            a[t][1] = pack2(s[t][2 * kk][2], s[t][2 * kk][3]);
            a[t][2] = pack2(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
            a[t][3] = pack2(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
        }
#pragma unroll
        for (int j = 0; j < PI_HEAD_DIM / 16; ++j) {
            u32 b[4];
            ldmatrix_x4_trans(b, &vs[(kbase + 16 * kk + lane % 8 + ((lane / 8) % 2) * 8) * PI_LD + 16 * j + (lane / 16) * 8]);
#pragma unroll
            for (int t = 0; t < MTN; ++t) {
                mma16816(acc[t][2 * j], a[t], b[0], b[1]);
                mma16816(acc[t][2 * j + 1], a[t], b[2], b[3]);
            }
        }
    }
}

// Where split warps leave their state for warp 0 to combine (over the K/V stages, free by then).
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
            // The warp's rows of the tile (all warps share rows 0..15 when splitting).
            const int row_base = split ? 0 : warp * 16 * PI_MT;
            const int slice_rows = split ? 16 : 16 * PI_MT;
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
                    ldmatrix_x4(qf[kk], &sm.q[(row_base + lane % 16) * PI_LD + kk * 16 + (lane / 16) * 8]);
            }

            float acc[PI_MT][PI_HEAD_DIM / 8][4];
            float m[PI_MT][2], l[PI_MT][2];  // running max (base-2 scaled), this thread's share of the sums
            u32 lim[PI_MT][2];
#pragma unroll
            for (int t = 0; t < PI_MT; ++t) {
#pragma unroll
                for (int j = 0; j < PI_HEAD_DIM / 8; ++j) acc[t][j][0] = acc[t][j][1] = acc[t][j][2] = acc[t][j][3] = 0.f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    m[t][h] = PI_NEG_INF;
                    l[t][h] = 0.f;
                    lim[t][h] = sm.rows[row_base + 16 * t + 8 * h + lane / 4].key_limit;
                }
            }

            for (u32 ci = 0; ci < item.chunk_count; ++ci) {
                const KvChunk ch = p.chunks[item.chunk_begin + ci];
                const RequestInfo req = p.requests[ch.request];
                const bool active = (u32)row_base < ch.row_end && ch.row_begin < (u32)(row_base + slice_rows)
                                    && (u32)row_base < item.num_rows && (!split || warp < PI_SPLIT_WARPS);
                u32 end[PI_MT][2];
#pragma unroll
                for (int t = 0; t < PI_MT; ++t)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u32 r = row_base + 16 * t + 8 * h + lane / 4;
                        const bool in = ch.row_begin <= r && r < ch.row_end && (!split || t == 0);
                        end[t][h] = in ? min(ch.key_end, lim[t][h]) : 0;
                    }
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
                    const u32 width = split ? 16 : PI_BLOCK_N;
                    bool sees = false, sees_all = true;
#pragma unroll
                    for (int t = 0; t < PI_MT; ++t)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            sees = sees || first < end[t][h];
                            sees_all = sees_all && first + width <= end[t][h];
                        }
                    // Skip the math when none of the warp's rows sees one of its keys.
                    if (__any_sync(0xffffffffu, active && sees)) {
                        const bool all_visible = __all_sync(0xffffffffu, sees_all);
                        if (split)
                            attend<2, 1>(sm, row_base, lane, qf, sm.k[stage], sm.v[stage], 16 * warp, first, end,
                                         all_visible, scale, m, l, acc);
                        else
                            attend<PI_BLOCK_N / 8, PI_MT>(sm, row_base, lane, qf, sm.k[stage], sm.v[stage], 0, key0,
                                                          end, all_visible, scale, m, l, acc);
                    }
                    __syncthreads();  // the stage is overwritten by the prefetch two blocks on
                    stage ^= 1;
                }
            }
            cp_async_wait<0>();  // an item without keys still issued its Q copies

            // Finish the rows: total sums across the quad, LSE in natural log, write out.
#pragma unroll
            for (int t = 0; t < PI_MT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    l[t][h] += __shfl_xor_sync(0xffffffffu, l[t][h], 1);
                    l[t][h] += __shfl_xor_sync(0xffffffffu, l[t][h], 2);
                }
            if (split) {
                // Warps 1.. hand their state to warp 0, which rescales everything to the common max.
                __syncthreads();  // all warps are done with the K/V stages the state overwrites
                if (warp < PI_SPLIT_WARPS) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 8 * h + lane / 4;
#pragma unroll
                        for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                            split_state.acc[warp][r][8 * j + col] = acc[0][j][2 * h];
                            split_state.acc[warp][r][8 * j + col + 1] = acc[0][j][2 * h + 1];
                        }
                        if (lane % 4 == 0) {
                            split_state.m[warp][r] = m[0][h];
                            split_state.l[warp][r] = l[0][h];
                        }
                    }
                }
                __syncthreads();
                if (warp == 0) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 8 * h + lane / 4;
                        float M = PI_NEG_INF;
#pragma unroll
                        for (int w = 0; w < PI_SPLIT_WARPS; ++w) M = fmaxf(M, split_state.m[w][r]);
                        float f[PI_SPLIT_WARPS];
                        float L = 0.f;
#pragma unroll
                        for (int w = 0; w < PI_SPLIT_WARPS; ++w) {
                            f[w] = M == PI_NEG_INF ? 0.f : exp2_approx(split_state.m[w][r] - M);
                            L += f[w] * split_state.l[w][r];
                        }
#pragma unroll
                        for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                            float x0 = 0.f, x1 = 0.f;
#pragma unroll
                            for (int w = 0; w < PI_SPLIT_WARPS; ++w) {
                                x0 += f[w] * split_state.acc[w][r][8 * j + col];
                                x1 += f[w] * split_state.acc[w][r][8 * j + col + 1];
                            }
                            acc[0][j][2 * h] = x0;
                            acc[0][j][2 * h + 1] = x1;
                        }
                        m[0][h] = M;
                        l[0][h] = L;
                    }
                }
            }
            const float LN2 = 0.6931471805599453f;
            const bool writer = !split || warp == 0;
#pragma unroll
            for (int t = 0; t < PI_MT; ++t) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = row_base + 16 * t + 8 * h + lane / 4;
                    if (!writer || (u32)r >= item.num_rows) continue;
                    const float inv = l[t][h] > 0.f ? 1.f / l[t][h] : 0.f;
                    const float lse = l[t][h] > 0.f ? (m[t][h] + __log2f(l[t][h])) * LN2 : PI_NEG_INF;
                    const RowInfo ri = sm.rows[r];
                    if (item.partial_slot == PI_FINAL_OUTPUT) {
                        u16* ob = (u16*)p.o + (i64)ri.token * p.o_stride_token + (i64)ri.head * p.o_stride_head;
#pragma unroll
                        for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                            ob[8 * j + col] = to_elem(acc[t][j][2 * h] * inv);
                            ob[8 * j + col + 1] = to_elem(acc[t][j][2 * h + 1] * inv);
                        }
                        if (p.lse && lane % 4 == 0) p.lse[(i64)ri.token * p.num_qo_heads + ri.head] = lse;
                    } else {
                        const u32 slot = item.partial_slot + r;
                        float* ob = p.scratch + (i64)slot * PI_HEAD_DIM;
#pragma unroll
                        for (int j = 0; j < PI_HEAD_DIM / 8; ++j) {
                            ob[8 * j + col] = acc[t][j][2 * h] * inv;
                            ob[8 * j + col + 1] = acc[t][j][2 * h + 1] * inv;
                        }
                        if (lane % 4 == 0) p.scratch[(i64)hdr.num_slots * PI_HEAD_DIM + slot] = lse;
                    }
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
