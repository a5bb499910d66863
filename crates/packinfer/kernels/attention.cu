// The packed-attention kernel and the merge kernel.
//
// Compiled by NVRTC once per variant with -DPI_HEAD_DIM=64|128|256, -DPI_BF16=0|1,
// -DPI_BLOCK_N (keys per inner step: 32, 64 or 128), -DPI_WARPS (4 or 8 warps of 16 tile rows
// each), -DPI_STAGES (K/V blocks in the shared-memory ring), -DPI_WS (the warp-specialised
// kernel) and -DPI_QO_TMA (whole one-request Q/O tiles by TMA: the short-prefill kernel, which is
// the warp-specialised one with a single consumer warpgroup); config.cuh defaults and derives
// the switches. src/backend/cuda/compile.rs says which combinations exist (Unit, Variant) and
// hands NVRTC the headers included below by name with this source (it gets no include path).
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
// Two kernels share these helpers. The plain one (PI_WS=0, attention_plain.cuh): every warp
// also copies K/V blocks by cp.async into a ring of PI_STAGES stages and the CTA meets at a
// barrier per block. The warp-specialised one (PI_WS=1, attention_ws.cuh): a producer warpgroup
// copies, by TMA where K/V rows are consecutive, and the consumer warpgroups only compute.

#include "config.cuh"   // the variant switches
#include "work.cuh"     // the work list and launch parameters, as the host lays them out
#include "ptx.cuh"      // inline-PTX wrappers: conversions, mma.sync, cp.async, wgmma, mbarriers, TMA
#include "tile.cuh"     // the swizzled tile layout, row table, K/V and Q copies, row stores
#include "softmax.cuh"  // masks and the online softmax
#include "attend.cuh"   // one K/V block's math: mma.sync per warp, wgmma per warpgroup
#if PI_WS
#include "attention_ws.cuh"
#else
#include "attention_plain.cuh"
#endif
#include "merge.cuh"    // merge_partials
