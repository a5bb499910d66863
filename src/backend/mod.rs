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
