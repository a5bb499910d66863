//! Backends execute plans. One trait, two implementations: `cpu` (the reference, what CI tests
//! against) and `cuda` (NVRTC-compiled kernels on the caller's stream).

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::error::Result;
use crate::plan::{DeviceProfile, Plan};
use crate::types::{RunArgs, Shape};

/// The two backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// [`cpu::CpuBackend`]: host threads, the reference.
    Cpu,
    /// [`cuda::CudaBackend`]: one CUDA device.
    Cuda,
}

/// Which backend a context should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// `None`: CUDA where it is usable, else the CPU.
    pub kind: Option<BackendKind>,
    /// The CUDA device to open.
    pub device_ordinal: u32,
    /// CPU worker threads; 0 = one per core.
    pub cpu_threads: u32,
    /// Where compiled kernels (and a calibrated profile) are cached; `None`:
    /// `$PACKINFER_CACHE_DIR`, else `~/.cache/packinfer`.
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
    /// Address of the first byte; it must stay valid while the launch lives (see
    /// [`BoundPlan::run`]'s safety section).
    pub ptr: u64,
    /// Its size: at least the launch's `scratch_bytes`.
    pub bytes: usize,
}

/// A device (or the host) that can execute plans.
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// "cpu", or the GPU's name.
    fn device_name(&self) -> String;
    /// What the planner should assume about this device.
    fn profile(&self) -> DeviceProfile;
    /// The profile to plan `batch` with: `profile()`, unless the device runs some batches
    /// better with another tile height (the CUDA backend: short batches).
    fn profile_for(&self, shape: &crate::types::Shape, batch: &crate::types::Batch) -> DeviceProfile {
        let _ = (shape, batch);
        self.profile()
    }
    /// Binds a plan to this device: checks it (`Plan::check_consistent`, `InvalidArgument` for a
    /// plan that fails), uploads its work list on `stream`, resolves kernels, binds scratch (the
    /// caller's, or allocated here, never in `run`).
    fn bind(&self, plan: Arc<Plan>, stream: u64, scratch: Option<Scratch>) -> Result<Box<dyn BoundPlan>>;
    /// Allocates the memory of a KV pool, once, at pool creation: `bytes` of device memory on
    /// CUDA, host memory on the CPU. Backends without pool support say `Unsupported`.
    fn alloc_kv(&self, bytes: usize) -> Result<Box<dyn KvMemory>> {
        Err(crate::unsupported!(
            "KV pools are not supported on the {} backend yet (asked for {bytes} bytes); use a CPU context, or manage the KV cache yourself and call packinfer_plan_create",
            self.device_name()
        ))
    }
    /// Like `bind`, with device buffers sized for `capacity` (at least the plan's own sizes), so
    /// that `BoundPlan::update` can later upload any plan that fits.
    fn bind_with_capacity(
        &self,
        plan: Arc<Plan>,
        stream: u64,
        scratch: Option<Scratch>,
        capacity: &LaunchCapacity,
    ) -> Result<Box<dyn BoundPlan>> {
        let _ = capacity;
        self.bind(plan, stream, scratch)
    }
    /// Builds every kernel variant this backend can need, so no request pays compile time.
    fn precompile(&self) -> Result<()> {
        Ok(())
    }
    /// Measures this device and fits the planner's cost model; later `profile()` calls (and
    /// later contexts on the same device and kernel cache) use it.
    fn calibrate_profile(&self) -> Result<DeviceProfile> {
        Err(crate::unsupported!("only the CUDA backend calibrates its cost model"))
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
    /// Scatters rows as [`KvMemory::write_rows`] does, converting each to fp8 e4m3 on the way:
    /// source row `i` holds `num_kv_heads × head_dim` elements of `conv.src_dtype`, and element x
    /// of head h is stored at `base + dst_offsets[i]` onwards as e4m3(x / scale(h)), the scales
    /// being the `num_kv_heads` f32 at `base + conv.head_scales`. Backends that cannot convert
    /// say `Unsupported` (the default).
    ///
    /// # Safety
    /// `src` must address `dst_offsets.len()` readable rows laid out as described.
    unsafe fn write_rows_fp8(&self, src: u64, src_stride_bytes: u64, conv: &RowConversion, dst_offsets: &[u64], stream: u64) -> Result<()> {
        let _ = (src, src_stride_bytes, dst_offsets, stream);
        Err(crate::unsupported!("this backend's KV pools do not store {} rows as fp8_e4m3", conv.src_dtype.name()))
    }
    /// Copies host bytes to `base + offset`, once, at pool creation (an fp8 pool's scales).
    /// Backends without it say `Unsupported` (the default).
    fn write_from_host(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _ = (offset, data);
        Err(crate::unsupported!("this backend's KV pools cannot be written from host memory"))
    }
    /// Copies `bytes` from `base + src` to `base + dst` for every `(src, dst)` pair, inside the
    /// allocation. No destination overlaps a source or another destination (the pool copies
    /// pages into free pages), so the copies may run in any order or in parallel.
    fn copy_ranges(&self, pairs: &[(u64, u64)], bytes: u64, stream: u64) -> Result<()>;
}

/// How [`KvMemory::write_rows_fp8`] converts a row of new K (or V) into an fp8 cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowConversion {
    /// The element type of the source rows (the pool's Q dtype).
    pub src_dtype: crate::types::DType,
    /// KV heads in a row.
    pub num_kv_heads: u32,
    /// Elements of one head.
    pub head_dim: u32,
    /// Byte offset in the allocation of the `num_kv_heads` f32 scales, one per head.
    pub head_scales: u64,
}

/// Sizes of the device buffers of a launch: a plan fits when none of its counts is larger.
/// Zero fields mean "the first plan's size". Work items, groups and merge rows are counted as
/// the kernels read them: an item per KV head, a merge row and its slots per query head
/// ([`LaunchCapacity::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaunchCapacity {
    /// Work items, per KV head (`Plan::num_item_copies`).
    pub items: u32,
    /// Row segments.
    pub row_segments: u32,
    /// KV chunks.
    pub kv_chunks: u32,
    /// Requests.
    pub requests: u32,
    /// Entries of the page list.
    pub pages: u32,
    /// Merge rows, per query head (`Plan::num_merge_rows`).
    pub merge_rows: u32,
    /// Entries of the merge slot list, per query head.
    pub merge_slots: u32,
    /// Execution groups.
    pub groups: u32,
    /// Partial slots (they size the scratch).
    pub partial_slots: u32,
    /// Bytes of custom mask (0 when plans carry none).
    pub mask_bytes: u32,
    /// Query tokens of a step with a custom mask (the kernels keep one mask offset per token).
    pub mask_queries: u32,
}

impl LaunchCapacity {
    /// Exactly what `plan` needs.
    pub fn of(plan: &Plan) -> LaunchCapacity {
        LaunchCapacity {
            items: plan.num_item_copies().min(u32::MAX as usize) as u32,
            row_segments: plan.row_segments.len() as u32,
            kv_chunks: plan.kv_chunks.len() as u32,
            requests: plan.requests.len() as u32,
            pages: plan.batch.kv_page_indices.len() as u32,
            merge_rows: plan.num_merge_rows().min(u32::MAX as usize) as u32,
            merge_slots: (plan.merge_slots.len() * plan.shape.num_qo_heads as usize).min(u32::MAX as usize) as u32,
            groups: plan.num_groups(),
            partial_slots: plan.num_partial_slots(),
            mask_bytes: plan.batch.custom_mask.len() as u32,
            mask_queries: if plan.batch.has_custom_mask() { plan.batch.total_q() } else { 0 },
        }
    }

    /// The field-wise maximum.
    pub fn max(&self, o: &LaunchCapacity) -> LaunchCapacity {
        LaunchCapacity {
            items: self.items.max(o.items),
            row_segments: self.row_segments.max(o.row_segments),
            kv_chunks: self.kv_chunks.max(o.kv_chunks),
            requests: self.requests.max(o.requests),
            pages: self.pages.max(o.pages),
            merge_rows: self.merge_rows.max(o.merge_rows),
            merge_slots: self.merge_slots.max(o.merge_slots),
            groups: self.groups.max(o.groups),
            partial_slots: self.partial_slots.max(o.partial_slots),
            mask_bytes: self.mask_bytes.max(o.mask_bytes),
            mask_queries: self.mask_queries.max(o.mask_queries),
        }
    }

    /// Says which count of `plan` is over this capacity.
    pub fn check_fits(&self, plan: &Plan) -> Result<()> {
        let need = LaunchCapacity::of(plan);
        let pairs = [
            ("work items", need.items, self.items),
            ("row segments", need.row_segments, self.row_segments),
            ("KV chunks", need.kv_chunks, self.kv_chunks),
            ("requests", need.requests, self.requests),
            ("pages", need.pages, self.pages),
            ("merge rows", need.merge_rows, self.merge_rows),
            ("merge slots", need.merge_slots, self.merge_slots),
            ("groups", need.groups, self.groups),
            ("partial slots", need.partial_slots, self.partial_slots),
            ("custom mask bytes", need.mask_bytes, self.mask_bytes),
            ("masked query tokens", need.mask_queries, self.mask_queries),
        ];
        for (what, n, cap) in pairs {
            if n > cap {
                return Err(crate::invalid!("the plan has {n} {what} but the launch was created with capacity for {cap}"));
            }
        }
        Ok(())
    }
}

/// Whether a launch of `shape` and `page_size`, sized for `capacity`, can take `plan` by `BoundPlan::update`:
/// the same shape and page size (a run's K/V tensor maps, which a captured graph keeps, are made
/// for the launch's), every count within the capacity. Says which is not, by value.
pub(crate) fn check_update(shape: &Shape, page_size: u32, capacity: &LaunchCapacity, plan: &Plan) -> Result<()> {
    if plan.shape != *shape {
        return Err(crate::invalid!("the new plan's shape {:?} differs from the launch's {:?}; create a new launch", plan.shape, shape));
    }
    if plan.batch.page_size != page_size {
        return Err(crate::invalid!(
            "the new plan's page_size = {} differs from the launch's {page_size}; create a new launch",
            plan.batch.page_size
        ));
    }
    capacity.check_fits(plan)
}

/// A plan bound to a device: what a launch handle holds.
pub trait BoundPlan: Send + Sync {
    /// The shape of the plan the launch was created with; a plan given to `update` has it (and
    /// its page size). The launch keeps only what its runs need of a plan (the CPU backend the
    /// plan it executes, the CUDA backend the device copy), so an engine may re-plan into a plan
    /// (`Plan::rebuild`) once another plan has replaced it in the launch.
    fn shape(&self) -> &Shape;
    /// Computes one layer. Allocates nothing and waits for nothing on the CUDA backend.
    ///
    /// The backend checks the plan (at `bind` and `update`) and that the pointers it needs are
    /// not null; it cannot check the memory behind them, hence `unsafe`.
    ///
    /// # Safety
    /// For the plan this launch computes (the one bound last, by `bind` or `update`), with its
    /// shape, `total_q` query tokens and page size:
    /// - `args.q` addresses a readable `[total_q, num_qo_heads, head_dim]` tensor of the plan's
    ///   dtype through its strides, and `args.o` a writable one, overlapping nothing else
    ///   `run` reads or writes;
    /// - `args.lse` is 0 or addresses writable `f32 [total_q, num_qo_heads]`;
    /// - `args.kv` addresses K and V caches holding `batch.num_pages` pages of the plan's
    ///   `kv_dtype`: every (page, token in page, KV head, dim) is readable through its strides;
    /// - `args.kv_scales`' per-head arrays, where not 0, address `num_kv_heads` readable f32;
    /// - the scratch given to `bind`, if any, stays valid and writable for its size and is used
    ///   by nothing else while the launch lives;
    /// - on the CPU backend all of it is host memory, not written by anyone else during the
    ///   call; on CUDA it is device memory of the backend's device, `args.stream` is a stream
    ///   of that device (or 0), and the memory stays valid, and is not written by other work,
    ///   until the stream has passed the enqueued kernels.
    unsafe fn run(&self, args: &RunArgs) -> Result<()>;
    /// Whether the upload recorded by `bind` has completed.
    fn is_ready(&self) -> Result<bool>;
    /// Blocks until the upload recorded by `bind` has completed.
    fn wait(&self) -> Result<()>;
    /// Whether `update` would take `plan` (`check_update`: same shape and page size, within the
    /// capacity) and run it on the kernel a launch created for it the way this one was would
    /// choose (the CUDA backend picks a launch's kernel from its first plan and keeps it, as a
    /// captured graph needs). An engine whose steps differ in kind keeps a launch per kind and
    /// updates one that suits.
    fn suits(&self, plan: &Plan) -> bool {
        let _ = plan;
        false
    }
    /// Makes another plan of the same shape and page size, within the launch's capacity, the one
    /// `run` computes (`check_update`). On CUDA it is uploaded into the launch's buffers on
    /// `stream`, the completion event recorded again, so a graph captured around `run` replays
    /// the new batch.
    fn update(&self, plan: Arc<Plan>, stream: u64) -> Result<()> {
        let _ = (plan, stream);
        Err(crate::unsupported!("this backend's launches cannot be updated; create a new launch"))
    }
    /// [`BoundPlan::update`] for a plan as the planner made it: the CUDA backend skips the
    /// consistency check (`Plan::check_consistent`), whose facts the planner guarantees, and
    /// keeps the checks of the launch's shape, capacity and tile height (the C API's plans are
    /// all made so, and this is what `packinfer_launch_update` calls).
    ///
    /// # Safety
    /// `plan` was returned by `Plan::build` or `KvPool::plan`, or last written by
    /// `Plan::rebuild`/`rebuild_with`, and none of its fields was changed afterwards.
    unsafe fn update_planned(&self, plan: Arc<Plan>, stream: u64) -> Result<()> {
        self.update(plan, stream)
    }
}
