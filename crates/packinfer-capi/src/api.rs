//! The exported functions. Each one: check and convert the C arguments, call into the library,
//! write out-parameters. Nothing else happens here.

use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

use parking_lot::Mutex;

use super::handles::Registry;
use super::types::*;
use super::{guard, last_error_ptr, slice, write_out, PackinferStatus, Versioned, PACKINFER_ABI_VERSION};
use packinfer::backend::{self, Backend, BackendChoice, BackendKind, BoundPlan, Scratch};
use packinfer::error::{Error, Result};
use packinfer::invalid;
use packinfer::plan::{Plan, PlanOptions};
use packinfer::types::{Batch, DType, KvLayout, KvScales, PrefixGroup, RowsTensor, RunArgs, Shape};

pub(super) static CONTEXTS: Registry<Arc<dyn Backend>> = Registry::new(0xC1, "context");
pub(super) static PLANS: Registry<PlanCell> = Registry::new(0xB1, "plan");
static LAUNCHES: Registry<Launch> = Registry::new(0xA1, "launch");

/// What a plan handle holds: its plan, which `packinfer_plan_update` re-plans in place (or
/// replaces, while a launch on the CPU still executes it). Calls on one handle take its lock,
/// so an update and a launch made from the same handle see the plan before or after, whole.
pub(super) struct PlanCell(Mutex<Arc<Plan>>);

impl PlanCell {
    pub(super) fn new(plan: Plan) -> PlanCell {
        PlanCell(Mutex::new(Arc::new(plan)))
    }
    /// The plan the handle holds now.
    pub(super) fn get(&self) -> Arc<Plan> {
        self.0.lock().clone()
    }
    /// Plans into the held plan's memory with `plan_into`, or, while a launch on the CPU still
    /// executes it, into a copy that the handle then holds (on error the handle keeps its plan).
    pub(super) fn update_into<T>(&self, plan_into: impl FnOnce(&mut Plan) -> Result<T>) -> Result<T> {
        let mut held = self.0.lock();
        match Arc::get_mut(&mut held) {
            Some(p) => plan_into(p),
            None => {
                let mut fresh = Plan::clone(&held);
                let out = plan_into(&mut fresh)?;
                *held = Arc::new(fresh);
                Ok(out)
            }
        }
    }
    /// Re-plans the held plan in its memory with `rebuild`, or, while a launch on the CPU still
    /// executes it, holds the plan `build` makes instead.
    pub(super) fn update(&self, rebuild: impl FnOnce(&mut Plan) -> Result<()>, build: impl FnOnce() -> Result<Plan>) -> Result<()> {
        let mut held = self.0.lock();
        match Arc::get_mut(&mut held) {
            Some(p) => rebuild(p),
            None => {
                *held = Arc::new(build()?);
                Ok(())
            }
        }
    }
}

/// A plan bound to a context. Holds the context's backend so that destroying the context
/// handle first cannot pull the device out from under a live launch.
struct Launch {
    bound: Box<dyn BoundPlan>,
    _backend: Arc<Arc<dyn Backend>>,
}

/// The C ABI version this library implements (`PACKINFER_ABI_VERSION` at build time).
#[no_mangle]
pub extern "C" fn packinfer_abi_version() -> u32 {
    PACKINFER_ABI_VERSION
}

/// The library's version, e.g. "0.1.0" (static string).
#[no_mangle]
pub extern "C" fn packinfer_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// A static name for a status (a `PackinferStatus` value), e.g.
/// "PACKINFER_STATUS_INVALID_ARGUMENT"; "PACKINFER_STATUS_UNKNOWN" for any other number.
#[no_mangle]
pub extern "C" fn packinfer_status_string(status: u32) -> *const c_char {
    use PackinferStatus::*;
    const ALL: [PackinferStatus; 10] =
        [Ok, InvalidArgument, InvalidHandle, Unsupported, OutOfMemory, PoolExhausted, NoDevice, DeviceError, CompileError, Internal];
    let Some(&status) = ALL.iter().find(|s| **s as u32 == status) else {
        return c"PACKINFER_STATUS_UNKNOWN".as_ptr();
    };
    let s: &'static CStr = match status {
        Ok => c"PACKINFER_STATUS_OK",
        InvalidArgument => c"PACKINFER_STATUS_INVALID_ARGUMENT",
        InvalidHandle => c"PACKINFER_STATUS_INVALID_HANDLE",
        Unsupported => c"PACKINFER_STATUS_UNSUPPORTED",
        OutOfMemory => c"PACKINFER_STATUS_OUT_OF_MEMORY",
        PoolExhausted => c"PACKINFER_STATUS_POOL_EXHAUSTED",
        NoDevice => c"PACKINFER_STATUS_NO_DEVICE",
        DeviceError => c"PACKINFER_STATUS_DEVICE_ERROR",
        CompileError => c"PACKINFER_STATUS_COMPILE_ERROR",
        Internal => c"PACKINFER_STATUS_INTERNAL",
    };
    s.as_ptr()
}

/// This thread's message for its last failed call: the function, the argument and the bad
/// value. Valid until the next failing call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn packinfer_last_error() -> *const c_char {
    last_error_ptr()
}

/// Fills `options` with defaults (AUTO backend, device 0, one CPU thread per core).
///
/// # Safety
/// `options` must be NULL or point to a writable `PackinferContextOptions`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_context_options_default(options: *mut PackinferContextOptions) -> PackinferStatus {
    // SAFETY: `options` is NULL or writable (this function's contract).
    guard("packinfer_context_options_default", || unsafe { write_out("options", options, PackinferContextOptions::default_value()) })
}

/// Creates a context on the backend `options` asks for. AUTO picks CUDA where it works and the
/// CPU elsewhere; CUDA where it cannot work gives NO_DEVICE with the reason.
///
/// # Safety
/// `options` must point to an initialized `PackinferContextOptions`; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_context_create(options: *const PackinferContextOptions, out: *mut PackinferContext) -> PackinferStatus {
    guard("packinfer_context_create", || {
        // SAFETY: `options` points to an initialized struct (this function's contract).
        let o = unsafe { super::options("options", options)? };
        let kind = match o.backend {
            0 => None,
            1 => Some(BackendKind::Cpu),
            2 => Some(BackendKind::Cuda),
            other => return Err(invalid!("options->backend = {other} is not a PackinferBackend (0 = AUTO, 1 = CPU, 2 = CUDA)")),
        };
        let kernel_cache_dir = if o.kernel_cache_dir.is_null() {
            None
        } else {
            // SAFETY: an initialized struct's non-null kernel_cache_dir is a C string.
            let s = unsafe { CStr::from_ptr(o.kernel_cache_dir) }
                .to_str()
                .map_err(|_| invalid!("options->kernel_cache_dir is not valid UTF-8"))?;
            Some(s.into())
        };
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        let choice = BackendChoice { kind, device_ordinal: o.device_ordinal, cpu_threads: o.num_threads, kernel_cache_dir };
        let backend = backend::open(&choice)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferContext { bits: CONTEXTS.insert(backend)? }) }
    })
}

/// Destroys a context. Launches made on it stay usable until they are destroyed.
#[no_mangle]
pub extern "C" fn packinfer_context_destroy(context: PackinferContext) -> PackinferStatus {
    guard("packinfer_context_destroy", || CONTEXTS.remove(context.bits).map(drop))
}

/// Says which backend and device a context runs on.
///
/// # Safety
/// `info` must point to a `PackinferContextInfo` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_context_info(context: PackinferContext, info: *mut PackinferContextInfo) -> PackinferStatus {
    guard("packinfer_context_info", || {
        // SAFETY: `info` points to a struct whose struct_size is set (this function's contract).
        unsafe { super::check_out("info", info)? };
        let backend = CONTEXTS.get(context.bits)?;
        let mut name = [0 as c_char; 128];
        for (dst, &b) in name.iter_mut().zip(backend.device_name().as_bytes().iter().take(127)) {
            *dst = b as c_char;
        }
        let value = PackinferContextInfo {
            struct_size: std::mem::size_of::<PackinferContextInfo>(),
            backend: match backend.kind() {
                BackendKind::Cpu => PackinferBackend::Cpu as u32,
                BackendKind::Cuda => PackinferBackend::Cuda as u32,
            },
            num_workers: backend.profile().num_workers,
            device_name: name,
        };
        // SAFETY: as above.
        unsafe { super::write_versioned("info", info, value) }
    })
}

/// Fills `options` with the defaults: every PackInfer technique on, automatic capacity.
///
/// # Safety
/// `options` must be NULL or point to a writable `PackinferPlanOptions`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_plan_options_default(options: *mut PackinferPlanOptions) -> PackinferStatus {
    // SAFETY: `options` is NULL or writable (this function's contract).
    guard("packinfer_plan_options_default", || unsafe { write_out("options", options, PackinferPlanOptions::default_value()) })
}

/// Fills `desc` with defaults: an empty batch, page_size 16, BF16, causal, sm_scale 0 (1/sqrt(
/// head_dim)), no prefix groups; the arrays, sizes and the model's shape are left 0/NULL to set.
///
/// # Safety
/// `desc` must be NULL or point to a writable `PackinferBatchDesc`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_batch_desc_default(desc: *mut PackinferBatchDesc) -> PackinferStatus {
    // SAFETY: `desc` is NULL or writable (this function's contract).
    guard("packinfer_batch_desc_default", || unsafe { write_out("desc", desc, PackinferBatchDesc::default_value()) })
}

/// Fills `options` with defaults: no caller scratch (the launch allocates it once).
///
/// # Safety
/// `options` must be NULL or point to a writable `PackinferLaunchOptions`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_options_default(options: *mut PackinferLaunchOptions) -> PackinferStatus {
    // SAFETY: `options` is NULL or writable (this function's contract).
    guard("packinfer_launch_options_default", || unsafe { write_out("options", options, PackinferLaunchOptions::default_value()) })
}

/// Fills `capacity` with defaults: every count 0, i.e. the first plan's own count.
///
/// # Safety
/// `capacity` must be NULL or point to a writable `PackinferLaunchCapacity`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_capacity_default(capacity: *mut PackinferLaunchCapacity) -> PackinferStatus {
    // SAFETY: `capacity` is NULL or writable (this function's contract).
    guard("packinfer_launch_capacity_default", || unsafe { write_out("capacity", capacity, PackinferLaunchCapacity::default_value()) })
}

/// Fills `args` with defaults: contiguous Q and O strides (0), no LSE, the default stream; the
/// tensor pointers and the KV layout are left NULL/0 to set.
///
/// # Safety
/// `args` must be NULL or point to a writable `PackinferRunArgs`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_run_args_default(args: *mut PackinferRunArgs) -> PackinferStatus {
    // SAFETY: `args` is NULL or writable (this function's contract).
    guard("packinfer_run_args_default", || unsafe { write_out("args", args, PackinferRunArgs::default_value()) })
}

/// Plans one step for a context's device: copies the batch description, checks it, and builds
/// the work list. Needs no device work; `options` may be NULL for the defaults.
///
/// # Safety
/// `batch` must point to an initialized `PackinferBatchDesc` whose arrays have the lengths it
/// states; `options` NULL or initialized; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_plan_create(
    context: PackinferContext,
    batch: *const PackinferBatchDesc,
    options: *const PackinferPlanOptions,
    out: *mut PackinferPlan,
) -> PackinferStatus {
    guard("packinfer_plan_create", || {
        let backend = CONTEXTS.get(context.bits)?;
        // SAFETY: `batch` is initialized and its arrays have the lengths it states (this
        // function's contract).
        let (shape, batch) = unsafe { convert_batch(&super::options("batch", batch)?)? };
        // SAFETY: non-null `options` are initialized (this function's contract).
        let options = unsafe { plan_options(options)? };
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        if shape.dtype == DType::F32 && backend.kind() == BackendKind::Cuda {
            return Err(packinfer::unsupported!("dtype = F32 runs on the CPU backend only; the CUDA kernels take F16 and BF16"));
        }
        let profile = backend.profile_for(&shape, &batch);
        let plan = Plan::build(shape, batch, &profile, options)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferPlan { bits: PLANS.insert(PlanCell::new(plan))? }) }
    })
}

/// Plans another step into an existing plan, as `packinfer_plan_create` would, reusing the
/// plan's memory: once a plan has held a step as large, re-planning allocates nothing. An
/// engine keeps one plan (two on the CPU backend, alternately, see below) and calls this every
/// step, then `packinfer_launch_update`. The plan may come from `packinfer_plan_create` or
/// `packinfer_pool_plan_create` and may have any shape; `context` gives the device profile.
///
/// Launches made or updated from the plan are not affected: a CUDA launch computes the copy it
/// uploaded, and a CPU launch keeps the plan it executes (this call then plans into new memory
/// instead, so an engine on the CPU that wants no allocation alternates two plans). Calls on one
/// plan handle are serialised; planning one plan on one thread while another thread runs,
/// updates or creates launches from other plans needs no coordination.
///
/// After an error the plan is unchanged (bad handles, options or dtype are found first) or holds
/// an empty batch (no requests, no work): update it successfully before launching from it again.
///
/// # Safety
/// As for `packinfer_plan_create`: `batch` must point to an initialized `PackinferBatchDesc`
/// whose arrays have the lengths it states; `options` NULL or initialized.
#[no_mangle]
pub unsafe extern "C" fn packinfer_plan_update(
    context: PackinferContext,
    plan: PackinferPlan,
    batch: *const PackinferBatchDesc,
    options: *const PackinferPlanOptions,
) -> PackinferStatus {
    guard("packinfer_plan_update", || {
        let backend = CONTEXTS.get(context.bits)?;
        let cell = PLANS.get(plan.bits)?;
        // SAFETY: `batch` points to an initialized description (this function's contract).
        let b = unsafe { super::options("batch", batch)? };
        // SAFETY: non-null `options` are initialized (this function's contract).
        let options = unsafe { plan_options(options)? };
        let shape = batch_shape(&b)?;
        if shape.dtype == DType::F32 && backend.kind() == BackendKind::Cuda {
            return Err(packinfer::unsupported!("dtype = F32 runs on the CPU backend only; the CUDA kernels take F16 and BF16"));
        }
        cell.update(
            |p| {
                // The plan copies the page list itself, checking it in the same pass.
                p.rebuild_with_pages(
                    shape,
                    options.clone(),
                    // SAFETY: `b`'s arrays have the lengths it states (this function's contract).
                    |batch, spare| unsafe { fill_batch_but_pages(&b, batch, spare).map(|(_, pages)| pages) },
                    |shape, batch| backend.profile_for(shape, batch),
                )
            },
            || {
                // A launch on the CPU still executes this plan: plan the step into a new one.
                // SAFETY: as above.
                let (shape, batch) = unsafe { convert_batch(&b)? };
                let profile = backend.profile_for(&shape, &batch);
                Plan::build(shape, batch, &profile, options.clone())
            },
        )
    })
}

/// Destroys a plan. Launches made from it stay usable.
#[no_mangle]
pub extern "C" fn packinfer_plan_destroy(plan: PackinferPlan) -> PackinferStatus {
    guard("packinfer_plan_destroy", || PLANS.remove(plan.bits).map(drop))
}

/// Reports what the planner did.
///
/// # Safety
/// `stats` must point to a `PackinferPlanStats` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_plan_stats(plan: PackinferPlan, stats: *mut PackinferPlanStats) -> PackinferStatus {
    guard("packinfer_plan_stats", || {
        // SAFETY: `stats` points to a struct whose struct_size is set (this function's contract).
        unsafe { super::check_out("stats", stats)? };
        let plan = PLANS.get(plan.bits)?.get();
        let s = &plan.stats();
        let value = PackinferPlanStats {
            struct_size: std::mem::size_of::<PackinferPlanStats>(),
            num_requests: plan.requests.len() as u32,
            num_groups: s.num_groups,
            num_work_items: s.num_items,
            num_split_requests: s.num_split_requests,
            num_merge_rows: s.num_merge_rows,
            num_partial_slots: s.num_partial_slots,
            tile_utilization: s.tile_utilization,
            max_group_cost: s.max_group_cost,
            mean_group_cost: s.mean_group_cost,
            capacity: s.capacity,
            planning_time_us: s.planning_ns as f64 / 1e3,
            scratch_bytes: plan.scratch_bytes() as u64,
            max_worker_cost: s.max_worker_cost,
            mean_worker_cost: s.mean_worker_cost,
            num_partial_items: s.num_partial_items,
        };
        // SAFETY: as above.
        unsafe { super::write_versioned("stats", stats, value) }
    })
}

/// Binds a plan to a context: uploads the work list on `stream`, resolves kernels, binds (or
/// allocates, once) scratch and records an event that `packinfer_launch_query`/`_wait` use.
/// `options` may be NULL.
///
/// # Safety
/// `options` NULL or initialized; `out` writable; `stream` a CUstream of the context's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_create(
    context: PackinferContext,
    plan: PackinferPlan,
    options: *const PackinferLaunchOptions,
    stream: *mut c_void,
    out: *mut PackinferLaunch,
) -> PackinferStatus {
    // SAFETY: create_launch's contract is this function's.
    guard("packinfer_launch_create", || unsafe { create_launch(context, plan, options, None, stream, out) })
}

/// Sets `*done` to whether the launch's upload has completed (never blocks).
///
/// # Safety
/// `done` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_query(launch: PackinferLaunch, done: *mut bool) -> PackinferStatus {
    guard("packinfer_launch_query", || {
        let launch = LAUNCHES.get(launch.bits)?;
        if done.is_null() {
            return Err(invalid!("done is a null pointer"));
        }
        // SAFETY: `done` is writable (this function's contract).
        unsafe { write_out("done", done, launch.bound.is_ready()?) }
    })
}

/// Blocks until the launch's upload has completed.
#[no_mangle]
pub extern "C" fn packinfer_launch_wait(launch: PackinferLaunch) -> PackinferStatus {
    guard("packinfer_launch_wait", || LAUNCHES.get(launch.bits)?.bound.wait())
}

/// Destroys a launch (after the work it enqueued may still be running on the GPU: destroy it
/// only once the stream has passed the last `packinfer_run` that used it).
#[no_mangle]
pub extern "C" fn packinfer_launch_destroy(launch: PackinferLaunch) -> PackinferStatus {
    guard("packinfer_launch_destroy", || LAUNCHES.remove(launch.bits).map(drop))
}

/// Computes attention for one layer of the launched step. On CUDA it allocates nothing, waits
/// for nothing and launches a fixed set of kernels on `args->stream`, so it can be captured in
/// a CUDA graph. On the CPU it computes before returning.
///
/// # Safety
/// `args` must point to an initialized `PackinferRunArgs` whose pointers address tensors of the
/// launched plan's shape (device memory on CUDA, valid until the stream has run the work; the
/// K/V cache of the plan's `kv_dtype`, non-null per-head scale arrays of `num_kv_heads` floats),
/// and scratch lent in `PackinferLaunchOptions` must still be valid.
#[no_mangle]
pub unsafe extern "C" fn packinfer_run(launch: PackinferLaunch, args: *const PackinferRunArgs) -> PackinferStatus {
    guard("packinfer_run", || {
        let launch = LAUNCHES.get(launch.bits)?;
        // SAFETY: `args` points to an initialized struct (this function's contract).
        let a = unsafe { super::options("args", args)? };
        let shape = launch.bound.shape();
        let rows = |ptr: u64, st: i64, sh: i64, name: &str| -> Result<RowsTensor> {
            if st < 0 || sh < 0 {
                return Err(invalid!("{name} strides ({st}, {sh}) must not be negative"));
            }
            let sh = if sh == 0 { shape.head_dim as i64 } else { sh };
            let st = if st == 0 { shape.num_qo_heads as i64 * sh } else { st };
            Ok(RowsTensor { ptr, stride_token: st, stride_head: sh })
        };
        let kv = KvLayout {
            k: a.kv.k as u64,
            v: a.kv.v as u64,
            stride_page: a.kv.stride_page,
            stride_token: a.kv.stride_token,
            stride_head: a.kv.stride_head,
            stride_dim: a.kv.stride_dim,
        };
        let run = RunArgs {
            q: rows(a.q as u64, a.q_stride_token, a.q_stride_head, "q")?,
            kv,
            o: rows(a.o as u64, a.o_stride_token, a.o_stride_head, "o")?,
            lse: a.lse as u64,
            stream: a.stream as u64,
            logits_soft_cap: a.logits_soft_cap,
            kv_scales: KvScales {
                // In C a scale of 0 is "not set": 1.
                k_scale: if a.k_scale == 0.0 { 1.0 } else { a.k_scale },
                v_scale: if a.v_scale == 0.0 { 1.0 } else { a.v_scale },
                k_head_scales: a.k_head_scales as u64,
                v_head_scales: a.v_head_scales as u64,
            },
        };
        // SAFETY: this function's contract: the caller's pointers address tensors of the
        // launched plan's shape (and lent scratch outlives the launch, packinfer_launch_create).
        unsafe { launch.bound.run(&run) }
    })
}

/// Fills `layout` for a paged cache stored NHD: `[num_pages, page_size, num_kv_heads, head_dim]`
/// for K and for V (separate buffers, the FlashInfer/vLLM "NHD" layout).
///
/// # Safety
/// `layout` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_kv_layout_nhd(
    k: *const c_void,
    v: *const c_void,
    page_size: u32,
    num_kv_heads: u32,
    head_dim: u32,
    layout: *mut PackinferKvLayout,
) -> PackinferStatus {
    guard("packinfer_kv_layout_nhd", || {
        let (_, h, d, page) = layout_sizes(page_size, num_kv_heads, head_dim)?;
        // SAFETY: `layout` is writable (this function's contract).
        unsafe {
            write_out("layout", layout, PackinferKvLayout { k, v, stride_page: page, stride_token: h * d, stride_head: d, stride_dim: 1 })
        }
    })
}

/// Fills `layout` for a paged cache stored HND: `[num_pages, num_kv_heads, page_size, head_dim]`.
///
/// # Safety
/// `layout` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_kv_layout_hnd(
    k: *const c_void,
    v: *const c_void,
    page_size: u32,
    num_kv_heads: u32,
    head_dim: u32,
    layout: *mut PackinferKvLayout,
) -> PackinferStatus {
    guard("packinfer_kv_layout_hnd", || {
        let (p, _, d, page) = layout_sizes(page_size, num_kv_heads, head_dim)?;
        // SAFETY: `layout` is writable (this function's contract).
        unsafe {
            write_out("layout", layout, PackinferKvLayout { k, v, stride_page: page, stride_token: d, stride_head: p * d, stride_dim: 1 })
        }
    })
}

/// The sizes of a paged cache as strides: (page_size, heads, head_dim, elements per page), each
/// size at least 1 and a page's elements within `i64`.
fn layout_sizes(page_size: u32, num_kv_heads: u32, head_dim: u32) -> Result<(i64, i64, i64, i64)> {
    for (name, v) in [("page_size", page_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)] {
        if v == 0 {
            return Err(invalid!("{name} = 0; it must be at least 1"));
        }
    }
    let (p, h, d) = (page_size as i64, num_kv_heads as i64, head_dim as i64);
    let page = p.checked_mul(h).and_then(|x| x.checked_mul(d)).ok_or_else(|| {
        invalid!(
            "page_size = {page_size} × num_kv_heads = {num_kv_heads} × head_dim = {head_dim} elements per page overflow 64-bit strides"
        )
    })?;
    Ok((p, h, d, page))
}

/// Copies a C batch description into owned Rust data, checking the C-level facts (enum values,
/// null arrays); `Plan::build` checks the rest.
///
/// # Safety
/// `b`'s non-null arrays have the lengths it states (`packinfer_plan_create`'s contract).
unsafe fn convert_batch(b: &PackinferBatchDesc) -> Result<(Shape, Batch)> {
    let mut batch = Batch {
        qo_indptr: Vec::new(),
        kv_indptr: Vec::new(),
        kv_page_indices: Vec::new(),
        kv_last_page_len: Vec::new(),
        page_size: 0,
        num_pages: 0,
        prefix_groups: Vec::new(),
        custom_mask: Vec::new(),
        mask_indptr: Vec::new(),
    };
    // SAFETY: this function's contract is fill_batch's.
    let shape = unsafe { fill_batch(b, &mut batch, &mut Vec::new())? };
    Ok((shape, batch))
}

/// The shape of a C batch description, checking its dtypes.
fn batch_shape(b: &PackinferBatchDesc) -> Result<Shape> {
    let dtype = dtype_from_c(b.dtype).ok_or_else(|| invalid!("{}", not_a_dtype("batch->dtype", b.dtype)))?;
    let kv_dtype = kv_dtype_from_c("batch->kv_dtype", b.kv_dtype, dtype)?;
    let sm_scale = if b.sm_scale == 0.0 { Shape::default_sm_scale(b.head_dim) } else { b.sm_scale };
    Ok(Shape {
        num_qo_heads: b.num_qo_heads,
        num_kv_heads: b.num_kv_heads,
        head_dim: b.head_dim,
        dtype,
        kv_dtype,
        causal: b.causal,
        sm_scale,
    })
}
/// Copies `len` entries at `ptr` into `dst` (cleared first, its allocation kept where large
/// enough); no memory is OUT_OF_MEMORY, not an abort.
///
/// # Safety
/// `ptr` is NULL or addresses `len` readable entries.
unsafe fn copy_into<T: Copy>(name: &str, ptr: *const T, len: usize, dst: &mut Vec<T>) -> Result<()> {
    // SAFETY: NULL or `len` readable entries (this function's contract).
    let src = unsafe { slice(name, ptr, len)? };
    dst.clear();
    dst.try_reserve(len)
        .map_err(|_| Error::OutOfMemory(format!("no host memory to copy {name}: {len} entries of {} bytes", std::mem::size_of::<T>())))?;
    dst.extend_from_slice(src);
    Ok(())
}

/// Writes a C batch description over `batch` (every field), in its allocations where they are
/// large enough and taking prefix groups from `spare` first, checking the C-level facts (enum
/// values, null arrays); the planner checks the rest. Returns the shape.
///
/// # Safety
/// `b`'s non-null arrays have the lengths it states (`packinfer_plan_create`'s contract).
unsafe fn fill_batch(b: &PackinferBatchDesc, batch: &mut Batch, spare: &mut Vec<PrefixGroup>) -> Result<Shape> {
    // SAFETY: this function's contract is fill_batch_but_pages'.
    let (shape, pages) = unsafe { fill_batch_but_pages(b, batch, spare)? };
    // Room was reserved.
    batch.kv_page_indices.extend_from_slice(pages);
    Ok(shape)
}

/// [`fill_batch`] but for the page list, which it returns (null checked, its length
/// `kv_indptr[batch_size]`) for the caller to copy into `batch.kv_page_indices`, left empty
/// with room reserved for it (`Plan::rebuild_with_pages` checks the indices as it copies them).
///
/// # Safety
/// As for [`fill_batch`]; the list returned is the caller's, valid as long as its description.
unsafe fn fill_batch_but_pages<'b>(
    b: &'b PackinferBatchDesc,
    batch: &mut Batch,
    spare: &mut Vec<PrefixGroup>,
) -> Result<(Shape, &'b [i32])> {
    let n = b.batch_size as usize;
    let shape = batch_shape(b)?;
    // SAFETY: non-null arrays have the lengths the description states (this function's
    // contract; kv_page_indices has kv_indptr[batch_size]). So for every block below.
    unsafe { copy_into("batch->qo_indptr", b.qo_indptr, n + 1, &mut batch.qo_indptr)? };
    // SAFETY: as above.
    unsafe { copy_into("batch->kv_indptr", b.kv_indptr, n + 1, &mut batch.kv_indptr)? };
    let nnz = batch.kv_indptr[n];
    if nnz < 0 {
        return Err(invalid!("batch->kv_indptr[{n}] = {nnz} is negative"));
    }
    // SAFETY: as above.
    let pages = unsafe { slice("batch->kv_page_indices", b.kv_page_indices, nnz as usize)? };
    batch.kv_page_indices.clear();
    batch
        .kv_page_indices
        .try_reserve(pages.len())
        .map_err(|_| Error::OutOfMemory(format!("no host memory to copy batch->kv_page_indices: {} entries of 4 bytes", pages.len())))?;
    // SAFETY: as above.
    unsafe { copy_into("batch->kv_last_page_len", b.kv_last_page_len, n, &mut batch.kv_last_page_len)? };
    batch.page_size = b.page_size;
    batch.num_pages = b.num_pages;
    // SAFETY: as above.
    let groups = unsafe { slice("batch->prefix_groups", b.prefix_groups, b.num_prefix_groups as usize)? };
    spare.append(&mut batch.prefix_groups);
    batch
        .prefix_groups
        .try_reserve(groups.len())
        .map_err(|_| Error::OutOfMemory(format!("no host memory for batch->num_prefix_groups = {}", groups.len())))?;
    for (g, pg) in groups.iter().enumerate() {
        // SAFETY: as above: each group's members array has num_members entries.
        let members = unsafe { slice(&format!("batch->prefix_groups[{g}].members"), pg.members, pg.num_members as usize)? };
        if let Some((j, m)) = members.iter().enumerate().find(|(_, &m)| m < 0) {
            return Err(invalid!("batch->prefix_groups[{g}].members[{j}] = {m} is negative"));
        }
        let mut group = spare.pop().unwrap_or(PrefixGroup { prefix_len: 0, members: Vec::new() });
        group.prefix_len = pg.prefix_len;
        group.members.clear();
        group.members.try_reserve(members.len()).map_err(|_| {
            Error::OutOfMemory(format!("no host memory to copy batch->prefix_groups[{g}].members: {} entries", members.len()))
        })?;
        group.members.extend(members.iter().map(|&m| m as u32));
        batch.prefix_groups.push(group);
    }
    if b.mask_indptr.is_null() {
        batch.mask_indptr.clear();
        batch.custom_mask.clear();
    } else {
        // SAFETY: as above: a non-null mask_indptr has batch_size + 1 entries.
        unsafe { copy_into("batch->mask_indptr", b.mask_indptr, n + 1, &mut batch.mask_indptr)? };
        let bytes = batch.mask_indptr[n];
        if bytes < 0 {
            return Err(invalid!("batch->mask_indptr[{n}] = {bytes} is negative"));
        }
        // SAFETY: as above: custom_mask has mask_indptr[batch_size] bytes.
        unsafe { copy_into("batch->custom_mask", b.custom_mask, bytes as usize, &mut batch.custom_mask)? };
    }
    Ok((shape, pages))
}

/// The plan options a caller passed, or the defaults for NULL.
///
/// # Safety
/// `options` must be NULL or point to an initialized `PackinferPlanOptions`.
pub(super) unsafe fn plan_options(options: *const PackinferPlanOptions) -> Result<PlanOptions> {
    if options.is_null() {
        return Ok(PlanOptions::default());
    }
    // SAFETY: non-null and initialized (this function's contract).
    convert_plan_options(&unsafe { super::options("options", options)? })
}

pub(super) fn convert_plan_options(o: &PackinferPlanOptions) -> Result<PlanOptions> {
    super::check_known_flags("options->flags", o.flags, PackinferPlanFlags::ALL.iter().fold(0u32, |m, &f| m | f as u32))?;
    let has = |f: PackinferPlanFlags| o.flags & f as u32 != 0;
    let window_end = std::mem::offset_of!(PackinferPlanOptions, window_left) + std::mem::size_of::<u32>();
    if has(PackinferPlanFlags::SlidingWindow) && o.struct_size < window_end {
        return Err(invalid!(
            "options->flags has PACKINFER_PLAN_FLAGS_SLIDING_WINDOW but options->struct_size = {} ends before window_left (a struct of at least {window_end} bytes holds it)",
            o.struct_size
        ));
    }
    // In C, capacity 0 means automatic; negative or non-finite is the caller's mistake.
    let capacity = match o.capacity {
        0.0 => None,
        c if c.is_finite() && c > 0.0 => Some(c),
        c => return Err(invalid!("options->capacity = {c} must be 0 (automatic) or positive and finite")),
    };
    Ok(PlanOptions {
        deterministic: has(PackinferPlanFlags::Deterministic),
        packing: !has(PackinferPlanFlags::NoPacking),
        balancing: !has(PackinferPlanFlags::NoBalancing),
        prefix_sharing: !has(PackinferPlanFlags::NoPrefixSharing),
        split_kv: !has(PackinferPlanFlags::NoSplitKv),
        capacity,
        split_keys: if o.split_keys == 0 { 2048 } else { o.split_keys },
        window_left: if has(PackinferPlanFlags::SlidingWindow) { Some(o.window_left) } else { None },
    })
}

/// Compiles (or loads from the kernel cache) every kernel variant the context can need, so that
/// no launch pays compile time later. A no-op on the CPU backend.
#[no_mangle]
pub extern "C" fn packinfer_context_precompile(context: PackinferContext) -> PackinferStatus {
    guard("packinfer_context_precompile", || CONTEXTS.get(context.bits)?.precompile())
}

/// Times a few work shapes on the context's GPU and fits the planner's cost model; plans made
/// afterwards (and by later contexts sharing the kernel cache directory) use it. Takes about a
/// second; run it once per device and install, not per request. UNSUPPORTED on the CPU backend.
#[no_mangle]
pub extern "C" fn packinfer_context_calibrate(context: PackinferContext) -> PackinferStatus {
    guard("packinfer_context_calibrate", || CONTEXTS.get(context.bits)?.calibrate_profile().map(drop))
}

/// Like `packinfer_launch_create`, with buffers sized for `capacity` (device memory on CUDA,
/// host memory on the CPU), so that `packinfer_launch_update` can upload later plans into the
/// same launch. `options` may be NULL.
///
/// On CUDA the launch's kernel is chosen here, from `plan`, and kept for every later plan (a
/// captured graph holds it): the warp-specialised kernel where `plan`'s prompts are long over
/// consecutive pages, else the plain 8-warp kernel (a capacity launch never takes the 4-warp or
/// short-prefill kernels). Later plans compute correctly on it, but an engine whose steps differ
/// in kind (long prefills, decode-heavy steps) keeps one launch per kind for the best kernel.
///
/// # Safety
/// `options` NULL or initialized; `capacity` initialized; `out` writable; `stream` a CUstream of
/// the context's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_create_with_capacity(
    context: PackinferContext,
    plan: PackinferPlan,
    options: *const PackinferLaunchOptions,
    capacity: *const PackinferLaunchCapacity,
    stream: *mut c_void,
    out: *mut PackinferLaunch,
) -> PackinferStatus {
    guard("packinfer_launch_create_with_capacity", || {
        // SAFETY: `capacity` points to an initialized struct (this function's contract).
        let c = unsafe { super::options("capacity", capacity)? };
        let capacity = backend::LaunchCapacity {
            items: c.max_work_items,
            row_segments: c.max_row_segments,
            kv_chunks: c.max_kv_chunks,
            requests: c.max_requests,
            pages: c.max_pages,
            merge_rows: c.max_merge_rows,
            merge_slots: c.max_merge_slots,
            groups: c.max_groups,
            partial_slots: c.max_partial_slots,
            mask_bytes: c.max_custom_mask_bytes,
            mask_queries: c.max_masked_query_tokens,
        };
        // SAFETY: create_launch's contract is this function's.
        unsafe { create_launch(context, plan, options, Some(capacity), stream, out) }
    })
}

/// The body of both launch constructors: a launch sized for its own plan, or for `capacity`.
///
/// # Safety
/// `options` NULL or initialized; `out` writable (`packinfer_launch_create`'s contract).
unsafe fn create_launch(
    context: PackinferContext,
    plan: PackinferPlan,
    options: *const PackinferLaunchOptions,
    capacity: Option<backend::LaunchCapacity>,
    stream: *mut c_void,
    out: *mut PackinferLaunch,
) -> Result<()> {
    let backend = CONTEXTS.get(context.bits)?;
    let plan = PLANS.get(plan.bits)?.get();
    let scratch = if options.is_null() {
        None
    } else {
        // SAFETY: non-null `options` are initialized (this function's contract).
        let o = unsafe { super::options("options", options)? };
        (!o.scratch.is_null() || o.scratch_bytes != 0).then_some(Scratch { ptr: o.scratch as u64, bytes: o.scratch_bytes })
    };
    if out.is_null() {
        return Err(invalid!("out is a null pointer"));
    }
    let bound = match capacity {
        None => backend.bind(plan, stream as u64, scratch)?,
        Some(c) => backend.bind_with_capacity(plan, stream as u64, scratch, &c)?,
    };
    // SAFETY: `out` is writable (this function's contract).
    unsafe { write_out("out", out, PackinferLaunch { bits: LAUNCHES.insert(Launch { bound, _backend: backend })? }) }
}

/// Uploads `plan` (same shape and page size as the launch's, within its capacity) into the
/// launch's buffers on `stream` and re-records its completion event. Later `packinfer_run`s,
/// and CUDA graphs that captured them, compute the new plan. Queue it on the stream that runs the launch.
/// On CUDA it waits for nothing and allocates nothing in steady state: the plan is written into
/// a page-locked image and copied with one async copy, ordered after the runs already enqueued.
///
/// # Safety
/// `stream` a CUstream of the context's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_update(launch: PackinferLaunch, plan: PackinferPlan, stream: *mut c_void) -> PackinferStatus {
    guard("packinfer_launch_update", || {
        let launch = LAUNCHES.get(launch.bits)?;
        let plan = PLANS.get(plan.bits)?.get();
        // SAFETY: a plan handle's plan was made by the planner (packinfer_plan_create and
        // _update, packinfer_pool_plan_create) and the C API never writes to it afterwards.
        unsafe { launch.bound.update_planned(plan, stream as u64) }
    })
}

/// Sets `*suits` to whether `packinfer_launch_update` would take `plan` into `launch` (same
/// shape and page size, within the launch's capacity) and run it on the kernel a launch created
/// for it the way this one was would choose. On CUDA a launch keeps the kernel of its first plan
/// (see `packinfer_launch_create_with_capacity`): an engine whose steps differ in kind keeps one
/// launch per kind, updates one that suits and creates one where none does. Never blocks.
///
/// # Safety
/// `suits` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_launch_suits(launch: PackinferLaunch, plan: PackinferPlan, suits: *mut bool) -> PackinferStatus {
    guard("packinfer_launch_suits", || {
        let launch = LAUNCHES.get(launch.bits)?;
        let plan = PLANS.get(plan.bits)?.get();
        if suits.is_null() {
            return Err(invalid!("suits is a null pointer"));
        }
        // SAFETY: `suits` is writable (this function's contract).
        unsafe { write_out("suits", suits, launch.bound.suits(&plan)) }
    })
}
