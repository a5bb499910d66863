// KV-cache maintenance kernels: appending new tokens' K/V into pages, and copying whole pages
// (the relayout into group-contiguous order, copy-on-write of shared pages). They move 16-bit
// elements (fp16 or bf16 alike) and take the cache's layout as element strides, like the
// attention kernel.

#include "work.cuh"

// Token t's K/V (k_new/v_new: [num_tokens, num_kv_heads, head_dim], contiguous) go to cache slot
// slots[t] = page * page_size + offset; a negative slot means "skip" (padding).
extern "C" __global__ void append_kv(u16* k, u16* v, i64 stride_page, i64 stride_token, i64 stride_head,
                                     i64 stride_dim, const i64* slots, const u16* k_new, const u16* v_new,
                                     u32 num_tokens, u32 num_kv_heads, u32 head_dim, u32 page_size) {
    const u64 total = (u64)num_tokens * num_kv_heads * head_dim;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u32 d = i % head_dim;
        const u32 h = (i / head_dim) % num_kv_heads;
        const u32 t = i / ((u64)head_dim * num_kv_heads);
        const i64 slot = slots[t];
        if (slot < 0) continue;
        const i64 off = (slot / page_size) * stride_page + (slot % page_size) * stride_token + (i64)h * stride_head
                      + (i64)d * stride_dim;
        k[off] = k_new[i];
        v[off] = v_new[i];
    }
}

// For each pair (pairs[2i] = source page, pairs[2i+1] = destination page) and each layer, copies
// every (token, head, dim) element of K and V. Layers are `layer_stride` elements apart.
extern "C" __global__ void copy_pages(u16* k, u16* v, i64 stride_page, i64 stride_token, i64 stride_head,
                                      i64 stride_dim, const int* pairs, u32 num_pairs, u32 page_size,
                                      u32 num_kv_heads, u32 head_dim, u32 num_layers, i64 layer_stride) {
    const u64 per_page = (u64)page_size * num_kv_heads * head_dim;
    const u64 total = per_page * num_pairs * num_layers;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 e = i % per_page;
        const u64 pl = i / per_page;
        const u32 pair = pl % num_pairs, layer = pl / num_pairs;
        const u32 d = e % head_dim;
        const u32 h = (e / head_dim) % num_kv_heads;
        const u32 t = e / ((u64)head_dim * num_kv_heads);
        const i64 inner = (i64)t * stride_token + (i64)h * stride_head + (i64)d * stride_dim + layer * layer_stride;
        const i64 src = pairs[2 * pair] * stride_page + inner;
        const i64 dst = pairs[2 * pair + 1] * stride_page + inner;
        k[dst] = k[src];
        v[dst] = v[src];
    }
}

// The KV pool's byte-level moves (`KvMemory` on the CUDA backend). The pool addresses its one
// allocation by byte offsets, so these kernels know nothing of heads or layers. `vec16` is 1 when
// the host checked that every address, stride and size is a multiple of 16 bytes: then each
// thread moves 16-byte vectors (a bf16 row of 8 heads x 128 dims is 128 of them), else bytes.

struct alignas(16) Bytes16 {
    u32 w[4];
};

// Row i (`row_bytes` bytes at src + i * src_stride) goes to base + dst_offsets[i].
extern "C" __global__ void scatter_rows(unsigned char* base, const unsigned char* src, u64 src_stride, u64 row_bytes,
                                        const u64* dst_offsets, u32 num_rows, u32 vec16) {
    const u64 unit = vec16 ? 16 : 1;
    const u64 per_row = row_bytes / unit;
    const u64 total = per_row * num_rows;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 row = i / per_row, at = (i % per_row) * unit;
        const unsigned char* from = src + row * src_stride + at;
        unsigned char* to = base + dst_offsets[row] + at;
        if (vec16) {
            *reinterpret_cast<Bytes16*>(to) = *reinterpret_cast<const Bytes16*>(from);
        } else {
            *to = *from;
        }
    }
}

// For each pair (pairs[2i] = source offset, pairs[2i+1] = destination offset), copies `bytes`
// bytes inside the allocation. Destinations overlap no source (the pool copies into free pages).
extern "C" __global__ void copy_ranges(unsigned char* base, const u64* pairs, u32 num_pairs, u64 bytes, u32 vec16) {
    const u64 unit = vec16 ? 16 : 1;
    const u64 per_pair = bytes / unit;
    const u64 total = per_pair * num_pairs;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 p = i / per_pair, at = (i % per_pair) * unit;
        const unsigned char* from = base + pairs[2 * p] + at;
        unsigned char* to = base + pairs[2 * p + 1] + at;
        if (vec16) {
            *reinterpret_cast<Bytes16*>(to) = *reinterpret_cast<const Bytes16*>(from);
        } else {
            *to = *from;
        }
    }
}

// ---- fp8 e4m3 pools: the write conversion --------------------------------------------------

// The e4m3 code nearest to x, ties to even; beyond ±448 (infinities included) ±448; NaN the NaN
// code of its sign: src/fp8.rs's f32_to_e4m3 step for step, so the two agree bit for bit
// (cvt.rn.satfinite.e4m3x2 exists from sm_89 only).
__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    const u32 bits = __float_as_uint(x);
    const u32 sign = (bits >> 24) & 0x80u;
    const u32 abits = bits & 0x7fffffffu;
    if (abits > 0x7f800000u) return (unsigned char)(sign | 0x7fu);  // NaN
    const float a = __uint_as_float(abits);
    if (a >= 448.f) return (unsigned char)(sign | 0x7eu);
    // The binade of a, at least the lowest normal one (2^-6), whose quantum 2^(e - 3) also spaces
    // the subnormals; a times 1 / quantum (a power of two: exact) rounded to an even integer.
    int e = (int)(abits >> 23) - 127;
    if (e < -6) e = -6;
    const float inv_quantum = __uint_as_float((u32)(127 - (e - 3)) << 23);
    float steps_f;
    asm("cvt.rni.f32.f32 %0, %1;" : "=f"(steps_f) : "f"(a * inv_quantum));
    u32 steps = (u32)steps_f;
    u32 code;
    if (e == -6 && steps < 8) {
        code = steps;  // subnormal (or zero)
    } else {
        if (steps == 16) {  // the next binade's first value
            e += 1;
            steps = 8;
        }
        code = ((u32)(e + 7) << 3) | (steps - 8);
    }
    return (unsigned char)(sign | code);
}

// Element e of a source row of dtype src_dtype (0 f16, 1 bf16, 2 f32), exactly as f32.
__device__ __forceinline__ float load_elem(const unsigned char* row, u32 e, u32 src_dtype) {
    if (src_dtype == 2) return *reinterpret_cast<const float*>(row + 4 * (u64)e);
    const u16 h = *reinterpret_cast<const u16*>(row + 2 * (u64)e);
    if (src_dtype == 1) return __uint_as_float((u32)h << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Row i (num_kv_heads x head_dim elements of src_dtype at src + i * src_stride) goes to
// base + dst_offsets[i] as e4m3(x / scale(h)) for element x of head h, a byte each; the
// num_kv_heads f32 scales are at base + scales_offset (read bytewise: the pool puts them after
// its pages, where 4-byte alignment is not promised).
extern "C" __global__ void scatter_rows_fp8(unsigned char* base, const unsigned char* src, u64 src_stride,
                                            const u64* dst_offsets, u32 num_rows, u32 num_kv_heads, u32 head_dim,
                                            u64 scales_offset, u32 src_dtype) {
    const u64 row_elems = (u64)num_kv_heads * head_dim;
    const u64 total = row_elems * num_rows;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 row = i / row_elems;
        const u32 e = (u32)(i % row_elems);
        const unsigned char* s = base + scales_offset + 4 * (u64)(e / head_dim);
        const float scale = __uint_as_float((u32)s[0] | (u32)s[1] << 8 | (u32)s[2] << 16 | (u32)s[3] << 24);
        const float x = load_elem(src + row * src_stride, e, src_dtype);
        base[dst_offsets[row] + e] = f32_to_e4m3(x / scale);
    }
}
