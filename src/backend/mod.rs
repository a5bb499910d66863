//! Backends execute plans. One trait, two implementations: `cpu` (the reference, what CI tests
//! against) and `cuda` (NVRTC-compiled kernels on the caller's stream).

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::error::Result;
use crate::plan::{DeviceProfile, Plan};
use crate::types::RunArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

/// Which backend a context should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// `None`: CUDA where it is usable, else the CPU.
    pub kind: Option<BackendKind>,
    pub device_ordinal: u32,
    /// CPU worker threads; 0 = one per core.
    pub cpu_threads: u32,
    pub kernel_cache_dir: Option<std::path::PathBuf>,
}

/// Opens the backend a context asked for. `Auto` falls back to the CPU when CUDA is unusable.
pub fn open(choice: &BackendChoice) -> Result<Arc<dyn Backend>> {
    match choice.kind {
        Some(BackendKind::Cpu) => Ok(Arc::new(cpu::CpuBackend::new(choice.cpu_threads))),
        Some(BackendKind::Cuda) => cuda::open(choice),
        None => cuda::open(choice).or_else(|_| Ok(Arc::new(cpu::CpuBackend::new(choice.cpu_threads)) as Arc<dyn Backend>)),
    }
}

/// Caller-provided scratch for split partials (device memory on CUDA, host memory on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scratch {
    pub ptr: u64,
    pub bytes: usize,
}

/// A device (or the host) that can execute plans.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// "cpu", or the GPU's name.
    fn device_name(&self) -> String;
    /// What the planner should assume about this device.
    fn profile(&self) -> DeviceProfile;
    /// Binds a plan to this device: uploads its work list on `stream`, resolves kernels, binds
    /// scratch (the caller's, or allocated here, never in `run`).
    fn bind(&self, plan: Arc<Plan>, stream: u64, scratch: Option<Scratch>) -> Result<Box<dyn BoundPlan>>;
    /// Allocates the memory of a KV pool, once, at pool creation: `bytes` of device memory on
    /// CUDA, host memory on the CPU. Backends without pool support say `Unsupported`.
    fn alloc_kv(&self, bytes: usize) -> Result<Box<dyn KvMemory>> {
        Err(crate::unsupported!(
            "KV pools are not supported on the {} backend yet (asked for {bytes} bytes); use a CPU context, or manage the KV cache yourself and call packinfer_plan_create",
            self.device_name()
        ))
    }
}

/// The storage of a KV pool: one allocation made by [`Backend::alloc_kv`], addressed by byte
/// offsets from [`KvMemory::base`]. The pool (`src/kv`) decides what lives where; this trait only
/// moves bytes, so a backend implements it with a loop (CPU) or a kernel / async copies (CUDA).
/// Every method enqueues its work on `stream` (a `CUstream`; 0 = the default stream; ignored by
/// the CPU backend, which finishes before returning). Callers guarantee the offsets are inside
/// the allocation; the pool serializes calls, so implementations need no locking of their own.
pub trait KvMemory: Send + Sync {
    /// Address of the first byte (a device pointer on CUDA); what the pool's `KvLayout`s point into.
    fn base(&self) -> u64;
    /// Size of the allocation in bytes.
    fn len_bytes(&self) -> usize;
    /// Scatters rows: row `i` (`row_bytes` bytes at `src + i * src_stride_bytes`, caller memory
    /// of the same kind as the pool's: device memory on CUDA) is copied to
    /// `base + dst_offsets[i]`. Used to write a step's new K (or V) tokens into their slots.
    ///
    /// # Safety
    /// `src` must address `dst_offsets.len()` readable rows laid out as described.
    unsafe fn write_rows(&self, src: u64, src_stride_bytes: u64, row_bytes: u64, dst_offsets: &[u64], stream: u64) -> Result<()>;
    /// Copies `bytes` from `base + src` to `base + dst` for every `(src, dst)` pair, inside the
    /// allocation. No destination overlaps a source or another destination (the pool copies
    /// pages into free pages), so the copies may run in any order or in parallel.
    fn copy_ranges(&self, pairs: &[(u64, u64)], bytes: u64, stream: u64) -> Result<()>;
}

/// A plan bound to a device: what a launch handle holds.
pub trait BoundPlan: Send + Sync {
    fn plan(&self) -> &Arc<Plan>;
    /// Computes one layer. Allocates nothing and waits for nothing on the CUDA backend.
    fn run(&self, args: &RunArgs) -> Result<()>;
    /// Whether the upload recorded by `bind` has completed.
    fn is_ready(&self) -> Result<bool>;
    /// Blocks until the upload recorded by `bind` has completed.
    fn wait(&self) -> Result<()>;
}
