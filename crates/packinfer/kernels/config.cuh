// The attention unit's variant switches: the -D values the host passes (see attention.cu), their
// defaults, and the switches derived from them. Every attention header sees these first.
#pragma once

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
// Head sizes that are no multiple of 64 (96) are stored in shared memory as the next multiple
// (tile.cuh's 64-dim column blocks), the columns past PI_HEAD_DIM unused. Copies give each row
// a power of two of 16-byte chunks (PI_ROW_VECS >= PI_HEAD_DIM / 8: 96 -> 16, 192 -> 32), the
// lanes past the row's chunks idle, so that threads split into whole rows.
#if PI_HEAD_DIM % 16 != 0
#error "PI_HEAD_DIM must be a multiple of 16"
#endif
#define PI_HEAD_DIM_TILE ((PI_HEAD_DIM + 63) / 64 * 64)
#define PI_ROW_VECS (PI_HEAD_DIM <= 64 ? 8 : PI_HEAD_DIM <= 128 ? 16 : 32)

// K/V caches of fp8 e4m3 codes (-DPI_KV_FP8=1 from the host; the plain kernel only): blocks are
// copied as bytes, a 16-byte vector carrying 16 elements, and converted to the 16-bit type in
// shared memory before the MMAs read them (attention_plain.cuh). The pipelined wgmma loop is
// not built for them: the conversion needs a CTA barrier per block, which that loop does not have.
#ifndef PI_KV_FP8
#define PI_KV_FP8 0
#endif
// 16-byte chunks per K/V row a copy spreads over threads (a power of two, as PI_ROW_VECS).
#define PI_KV_VECS (PI_KV_FP8 ? PI_ROW_VECS / 2 : PI_ROW_VECS)

// wgmma (warpgroup tensor-core instructions) exist on sm_90a only; with 64-key blocks (128 in
// the warp-specialised kernel) the accumulators of head_dim <= 128 stay in registers. PACKINFER_KERNEL_DEFINES="-DPI_WGMMA=0" turns
// them off for comparisons.
// Not at head sizes that are no multiple of 64 (96): the mma.sync path computes those.
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL) || PI_HEAD_DIM > 128 || PI_HEAD_DIM % 64 != 0 || (PI_BLOCK_N != 32 && PI_BLOCK_N != 64 && PI_BLOCK_N != 128)
#undef PI_WGMMA
#define PI_WGMMA 0
#elif !defined(PI_WGMMA)
#define PI_WGMMA 1
#endif
// The plain kernel's pipelined wgmma loop (attention_plain.cuh) needs PI_STAGES >= 3: its loads run PI_STAGES - 2
// blocks ahead, since a stage is refilled only once the O += PV that read it is done.
#define PI_WG_PIPELINE (PI_WGMMA && PI_STAGES >= 3 && !PI_KV_FP8)
// The warp-specialised kernel (a producer warpgroup and mbarriers; attention_ws.cuh):
// the host asks for it with -DPI_WS=1 on sm_90a at head_dim <= 128.
#ifndef PI_WS
#define PI_WS 0
#endif
#if PI_WS && PI_KV_FP8
#error "fp8 K/V (PI_KV_FP8) run in the plain kernel only"
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

// mbarriers and TMA exist from sm_90 on (ptx.cuh).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PI_TMA 1
#else
#define PI_TMA 0
#endif

// Whole one-request Q and O tiles by TMA: the short-prefill kernel (-DPI_QO_TMA=1 from the
// host; the warp-specialised kernel with one consumer warpgroup).
#if !defined(PI_QO_TMA) || !PI_TMA
#undef PI_QO_TMA
#define PI_QO_TMA 0
#endif

// Custom masks (mask.cuh): the plain kernel's masked variant (-DPI_CUSTOM_MASK=1 from the host).
// The other kernels leave the mask code out, so their registers are what they were without it.
#ifndef PI_CUSTOM_MASK
#define PI_CUSTOM_MASK 0
#endif
