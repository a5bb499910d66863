// What a score goes through besides the causal mask: the sliding window (each row's first
// visible key) and the logit soft-cap. Kept in one header so the masks live in one place.
#pragma once
#include "ptx.cuh"

// A tile row: its query (token, head) and the keys it sees (the tiles' row table, tile.cuh).
struct RowInfo {
    i64 q_offset;  // element offset of the row's query vector (token, head)
    u32 token, head;
    u32 key_limit;  // keys >= key_limit of the row's request are masked; 0 for rows past num_rows
    u32 key_start;  // keys < key_start are masked too (the sliding window; 0 without one)
};

// PlanHeader::window_left when the plan has no sliding window.
#define PI_NO_WINDOW 0xffffffffu

// A row's visible keys [key_start, key_limit) from its resolved segment value `raw` (limit0 +
// step * q, work.cuh). Without a window, raw is the key limit and every key from 0 is visible.
// With one, raw is the query's position + 1 (the causal limit, whether or not the plan is
// causal) and the window starts window_left keys before the position; a non-causal row's end is
// its chunks' ends (no chunk reads past its request's keys), so its limit is unbounded.
__device__ __forceinline__ void row_keys(u32 raw, u32 window_left, bool causal, u32& key_start, u32& key_limit) {
    if (window_left == PI_NO_WINDOW) {
        key_start = 0;
        key_limit = raw;
    } else {
        const long long first = (long long)(int)raw - 1 - (long long)window_left;
        key_start = first > 0 ? (u32)first : 0u;
        key_limit = causal ? raw : 0xffffffffu;
    }
}

// Whether a custom mask lets a query see a key: bit `bit` of the packed mask, little-endian within
// each byte (FlashInfer's layout). Masked batches are for tree speculative decoding, a few
// queries per request, so a byte read per score is cheap; plans without a mask never get here.
__device__ __forceinline__ bool mask_allows(const unsigned char* mask, u32 bit) {
    return (__ldg(mask + (bit >> 3)) >> (bit & 7)) & 1u;
}

// The logit soft-cap, cap * tanh(x / cap) with x = sm_scale * (q.k), on a raw score q.k, kept in
// the raw scale the softmax folds sm_scale * log2(e) into afterwards: (cap / sm_scale) *
// tanh(sm_scale * (q.k) / cap). tanh(y) = 1 - 2 / (e^2y + 1) by ex2 and a fast divide: its
// absolute error is a few fp32 ulps of 1, where tanh.approx has a relative error near 2^-11,
// which at Gemma 2's cap of 50 moves logits by hundredths. cap_in = 2 log2(e) sm_scale / cap,
// cap_out = cap / sm_scale; KernelParams carries both, per run (0 = no soft-cap).
__device__ __forceinline__ float soft_cap(float x, float cap_in, float cap_out) {
    const float e = exp2_approx(x * cap_in);
    return cap_out * (1.f - __fdividef(2.f, e + 1.f));
}
