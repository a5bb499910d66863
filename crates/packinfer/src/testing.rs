//! Internals that the workspace's own tests (and the layout check of the kernels) reach into.
//! Not part of the API: hidden from the documentation, no stability promise, may change in any
//! release. Engines use the documented modules.

use std::path::Path;
use std::sync::Arc;

use crate::backend::cuda::CudaBackend;
use crate::backend::{LaunchCapacity, Scratch};
use crate::error::Result;
use crate::kv::{KvPool, SeqId};
use crate::plan::{DeviceProfile, Plan};
use crate::types::{Batch, DType, KvLayout, Shape};

pub use crate::backend::cuda::calibrate::Sample;
pub use crate::backend::cuda::driver::{sync_stream, CtxGuard, Device, DeviceBuffer};
pub use crate::backend::cuda::launch::{
    CudaBound, HostUpload, KernelItem, KernelMergeRow, KernelParams, KvRange, PlanHeader, SegmentInfo, TensorMap,
};

/// NVRTC compilation and the kernel cache.
pub mod compile {
    pub use crate::backend::cuda::compile::{
        cache_file_name, compile, compile_source, nvrtc_present, nvrtc_version, Compiled, KernelCache, Unit, Variant, SHORT_PREFILL_CTAS,
        WORK_CUH,
    };
}

/// `plan`'s statistics and group costs measured item by item, as the scheduler's per-piece
/// counts must give them.
pub fn stats_by_items(plan: &Plan, profile: &DeviceProfile) -> (crate::plan::PlanStats, Vec<f64>) {
    plan.stats_by_items(profile)
}

/// Whether the CUDA driver and NVRTC load and device `ordinal` exists.
pub fn probe(ordinal: u32) -> Result<()> {
    crate::backend::cuda::probe(ordinal)
}

/// Whether the CUDA backend picks its warp-specialised kernel for this batch.
pub fn suits_warp_specialized(shape: &Shape, batch: &Batch) -> bool {
    crate::backend::cuda::suits_warp_specialized(shape, batch)
}

/// The device (its primary context) a CUDA backend runs on.
pub fn device(cu: &CudaBackend) -> &Device {
    cu.device()
}

/// `Backend::bind` / `bind_with_capacity` with the concrete launch type, whose kernel choice
/// and grid tests inspect.
pub fn bind_cuda(
    cu: &CudaBackend,
    plan: Arc<Plan>,
    stream: u64,
    scratch: Option<Scratch>,
    capacity: Option<&LaunchCapacity>,
) -> Result<CudaBound> {
    cu.bind_cuda(plan, stream, scratch, capacity)
}

/// Runs the calibration and returns the timed samples beside the fitted profile.
pub fn calibrate(cu: &CudaBackend) -> Result<(DeviceProfile, Vec<Sample>)> {
    cu.calibrate()
}

/// The directory of the backend's kernel cache, if it has one.
pub fn kernel_cache_dir(cu: &CudaBackend) -> Option<&Path> {
    cu.shared().cache.dir()
}

/// What the compiler and the occupancy calculator say of one attention kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelStats {
    /// Registers per thread.
    pub registers: i32,
    /// Local memory per thread in bytes.
    pub local_bytes: i32,
    /// Dynamic shared memory per CTA.
    pub smem_bytes: u32,
    /// CTAs resident per SM.
    pub ctas_per_sm: u32,
}

/// The context's attention kernel for (head_dim, dtype), loaded (and compiled) if needed.
pub fn attention_kernel_stats(cu: &CudaBackend, head_dim: u32, dtype: DType) -> Result<KernelStats> {
    let k = cu.shared().attention(head_dim, dtype)?;
    Ok(KernelStats { registers: k.registers, local_bytes: k.local_bytes, smem_bytes: k.smem_bytes, ctas_per_sm: k.ctas_per_sm })
}

/// The fp8-cache attention kernel (`Variant::PlainFp8`) for (head_dim, dtype) with `warps`-warp
/// tiles, loaded (and compiled) if needed.
pub fn fp8_attention_kernel_stats(cu: &CudaBackend, head_dim: u32, dtype: DType, warps: u32) -> Result<KernelStats> {
    let k = cu.shared().attention_with(head_dim, dtype, warps, crate::backend::cuda::compile::Variant::PlainFp8)?;
    Ok(KernelStats { registers: k.registers, local_bytes: k.local_bytes, smem_bytes: k.smem_bytes, ctas_per_sm: k.ctas_per_sm })
}

/// The `append_kv` kernel (`kernels/kv.cu`), which only the tests use.
///
/// # Safety
/// As `CudaBackend::append_kv`: device memory of these sizes, valid until `stream` has run it.
#[allow(clippy::too_many_arguments)]
pub unsafe fn append_kv(
    cu: &CudaBackend,
    layout: &KvLayout,
    page_size: u32,
    slots: u64,
    k_new: u64,
    v_new: u64,
    num_tokens: u32,
    num_kv_heads: u32,
    head_dim: u32,
    dtype: DType,
    stream: u64,
) -> Result<()> {
    // SAFETY: this function's contract is the method's.
    unsafe { cu.append_kv(layout, page_size, slots, k_new, v_new, num_tokens, num_kv_heads, head_dim, dtype, stream) }
}

/// The `copy_pages` kernel (`kernels/kv.cu`), which only the tests use.
///
/// # Safety
/// As `CudaBackend::copy_pages`: device memory of these sizes, valid until `stream` has run it.
#[allow(clippy::too_many_arguments)]
pub unsafe fn copy_pages(
    cu: &CudaBackend,
    layout: &KvLayout,
    page_size: u32,
    pairs: u64,
    num_pairs: u32,
    num_kv_heads: u32,
    head_dim: u32,
    num_layers: u32,
    layer_stride: i64,
    dtype: DType,
    stream: u64,
) -> Result<()> {
    // SAFETY: this function's contract is the method's.
    unsafe { cu.copy_pages(layout, page_size, pairs, num_pairs, num_kv_heads, head_dim, num_layers, layer_stride, dtype, stream) }
}

/// A copy of a pool's bookkeeping, for invariant checks: refcounts, free pages, and per
/// sequence (id, pages, reserved pages, len).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// References to each page.
    pub refcount: Vec<u32>,
    /// Pages with no reference, in order.
    pub free: Vec<u32>,
    /// (id, pages, reserved pages, tokens) of every sequence.
    pub seqs: Vec<(SeqId, Vec<u32>, Vec<u32>, u32)>,
}

/// The pool's state, under its lock.
pub fn pool_snapshot(pool: &KvPool) -> PoolSnapshot {
    pool.debug_snapshot()
}

/// Token `token` of `seq` in `layer` read back as (K row, V row) bytes; host memory only (a
/// pool on the CPU backend).
pub fn read_token_host(pool: &KvPool, seq: SeqId, layer: u32, token: u32) -> Result<(Vec<u8>, Vec<u8>)> {
    pool.read_token_host(seq, layer, token)
}
