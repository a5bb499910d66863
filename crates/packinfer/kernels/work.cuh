// The planner's work list as the kernels read it. Mirrors src/plan/work.rs byte for byte
// (#[repr(C)] there); tests/kernels_compile.rs checks sizes and offsets against the Rust side.
// NVRTC compiles these sources with no include path: the host hands it this file and the other
// kernel headers by name (src/backend/cuda/compile.rs), so nothing here includes a system header.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

#define PI_FINAL_OUTPUT 0xffffffffu

struct WorkItem {
    u32 kv_head;
    u32 seg_begin, seg_count;
    u32 chunk_begin, chunk_count;
    u32 num_rows;
    u32 partial_slot;
    u32 group;
};

// The plan's row segments and KV chunks arrive resolved against their requests (the host does
// it when it uploads a plan), so a tile's first K/V copy waits on one read less.
// A row segment: row r of it (r >= row_begin) is query token token0 + (r - row_begin) / group,
// which sees keys below limit0 + step * ((r - row_begin) / group). In a plan with a sliding
// window that value is the query's position + 1 (step 1) whether or not the plan is causal:
// row_keys (mask.cuh) derives the row's window and limit from it.
struct SegmentInfo {
    u32 row_begin, token0, limit0, step;
};

// A KV chunk: keys [key_begin, key_end) of the request whose page list starts at page_start,
// for tile rows [row_begin, row_end). Where the keys sit in consecutive cache rows (row = page *
// page_size + slot), row0 is the first key's row (the host finds it when it uploads a plan), so
// kernels over a cache with a row view (PI_FLAG_KV_ROWS) read no page numbers; else PI_NO_ROW.
struct KvRange {
    u32 page_start;
    u32 key_begin, key_end;
    u32 row_begin, row_end;
    u32 row0;
};
#define PI_NO_ROW 0xffffffffu

struct MergeRow {
    u32 q_token, qo_head;
    u32 slot_begin, slot_count;
};

// Counts and shape of the plan currently uploaded into a launch's fixed-capacity buffers. The
// kernels read these from device memory, so a graph captured once replays any plan that fits.
// Mirrors PlanHeader in src/backend/cuda/launch.rs.
struct PlanHeader {
    u32 num_items, num_groups, num_merges, num_slots;
    u32 group_size, page_size, causal;
    u32 window_left;      // PI_NO_WINDOW, or the sliding window (mask.cuh)
    float sm_scale_log2;  // sm_scale * log2(e): softmax runs in base 2
    u32 reserved2[3];
};

// A TMA descriptor (CUtensorMap), encoded on the host; opaque here.
struct __align__(64) TensorMap {
    u64 opaque[16];
};

// Everything one attention or merge launch reads, passed by value. Mirrors KernelParams in
// src/backend/cuda/launch.rs. Strides are in elements.
struct KernelParams {
    const PlanHeader* header;
    const WorkItem* items;
    const SegmentInfo* segments;
    const KvRange* chunks;
    const int* pages;
    const u32* group_offsets;  // [num_groups + 1]: group g's items are items[off[g] .. off[g+1]]
    const MergeRow* merges;
    const u32* merge_slots;
    const void* q;
    i64 q_stride_token, q_stride_head;
    const void* k;
    const void* v;
    i64 kv_stride_page, kv_stride_token, kv_stride_head, kv_stride_dim;
    void* o;
    i64 o_stride_token, o_stride_head;
    float* lse;      // may be null
    float* scratch;  // [num_slots * head_dim] partial rows, then [num_slots] partial LSEs
    u32* group_counter;  // next group to take; 0 before attention, reset to 0 by the merge kernel
    u32 flags;       // PI_FLAG_*
    u32 num_qo_heads;
    // The logit soft-cap of this run (soft_cap in mask.cuh): 2 log2(e) sm_scale / cap and
    // cap / sm_scale; cap_in 0 without one. Per run, so each layer may have its own.
    float softcap_in, softcap_out;
    // An fp8 cache's scales (read by the PI_KV_FP8 kernel only): K/V element = code x the
    // per-tensor scale x the KV head's entry of the per-head array (null: none). Per run.
    float k_scale, v_scale;
    const float* k_head_scales;
    const float* v_head_scales;
    // The plan's custom mask (mask.cuh; read by the PI_CUSTOM_MASK kernel only), or null without
    // one: its bits, and per query token of the step the bit of (that query, key 0); key k of the
    // token's request is bit mask_bit0[token] + k.
    const unsigned char* mask;
    const u32* mask_bit0;
    u32 reserved[4];  // keeps the TMA maps 64-byte aligned with no padding
    // The K and V caches as 3-D tensors (head_dim, KV heads, cache rows = page * page_size + slot)
    // with 128-byte-swizzled boxes of 64 dims x 1 head x block_n rows; set with PI_FLAG_KV_TMA.
    TensorMap k_map, v_map;
    // Q and O as 3-D tensors (head_dim, query heads, tokens) with 128-byte-swizzled boxes of 64
    // dims x group heads x (tile rows / group) tokens: a tile of one request's consecutive tokens
    // (all of a KV head's query heads each); set with PI_FLAG_Q_TMA / PI_FLAG_O_TMA.
    TensorMap q_map, o_map;
};

// Q rows (base and strides) allow 16-byte loads.
#define PI_FLAG_Q_VEC 1u
// K/V (bases and strides, dim stride 1) allow 16-byte loads.
#define PI_FLAG_KV_VEC 2u
// k_map and v_map are valid (the warp-specialised kernel copies runs of consecutive rows by TMA).
#define PI_FLAG_KV_TMA 4u
// O rows (base and strides) allow 16-byte stores.
#define PI_FLAG_O_VEC 8u
// The K/V caches have a row view (row = page * page_size + slot, one stride) and 16-byte loads:
// chunks with a row0 are addressed by row.
#define PI_FLAG_KV_ROWS 16u
// q_map / o_map are valid (the plain kernels on sm_90 move whole single-request tiles by TMA).
#define PI_FLAG_Q_TMA 32u
#define PI_FLAG_O_TMA 64u
