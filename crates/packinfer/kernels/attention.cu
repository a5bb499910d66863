// The packed-attention kernel and the merge kernel.
//
// Compiled by NVRTC once per variant with -DPI_HEAD_DIM=64|128|256, -DPI_BF16=0|1,
// -DPI_BLOCK_N (keys per inner step: 32, 64 or 128), -DPI_WARPS (4 or 8 warps of 16 tile rows
// each), -DPI_STAGES (K/V blocks in the shared-memory ring), -DPI_WS (the warp-specialised
// kernel) and -DPI_QO_TMA (whole one-request Q/O tiles by TMA: the short-prefill kernel, which is
// the warp-specialised one with a single consumer warpgroup); work.cuh is prepended by the host
// (src/backend/cuda/compile.rs: Unit and Variant say which combinations exist).
//
// Execution model (the planner's contract, src/plan/work.rs): persistent CTAs take groups from a
// device counter (work stealing, so a CTA that drew short groups takes more) and run each
// group's items back to back, in order. An item is a tile of up to
// PI_BLOCK_M query rows (several requests and GQA heads, listed by row segments) against a list of
// KV chunks; each chunk applies to a contiguous range of the tile's rows. Each warp owns a
// 16-row slice; for a chunk, only the slices that intersect its rows do math. QK^T and PV run on
// tensor cores, softmax is online, in fp32, in base 2. On Hopper (sm_90a, head_dim <= 128) each
// warpgroup (4 warps, 64 rows) issues wgmma with Q and K/V read straight from shared memory;
// elsewhere, and for tiles of <= 16 rows in the plain kernel, each warp issues mma.sync m16n8k16
// with operands through ldmatrix.
//
// Two kernels share these helpers. The plain one (PI_WS=0): every warp also copies K/V blocks
// by cp.async into a ring of PI_STAGES stages and the CTA meets at a barrier per block. The
// warp-specialised one (PI_WS=1, see its section below): a producer warpgroup copies, by TMA
// where K/V rows are consecutive, and the consumer warpgroups only compute.

#ifndef PI_HEAD_DIM
#error "PI_HEAD_DIM must be defined"
#endif
#ifndef PI_BLOCK_N
#define PI_BLOCK_N 64
#endif
#ifndef PI_WARPS
#define PI_WARPS 4
#endif
// K/V stages in the shared-memory ring (>= 2).
#ifndef PI_STAGES
#define PI_STAGES 2
#endif
#define PI_BLOCK_M (16 * PI_WARPS)
#define PI_THREADS (PI_WARPS * 32)

// wgmma (warpgroup tensor-core instructions) exist on sm_90a only; with 64-key blocks (128 in
// the warp-specialised kernel) the accumulators of head_dim <= 128 stay in registers. PACKINFER_KERNEL_DEFINES="-DPI_WGMMA=0" turns
// them off for comparisons.
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL) || PI_HEAD_DIM > 128 || (PI_BLOCK_N != 32 && PI_BLOCK_N != 64 && PI_BLOCK_N != 128)
#undef PI_WGMMA
#define PI_WGMMA 0
#elif !defined(PI_WGMMA)
#define PI_WGMMA 1
#endif
// The pipelined wgmma loop (see the kernel) needs PI_STAGES >= 3: its loads run PI_STAGES - 2
// blocks ahead, since a stage is refilled only once the O += PV that read it is done.
#define PI_WG_PIPELINE (PI_WGMMA && PI_STAGES >= 3)
// The warp-specialised kernel (a producer warpgroup and mbarriers; see packed_attention below):
// the host asks for it with -DPI_WS=1 on sm_90a at head_dim <= 128.
#ifndef PI_WS
#define PI_WS 0
#endif
#if PI_WS && !PI_WGMMA
#error "PI_WS needs the wgmma path (sm_90a, head_dim <= 128, 64-key blocks)"
#endif
#if PI_BF16
#define PI_ETYPE "bf16"
#else
#define PI_ETYPE "f16"
#endif

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
// The same marked first to leave L2 (policy from l2_evict_first), for Q rows, read once. With
// the default policy they (and the O rows, stored likewise) pushed out of L2 the K/V blocks that
// the next tiles of a prompt read again. Marking K/V evict-last on top did not measure
// (docs/performance-log.md#l2-policy).
__device__ __forceinline__ u64 l2_evict_first() {
    u64 policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid, u64 policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0), "l"(policy));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

// Shared-memory tiles (Q, K, V) use the 128-byte swizzle that wgmma's descriptors describe: a
// tile of ROWS rows x PI_HEAD_DIM elements is stored as PI_HEAD_DIM / 64 column blocks, each
// ROWS rows of 128 bytes, and the 16-byte chunk c of row r sits at chunk position c ^ (r % 8)
// (the column blocks start on 1024-byte boundaries, so the hardware's swizzle, which works on
// address bits, sees the same pattern). ldmatrix reads it without bank conflicts as well, so
// the mma.sync path uses the same layout. Returns the element offset of (row, chunk * 8).
template <int ROWS>
__device__ __forceinline__ int swz(int row, int chunk) {
    return (chunk >> 3) * (ROWS * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

#if PI_WGMMA
// A shared-memory matrix descriptor for the 128-byte swizzle: start address, leading and
// stride byte offsets (PTX ISA, "Matrix Descriptor Format"). K-major operands (Q, K) step
// 1024 bytes per 8 rows and ignore the leading offset; the N-major V steps 1024 bytes per 8
// keys and a column block (64 dims) per leading offset. Every operand here has the same upper
// word (the 1024-byte stride and the swizzle mode), so the plain kernels carry and step only the
// lower one (address and leading offset) and wg_full completes it at the instruction, saving
// the 64-bit descriptor arithmetic. The two-warpgroup warp-specialised consumers keep whole
// descriptors: at their 232 registers the lower-word form made ptxas serialise their wgmmas
// (C7512). See docs/performance-log.md#wg-descriptors.
#define PI_WG_DESC_WIDE (PI_WS && PI_WARPS == 8)
#define PI_WG_DESC_UPPER (((u64)(1024 >> 4) << 32) | (1ull << 62))
#if PI_WG_DESC_WIDE
typedef u64 WgDesc;
__device__ __forceinline__ u64 wg_full(u64 d) { return d; }
#else
typedef u32 WgDesc;
__device__ __forceinline__ u64 wg_full(u32 lo) { return lo | PI_WG_DESC_UPPER; }
#endif
__device__ __forceinline__ WgDesc wg_desc(const u16* p, u32 leading_bytes) {
    const u32 lo = ((smem_addr(p) & 0x3FFFF) >> 4) | ((leading_bytes >> 4) << 16);
#if PI_WG_DESC_WIDE
    return lo | PI_WG_DESC_UPPER;
#else
    return lo;
#endif
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are pending (they finish in order).
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
__device__ __forceinline__ void wg_wait_all() { wg_wait<0>(); }
// Keeps the compiler from touching accumulators between an async wgmma and its wait.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
        asm volatile("" : "+f"(r[i][0]), "+f"(r[i][1]), "+f"(r[i][2]), "+f"(r[i][3]) :: "memory");
}
// The same for registers an async wgmma reads (its A operand): pinned after the wait, they stay
// live, so the compiler cannot hand them to other values while the instruction may still read them.
template <int N>
__device__ __forceinline__ void pin(u32 (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
        asm volatile("" : "+r"(r[i][0]), "+r"(r[i][1]), "+r"(r[i][2]), "+r"(r[i][3]) :: "memory");
}
// Whether any thread of this warpgroup says yes (named barrier 1 + warpgroup, 128 threads), so
// the warpgroup takes one branch around its wgmma.
__device__ __forceinline__ bool warpgroup_any(bool v, int wg) {
    u32 r;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, 128, p;\nselp.u32 %0, 1, 0, q;\n}"
                 : "=r"(r) : "r"((u32)v), "r"(wg + 1) : "memory");
    return r != 0;
}
// S (64 rows x 32, 64 or 128 keys, fp32) += Q (shared, K-major) * K^T (shared, K-major), and the first
// k-step, S = Q K^T: its accumulators are outputs only, so the compiler never copies their old
// values around while another wgmma is in flight (ptxas would serialise every wgmma then: warning
// C7515).
__device__ __forceinline__ void wgmma_qk(float (&s)[4][4], WgDesc desc_q, WgDesc desc_k, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}"
                 : "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]), "+f"(s[1][0]), "+f"(s[1][1]), "+f"(s[1][2]), "+f"(s[1][3]), "+f"(s[2][0]), "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]), "+f"(s[3][0]), "+f"(s[3][1]), "+f"(s[3][2]), "+f"(s[3][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_qk_first(float (&s)[4][4], WgDesc desc_q, WgDesc desc_k) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}"
                 : "=f"(s[0][0]), "=f"(s[0][1]), "=f"(s[0][2]), "=f"(s[0][3]), "=f"(s[1][0]), "=f"(s[1][1]), "=f"(s[1][2]), "=f"(s[1][3]), "=f"(s[2][0]), "=f"(s[2][1]), "=f"(s[2][2]), "=f"(s[2][3]), "=f"(s[3][0]), "=f"(s[3][1]), "=f"(s[3][2]), "=f"(s[3][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(0));
}
__device__ __forceinline__ void wgmma_qk(float (&s)[8][4], WgDesc desc_q, WgDesc desc_k, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}"
                 : "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]), "+f"(s[1][0]), "+f"(s[1][1]), "+f"(s[1][2]), "+f"(s[1][3]), "+f"(s[2][0]), "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]), "+f"(s[3][0]), "+f"(s[3][1]), "+f"(s[3][2]), "+f"(s[3][3]), "+f"(s[4][0]), "+f"(s[4][1]), "+f"(s[4][2]), "+f"(s[4][3]), "+f"(s[5][0]), "+f"(s[5][1]), "+f"(s[5][2]), "+f"(s[5][3]), "+f"(s[6][0]), "+f"(s[6][1]), "+f"(s[6][2]), "+f"(s[6][3]), "+f"(s[7][0]), "+f"(s[7][1]), "+f"(s[7][2]), "+f"(s[7][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_qk_first(float (&s)[8][4], WgDesc desc_q, WgDesc desc_k) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}"
                 : "=f"(s[0][0]), "=f"(s[0][1]), "=f"(s[0][2]), "=f"(s[0][3]), "=f"(s[1][0]), "=f"(s[1][1]), "=f"(s[1][2]), "=f"(s[1][3]), "=f"(s[2][0]), "=f"(s[2][1]), "=f"(s[2][2]), "=f"(s[2][3]), "=f"(s[3][0]), "=f"(s[3][1]), "=f"(s[3][2]), "=f"(s[3][3]), "=f"(s[4][0]), "=f"(s[4][1]), "=f"(s[4][2]), "=f"(s[4][3]), "=f"(s[5][0]), "=f"(s[5][1]), "=f"(s[5][2]), "=f"(s[5][3]), "=f"(s[6][0]), "=f"(s[6][1]), "=f"(s[6][2]), "=f"(s[6][3]), "=f"(s[7][0]), "=f"(s[7][1]), "=f"(s[7][2]), "=f"(s[7][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(0));
}
__device__ __forceinline__ void wgmma_qk(float (&s)[16][4], WgDesc desc_q, WgDesc desc_k, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}"
                 : "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]), "+f"(s[1][0]), "+f"(s[1][1]), "+f"(s[1][2]), "+f"(s[1][3]), "+f"(s[2][0]), "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]), "+f"(s[3][0]), "+f"(s[3][1]), "+f"(s[3][2]), "+f"(s[3][3]), "+f"(s[4][0]), "+f"(s[4][1]), "+f"(s[4][2]), "+f"(s[4][3]), "+f"(s[5][0]), "+f"(s[5][1]), "+f"(s[5][2]), "+f"(s[5][3]), "+f"(s[6][0]), "+f"(s[6][1]), "+f"(s[6][2]), "+f"(s[6][3]), "+f"(s[7][0]), "+f"(s[7][1]), "+f"(s[7][2]), "+f"(s[7][3]), "+f"(s[8][0]), "+f"(s[8][1]), "+f"(s[8][2]), "+f"(s[8][3]), "+f"(s[9][0]), "+f"(s[9][1]), "+f"(s[9][2]), "+f"(s[9][3]), "+f"(s[10][0]), "+f"(s[10][1]), "+f"(s[10][2]), "+f"(s[10][3]), "+f"(s[11][0]), "+f"(s[11][1]), "+f"(s[11][2]), "+f"(s[11][3]), "+f"(s[12][0]), "+f"(s[12][1]), "+f"(s[12][2]), "+f"(s[12][3]), "+f"(s[13][0]), "+f"(s[13][1]), "+f"(s[13][2]), "+f"(s[13][3]), "+f"(s[14][0]), "+f"(s[14][1]), "+f"(s[14][2]), "+f"(s[14][3]), "+f"(s[15][0]), "+f"(s[15][1]), "+f"(s[15][2]), "+f"(s[15][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_qk_first(float (&s)[16][4], WgDesc desc_q, WgDesc desc_k) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}"
                 : "=f"(s[0][0]), "=f"(s[0][1]), "=f"(s[0][2]), "=f"(s[0][3]), "=f"(s[1][0]), "=f"(s[1][1]), "=f"(s[1][2]), "=f"(s[1][3]), "=f"(s[2][0]), "=f"(s[2][1]), "=f"(s[2][2]), "=f"(s[2][3]), "=f"(s[3][0]), "=f"(s[3][1]), "=f"(s[3][2]), "=f"(s[3][3]), "=f"(s[4][0]), "=f"(s[4][1]), "=f"(s[4][2]), "=f"(s[4][3]), "=f"(s[5][0]), "=f"(s[5][1]), "=f"(s[5][2]), "=f"(s[5][3]), "=f"(s[6][0]), "=f"(s[6][1]), "=f"(s[6][2]), "=f"(s[6][3]), "=f"(s[7][0]), "=f"(s[7][1]), "=f"(s[7][2]), "=f"(s[7][3]), "=f"(s[8][0]), "=f"(s[8][1]), "=f"(s[8][2]), "=f"(s[8][3]), "=f"(s[9][0]), "=f"(s[9][1]), "=f"(s[9][2]), "=f"(s[9][3]), "=f"(s[10][0]), "=f"(s[10][1]), "=f"(s[10][2]), "=f"(s[10][3]), "=f"(s[11][0]), "=f"(s[11][1]), "=f"(s[11][2]), "=f"(s[11][3]), "=f"(s[12][0]), "=f"(s[12][1]), "=f"(s[12][2]), "=f"(s[12][3]), "=f"(s[13][0]), "=f"(s[13][1]), "=f"(s[13][2]), "=f"(s[13][3]), "=f"(s[14][0]), "=f"(s[14][1]), "=f"(s[14][2]), "=f"(s[14][3]), "=f"(s[15][0]), "=f"(s[15][1]), "=f"(s[15][2]), "=f"(s[15][3])
                 : "l"(wg_full(desc_q)), "l"(wg_full(desc_k)), "r"(0));
}
// O (64 rows x 64 dims, fp32) += P (registers) * V (shared, N-major: the transposed B operand).
__device__ __forceinline__ void wgmma_pv(float (&o)[8][4], const u32 (&a)[4], WgDesc desc_v) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}"
                 : "+f"(o[0][0]), "+f"(o[0][1]), "+f"(o[0][2]), "+f"(o[0][3]), "+f"(o[1][0]), "+f"(o[1][1]), "+f"(o[1][2]), "+f"(o[1][3]), "+f"(o[2][0]), "+f"(o[2][1]), "+f"(o[2][2]), "+f"(o[2][3]), "+f"(o[3][0]), "+f"(o[3][1]), "+f"(o[3][2]), "+f"(o[3][3]), "+f"(o[4][0]), "+f"(o[4][1]), "+f"(o[4][2]), "+f"(o[4][3]), "+f"(o[5][0]), "+f"(o[5][1]), "+f"(o[5][2]), "+f"(o[5][3]), "+f"(o[6][0]), "+f"(o[6][1]), "+f"(o[6][2]), "+f"(o[6][3]), "+f"(o[7][0]), "+f"(o[7][1]), "+f"(o[7][2]), "+f"(o[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(wg_full(desc_v)), "r"(1));
}
// O (64 rows x 128 dims, fp32) += P (registers) * V (shared, N-major: the transposed B operand).
__device__ __forceinline__ void wgmma_pv(float (&o)[16][4], const u32 (&a)[4], WgDesc desc_v) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PI_ETYPE "." PI_ETYPE " "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}"
                 : "+f"(o[0][0]), "+f"(o[0][1]), "+f"(o[0][2]), "+f"(o[0][3]), "+f"(o[1][0]), "+f"(o[1][1]), "+f"(o[1][2]), "+f"(o[1][3]), "+f"(o[2][0]), "+f"(o[2][1]), "+f"(o[2][2]), "+f"(o[2][3]), "+f"(o[3][0]), "+f"(o[3][1]), "+f"(o[3][2]), "+f"(o[3][3]), "+f"(o[4][0]), "+f"(o[4][1]), "+f"(o[4][2]), "+f"(o[4][3]), "+f"(o[5][0]), "+f"(o[5][1]), "+f"(o[5][2]), "+f"(o[5][3]), "+f"(o[6][0]), "+f"(o[6][1]), "+f"(o[6][2]), "+f"(o[6][3]), "+f"(o[7][0]), "+f"(o[7][1]), "+f"(o[7][2]), "+f"(o[7][3]), "+f"(o[8][0]), "+f"(o[8][1]), "+f"(o[8][2]), "+f"(o[8][3]), "+f"(o[9][0]), "+f"(o[9][1]), "+f"(o[9][2]), "+f"(o[9][3]), "+f"(o[10][0]), "+f"(o[10][1]), "+f"(o[10][2]), "+f"(o[10][3]), "+f"(o[11][0]), "+f"(o[11][1]), "+f"(o[11][2]), "+f"(o[11][3]), "+f"(o[12][0]), "+f"(o[12][1]), "+f"(o[12][2]), "+f"(o[12][3]), "+f"(o[13][0]), "+f"(o[13][1]), "+f"(o[13][2]), "+f"(o[13][3]), "+f"(o[14][0]), "+f"(o[14][1]), "+f"(o[14][2]), "+f"(o[14][3]), "+f"(o[15][0]), "+f"(o[15][1]), "+f"(o[15][2]), "+f"(o[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(wg_full(desc_v)), "r"(1));
}

#endif

// Shared memory written by the generic proxy (cp.async, stores) and read next by wgmma.
__device__ __forceinline__ void fence_for_tensor_cores() {
#if PI_WGMMA
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// ---- mbarriers and TMA (sm_90) ---------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PI_TMA 1
__device__ __forceinline__ void mbar_init(u64* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(b)), "r"(count) : "memory");
}
// One arrival (release: this thread's earlier shared-memory writes are seen by the waiters).
__device__ __forceinline__ void mbar_arrive(u64* b) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" :: "r"(smem_addr(b)) : "memory");
}
// One arrival once every cp.async this thread has issued so far has landed.
__device__ __forceinline__ void mbar_arrive_on_copies(u64* b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" :: "r"(smem_addr(b)) : "memory");
}
// Waits for the completion of the barrier's phase of this parity (a fresh barrier counts its
// phase before the first as complete, so producers start with parity 1 on "empty" barriers).
__device__ __forceinline__ void mbar_wait(u64* b, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done) : "r"(smem_addr(b)), "r"(parity) : "memory");
    } while (!done);
}
// One arrival that also expects `bytes` more to land (by TMA) before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect(u64* b, u32 bytes) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}"
                 :: "r"(smem_addr(b)), "r"(bytes) : "memory");
}
// `bytes` more to land (by TMA) before the current phase completes, without an arrival.
__device__ __forceinline__ void mbar_expect(u64* b, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(b)), "r"(bytes) : "memory");
}
// The box of a 3-D tensor map at coordinates (c0, c1, c2) into dst, completing on `bar`. Every
// map here is over (dims, heads, rows) in boxes of 64 dims, 128-byte swizzled: swz's layout of
// one 64-dim column block.
__device__ __forceinline__ void tma_load(u16* dst, const TensorMap* map, int c0, int c1, int c2, u64* bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
                 :: "r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
                 : "memory");
}
// The same with an L2 policy (l2_evict_first).
__device__ __forceinline__ void tma_load(u16* dst, const TensorMap* map, int c0, int c1, int c2, u64* bar, u64 policy) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4}], [%5], %6;"
                 :: "r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)), "l"(policy)
                 : "memory");
}
// src's box to the tensor at (c0, c1, c2), in this thread's bulk group (bulk_commit, bulk_wait_read).
__device__ __forceinline__ void tma_store(const TensorMap* map, const u16* src, int c0, int c1, int c2, u64 policy) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group.L2::cache_hint [%0, {%2, %3, %4}], [%1], %5;"
                 :: "l"(reinterpret_cast<u64>(map)), "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "l"(policy)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's bulk stores have read their shared memory (it may be written again).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

#else
#define PI_TMA 0
#endif

// ---- shared memory --------------------------------------------------------------------------

struct RowInfo {
    i64 q_offset;  // element offset of the row's query vector (token, head)
    u32 token, head;
    u32 key_limit;  // keys >= key_limit of the row's request are masked; 0 for rows past num_rows
    u32 pad;
};

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
    static constexpr int vecs = PI_HEAD_DIM / 8;
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
#pragma unroll
            for (int i = 0; i < N; ++i) cp_async16(&dst[i][swz<PI_BLOCK_N>(n, ch)], src[i] + off, valid);
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
        constexpr int VECS = PI_HEAD_DIM / 8, ROWS_PER_PASS = NT / VECS;
        static_assert(NT % VECS == 0 && PI_BLOCK_M % ROWS_PER_PASS == 0, "Q copy shape");
        const u64 once = l2_evict_first();
        const int ch = t % VECS;
#pragma unroll UNROLL
        for (int j = 0; j < PI_BLOCK_M / ROWS_PER_PASS; ++j) {
            const int r = t / VECS + j * ROWS_PER_PASS;
            cp_async16(&dst[swz<PI_BLOCK_M>(r, ch)], qb + rows[r].q_offset + ch * 8, (u32)r < num_rows, once);
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
__device__ __forceinline__ RowInfo row_info(const KernelParams& p, const WorkItem& item, const SegmentInfo* segs,
                                            u32 seg_count, u32 group, u32 r) {
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
        ri.key_limit = seg.limit0 + seg.step * q;
        ri.q_offset = (i64)ri.token * p.q_stride_token + (i64)ri.head * p.q_stride_head;
    }
    return ri;
}

// Q fragments stay in registers for the whole item where they fit next to the accumulators
// (not in wgmma builds, where only the split path would use them: the registers go to the
// wgmma accumulators, and the split path reads Q through ldmatrix each time).
#ifndef PI_Q_REGS
#define PI_Q_REGS (PI_HEAD_DIM <= 128 && !PI_WGMMA)
#endif
#define PI_QF (PI_Q_REGS ? PI_HEAD_DIM / 16 : 1)
// A tile of at most 16 rows (a decode, a few packed short rows) has one warp's worth of rows;
// then the warps split each key block instead (warp w takes 16 keys), and combine at the end.
#define PI_SPLIT_WARPS (PI_BLOCK_N / 16)

#ifndef PI_RESCALE_SLACK
#define PI_RESCALE_SLACK 8.0f
#endif
// Whether any row of the warp needs its output rescaled (softmax_scores's alpha != 1).
__device__ __forceinline__ bool needs_rescale(float alpha0, float alpha1) {
    return __any_sync(0xffffffffu, alpha0 != 1.f || alpha1 != 1.f);
}

// Masks (unless every key of the block is visible to both rows) the keys outside [key_lo, end0)
// and [key_lo, end1), scales and folds a block's scores into the online softmax state: S
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
                                               u32 end1, bool all_visible, float scale, float& m0, float& m1,
                                               float& l0, float& l1, float& alpha0, float& alpha1) {
    const int col = 2 * (lane % 4);
    const u32 base = KEY_LO ? key_first - key_lo : key_first;
    const u32 lim0 = !KEY_LO ? end0 : end0 > key_lo ? end0 - key_lo : 0;
    const u32 lim1 = !KEY_LO ? end1 : end1 > key_lo ? end1 - key_lo : 0;
    // The maximum is taken over the raw scores (scale > 0 keeps the order); the scale is folded
    // into the exponent's FMA.
    float bm0 = PI_NEG_INF, bm1 = PI_NEG_INF;
    if (all_visible) {
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
                const u32 key = base + 8 * j + col + e;
                if (key >= lim0) s[j][e] = PI_NEG_INF;
                if (key >= lim1) s[j][2 + e] = PI_NEG_INF;
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
                                               bool all_visible, float scale, float& m0, float& m1, float& l0,
                                               float& l1, float (&acc)[PI_HEAD_DIM / 8][4]) {
    float alpha0, alpha1;
    softmax_scores<NT>(s, lane, key_first, key_first, end0, end1, all_visible, scale, m0, m1, l0, l1, alpha0, alpha1);
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
        constexpr int ROW_LANES = CHUNKS < 32 ? CHUNKS : 32;      // lanes per row, a chunk each
        static_assert(CHUNKS == ROW_LANES, "a lane per chunk (head_dim <= 256)");
#pragma unroll
        for (int i = 0; i < 16 * ROW_LANES / 32; ++i) {
            const int r = slice * 16 + i * (32 / ROW_LANES) + lane / ROW_LANES, c = lane % ROW_LANES;
            if ((u32)r < item.num_rows) {
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

// Whole one-request Q and O tiles by TMA: the short-prefill kernel (-DPI_QO_TMA=1 from the
// host; the warp-specialised kernel with one consumer warpgroup).
#if !defined(PI_QO_TMA) || !PI_TMA
#undef PI_QO_TMA
#define PI_QO_TMA 0
#endif
// Whether item w is a whole tile of one request's consecutive tokens (one row segment, every
// row), which a TMA box of q_map / o_map covers, and `flag` allows it.
__device__ __forceinline__ bool one_request_tile(const KernelParams& p, const WorkItem& w, u32 flag) {
    return (p.flags & flag) && w.seg_count == 1 && w.num_rows == PI_BLOCK_M;
}

#if PI_WS
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
// Block `seq` of the K/V stream lives in stage seq % PI_STAGES; its uses of that stage alternate parity.
__device__ __forceinline__ u32 ring_stage(u32 seq) { return seq % PI_STAGES; }
__device__ __forceinline__ u32 ring_parity(u32 seq) { return (seq / PI_STAGES) & 1; }
// Item n lives in slot n % 2; likewise.
__device__ __forceinline__ u32 slot_parity(u32 n) { return (n >> 1) & 1; }

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
                sm.rows[slot][r] = row_info(p, item, sm.segs, seg_count, hdr.group_size, r);
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
            // The pipelined loop of the non-specialised kernel (see there), with waits on the
            // producer's barriers instead of CTA barriers, and each stage released as soon as
            // its wgmma has finished reading it.
            // Whether warpgroup w has rows in the chunk (the tile's rows 64w.. that are below
            // num_rows, from a 16-row slice on): every consumer thread computes the same answer.
            auto in_chunk = [&](u32 w) {
                const u32 lo = max(64 * w, ch.row_begin), hi = min(64 * w + 64, ch.row_end);
                return lo < hi && lo / 16 * 16 < item.num_rows;
            };
            if (in_chunk(wg)) {
                float s_a[PI_BLOCK_N / 8][4], s_b[PI_BLOCK_N / 8][4];
                u32 pf[PI_BLOCK_N / 16][4];
                float alpha0, alpha1;  // the output's rescale before block b's P V
                auto scores = [&](float (&sc)[PI_BLOCK_N / 8][4], u32 b) {
                    const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                    // (A block visible in full is whole, so its stage starts at key0.)
                    const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1);
                    const u32 first = row_box(p, ch) ? box_key(ch, key0) : key0;
                    softmax_scores<PI_BLOCK_N / 8, true>(sc, lane, first, key0, end0, end1, all_visible, scale, m0, m1, l0, l1, alpha0, alpha1);
                };
                // On entry P(b) is in pf and O has no wgmma in flight; on exit the same for b + 1.
                auto step = [&](float (&sn)[PI_BLOCK_N / 8][4], u32 b) {
                    ready(sm.k_full, b + 1);
                    wg_qk_issue(sn, dq, sm.k[ring_stage(seq + b + 1)]);
                    if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
                    ready(sm.v_full, b);
                    wg_pv_issue(acc, pf, sm.v[ring_stage(seq + b)]);
                    wg_wait<1>();  // S(b + 1) done; O += P(b) V(b) may run on
                    pin(sn);
                    release(sm.k_empty, b + 1);
                    scores(sn, b + 1);
                    wg_wait<0>();  // O += P(b) V(b) done
                    pin(acc);
                    pin(pf);
                    release(sm.v_empty, b);
                    pack_p(pf, sn);
                };
                ready(sm.k_full, 0);
                wg_qk_issue(s_a, dq, sm.k[ring_stage(seq)]);
                wg_wait<0>();
                pin(s_a);
                release(sm.k_empty, 0);
                scores(s_a, 0);
                pack_p(pf, s_a);
                u32 b = 0;
                for (; b + 2 < nblocks; b += 2) {
                    step(s_b, b);
                    step(s_a, b + 1);
                }
                if (b + 1 < nblocks) step(s_b, b++);
                if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
                ready(sm.v_full, b);
                wg_pv_issue(acc, pf, sm.v[ring_stage(seq + b)]);
                wg_wait<0>();
                pin(acc);
                pin(pf);
                release(sm.v_empty, b);
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

#else  // !PI_WS
struct Smem {
    u16 q[PI_BLOCK_M * PI_HEAD_DIM];  // swizzled (swz); every tile a multiple of 1024 bytes
    u16 k[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM];
    u16 v[PI_STAGES][PI_BLOCK_N * PI_HEAD_DIM];
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
static_assert(sizeof(SplitState) <= sizeof(((Smem*)0)->k) + sizeof(((Smem*)0)->v), "split state must fit the K/V stages");

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
            for (int r = tid; r < PI_BLOCK_M; r += PI_THREADS) sm.rows[r] = row_info(p, item, sm.segs, seg_count, group, r);
            __syncthreads();
            // Q tile; rows past num_rows are zeros. The next item's copy lands with it.
            copy_q<PI_THREADS, PI_BLOCK_M * PI_HEAD_DIM / 8 / PI_THREADS>(p, sm.q, sm.rows, item.num_rows, tid);
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
                        u16* const dst[2] = {sm.k[b % PI_STAGES], sm.v[b % PI_STAGES]};
                        const u16* const src[2] = {(const u16*)p.k, (const u16*)p.v};
                        copy_kv<PI_THREADS, 2>(p, dst, src, ch.page_start, item.kv_head, key0, ch.key_end, pm, tid, page);
                    }
                    cp_async_commit();  // one group per block, empty past the end
                };
#if PI_WG_PIPELINE
                if (!split) {
                    // Software-pipelined per warpgroup (the order FlashAttention-3 uses): while
                    // S(b + 1) = Q K(b + 1)^T runs, the output is rescaled and O += P(b) V(b) issued;
                    // while that runs, the softmax of block b + 1 turns S(b + 1) into P(b + 1). The
                    // wgmma groups and waits follow one fixed pattern with no branch around an issue,
                    // and the output is touched only when no wgmma writing it is in flight, so ptxas
                    // can keep them asynchronous (otherwise it serialises every wgmma: warning C7515).
                    // A warpgroup none of whose rows belong to the chunk skips it; one that does
                    // computes every block of it (the masks zero what its rows cannot see; under a
                    // causal mask that is at most the last block).
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
                        float s_a[PI_BLOCK_N / 8][4], s_b[PI_BLOCK_N / 8][4];
                        u32 pf[PI_BLOCK_N / 16][4];
                        float alpha0, alpha1;  // the output's rescale before block b's P V
                        auto scores = [&](float (&sc)[PI_BLOCK_N / 8][4], u32 b) {
                            const u32 key0 = ch.key_begin + b * PI_BLOCK_N;
                            const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1);
                            softmax_scores<PI_BLOCK_N / 8>(sc, lane, key0, key0, end0, end1, all_visible, scale, m0, m1, l0, l1, alpha0, alpha1);
                        };
                        // On entry P(b) is in pf and O has no wgmma in flight; on exit the same for b + 1.
                        auto step = [&](float (&sn)[PI_BLOCK_N / 8][4], u32 b) {
                            block_landed();
                            wg_qk_issue(sn, dq, sm.k[(b + 1) % PI_STAGES]);
                            if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
                            wg_pv_issue(acc, pf, sm.v[b % PI_STAGES]);
                            refill(b);  // the copies are issued while the tensor cores work
                            wg_wait<1>();  // S(b + 1) done; O += P(b) V(b) may run on
                            pin(sn);
                            scores(sn, b + 1);
                            wg_wait<0>();  // O += P(b) V(b) done
                            pin(acc);
                            pin(pf);
                            pack_p(pf, sn);
                        };
                        wg_qk_issue(s_a, dq, sm.k[0]);
                        wg_wait<0>();
                        pin(s_a);
                        scores(s_a, 0);
                        pack_p(pf, s_a);
                        u32 b = 0;
                        for (; b + 2 < nblocks; b += 2) {
                            step(s_b, b);
                            step(s_a, b + 1);
                        }
                        if (b + 1 < nblocks) step(s_b, b++);
                        if (needs_rescale(alpha0, alpha1)) rescale_output(acc, alpha0, alpha1);
                        wg_pv_issue(acc, pf, sm.v[b % PI_STAGES]);
                        wg_wait<0>();
                        pin(acc);
                        pin(pf);
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
                    const int stage = b % PI_STAGES;
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
                            const bool all_visible = __all_sync(0xffffffffu, key0 + PI_BLOCK_N <= end0 && key0 + PI_BLOCK_N <= end1);
                            attend_wg(sm.q, warp / 4, lane, sm.k[stage], sm.v[stage], key0, end0, end1, all_visible, scale,
                                      m0, m1, l0, l1, acc);
                        }
                    } else
#endif
                    if (any) {
                        const u32 width = split ? 16 : PI_BLOCK_N;
                        const bool all_visible = __all_sync(0xffffffffu, first + width <= end0 && first + width <= end1);
                        if (split)
                            attend<2>(sm.q, slice, lane, qf, sm.k[stage], sm.v[stage], 16 * warp, first, end0, end1,
                                      all_visible, scale, m0, m1, l0, l1, acc);
                        else
                            attend<PI_BLOCK_N / 8>(sm.q, slice, lane, qf, sm.k[stage], sm.v[stage], 0, key0, end0, end1,
                                                   all_visible, scale, m0, m1, l0, l1, acc);
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
            // Final rows leave through the Q tile once every warp is done reading it (see store_rows).
            const bool staged = item.partial_slot == PI_FINAL_OUTPUT && (p.flags & PI_FLAG_O_VEC);
            if (staged && !split) __syncthreads();
            if (!split || warp == 0)
                store_rows(p, hdr, item, sm.rows, r0, r1, lane, acc, m0, m1, l0, l1, staged ? sm.q : nullptr, slice);
            __syncthreads();  // the row table, Q tile and split state are rewritten by the next item
        }
    }
}

#endif  // !PI_WS

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
