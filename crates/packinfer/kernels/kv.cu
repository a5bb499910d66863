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
