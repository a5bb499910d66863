#pragma once
#include "ptx.cuh"

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
