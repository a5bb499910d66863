// Inline-PTX wrappers of the attention kernels: element conversions, ldmatrix and mma.sync,
// cp.async, wgmma, mbarriers and TMA.
#pragma once
#include "config.cuh"
#include "work.cuh"

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

#if PI_KV_FP8
// Two fp8 e4m3 codes (bits 0-7: the first element, 8-15: the second) as two elements of the
// kernel's 16-bit type, exactly (every e4m3 value is an f16 and a bf16; NaN stays NaN).
__device__ __forceinline__ u32 e4m3x2_to_elem2(u32 x) {
    u32 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{\n .reg .b16 c;\n cvt.u16.u32 c, %1;\n cvt.rn.f16x2.e4m3x2 %0, c;\n}" : "=r"(h) : "r"(x));
#else
    // No conversion instruction before sm_89: the code's exponent and mantissa placed as an
    // f16's ((code & 0x7f) << 7) are its value times 2^-8, subnormals included, so a multiply by
    // 256 (exact) finishes it; then the sign, and the NaN codes (S.1111.111), which would be 480.
    h = ((x & 0x7fu) << 7) | ((x & 0x7f00u) << 15);
    asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h) : "r"(0x5c005c00u));
    h |= ((x & 0x80u) << 8) | ((x & 0x8000u) << 16);
    if ((x & 0x7fu) == 0x7fu) h |= 0x7fffu;
    if ((x & 0x7f00u) == 0x7f00u) h |= 0x7fff0000u;
#endif
#if PI_BF16
    // f16 -> f32 (exact), then bf16 by truncation (exact: e4m3 values have 4 significant bits).
    u32 lo, hi;
    asm("{\n .reg .b16 l, h;\n .reg .f32 a, b;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 a, l;\n cvt.f32.f16 b, h;\n"
        " mov.b32 %0, a;\n mov.b32 %1, b;\n}"
        : "=r"(lo), "=r"(hi) : "r"(h));
    return (lo >> 16) | (hi & 0xffff0000u);
#else
    return h;
#endif
}
#endif

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

#if PI_TMA
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
#endif
