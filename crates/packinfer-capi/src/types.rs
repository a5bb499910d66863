//! The C structs and enums of the ABI. Every options struct starts with `struct_size`.

use std::ffi::{c_char, c_void};

/// Which backend a context runs on.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferBackend {
    /// CUDA when a driver, NVRTC and the device are present, else the CPU.
    Auto = 0,
    /// Host threads.
    Cpu = 1,
    /// A CUDA device; NO_DEVICE where none is usable.
    Cuda = 2,
}

/// Element type of Q, K, V and O (accumulation is always fp32).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferDtype {
    /// IEEE half precision.
    F16 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// CPU backend only.
    F32 = 2,
    /// fp8 e4m3 (E4M3FN: bias 7, no infinities, NaN = S.1111.111, largest value 448), for K and
    /// V only (`PackinferBatchDesc::kv_dtype`, `PackinferPoolOptions::kv_dtype`), dequantized
    /// with the scales of `PackinferRunArgs`. Both backends run it (CUDA: the plain kernel's fp8
    /// variant). Added in ABI 1's third release.
    Fp8E4m3 = 3,
}

/// The element type a C struct's `PackinferDtype` field names; `None` for any other value.
pub(crate) fn dtype_from_c(value: u32) -> Option<packinfer::types::DType> {
    use packinfer::types::DType;
    match value {
        v if v == PackinferDtype::F16 as u32 => Some(DType::F16),
        v if v == PackinferDtype::Bf16 as u32 => Some(DType::Bf16),
        v if v == PackinferDtype::F32 as u32 => Some(DType::F32),
        v if v == PackinferDtype::Fp8E4m3 as u32 => Some(DType::Fp8E4m3),
        _ => None,
    }
}

/// The message for a `field` holding `value`, which is no `PackinferDtype`.
pub(crate) fn not_a_dtype(field: &str, value: u32) -> String {
    format!("{field} = {value} is not a PackinferDtype (0 = F16, 1 = BF16, 2 = F32, 3 = FP8_E4M3)")
}

/// The K/V element type a C struct's `kv_dtype` field names, for Q's `dtype`: 0 (what a
/// zeroed or older struct holds) or `dtype` itself mean K and V have `dtype`.
pub(crate) fn kv_dtype_from_c(
    field: &str,
    value: u32,
    dtype: packinfer::types::DType,
) -> packinfer::error::Result<packinfer::types::DType> {
    if value == 0 {
        return Ok(dtype);
    }
    dtype_from_c(value).ok_or_else(|| packinfer::invalid!("{}", not_a_dtype(field, value)))
}

/// Opaque handle to a context (a backend on one device). 0 is never a valid handle, and a
/// destroyed handle's value is never handed out again.
///
/// Threads: any thread may use a context, concurrently too. Every call that touches the device
/// makes the context's CUDA context current itself, so a caller may hop OS threads between calls.
/// Destroying it while another thread still calls with it is safe (those calls either finish or
/// get INVALID_HANDLE); plans, launches and pools made on it stay usable.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackinferContext {
    /// The handle's value (a type tag and a serial number); 0 is never a handle.
    pub bits: u64,
}

/// Opaque handle to a plan: the host-side schedule of one step.
///
/// Threads: any thread may use a plan, concurrently too. It changes only through
/// `packinfer_plan_update` (calls on one plan are serialised); launches made or updated from it
/// are not affected. Planning the next step on one thread while another runs the current step's
/// layers needs no coordination: call `packinfer_launch_update` after the current step's last
/// `packinfer_run` is enqueued and before the next step's first.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackinferPlan {
    /// The handle's value (a type tag and a serial number); 0 is never a handle.
    pub bits: u64,
}

/// Opaque handle to a launch: a plan bound to a context, ready to run every layer of the step.
///
/// Threads: any thread may call with a launch; the library orders calls on one launch. A launch
/// has one work list, group counter and scratch on the device, so its runs and updates must not
/// overlap there: on the CPU each run completes before the call returns; on CUDA a run or update
/// on another stream than the launch's previous one is ordered after it with an event, except
/// while either stream is being captured into a graph (replays of a captured graph are ordered
/// by the stream the caller replays it on). Destroy a launch only once its last run has finished
/// on the device. `packinfer_launch_update` never waits for the device: it writes the plan into
/// one of the launch's page-locked images whose last copy has run and enqueues one async copy
/// (only a host four updates ahead of the device waits for the oldest copy).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackinferLaunch {
    /// The handle's value (a type tag and a serial number); 0 is never a handle.
    pub bits: u64,
}

/// How to create a context.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferContextOptions {
    /// sizeof(PackinferContextOptions).
    pub struct_size: usize,
    /// A `PackinferBackend` value (a plain integer so that a bad value is refused, not undefined).
    pub backend: u32,
    /// CUDA device ordinal.
    pub device_ordinal: u32,
    /// Worker threads of the CPU backend; 0 = one per core.
    pub num_threads: u32,
    /// Directory for compiled kernels; NULL = $PACKINFER_CACHE_DIR, else ~/.cache/packinfer.
    pub kernel_cache_dir: *const c_char,
}

/// What a context turned out to be.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferContextInfo {
    /// sizeof(PackinferContextInfo).
    pub struct_size: usize,
    /// PACKINFER_BACKEND_CPU or PACKINFER_BACKEND_CUDA (never AUTO).
    pub backend: u32,
    /// CPU threads, or the device's SM count.
    pub num_workers: u32,
    /// NUL-terminated device name ("cpu" on the CPU backend).
    pub device_name: [c_char; 128],
}

/// Requests `members[0..num_members]` share their first `prefix_len` keys (same content); the
/// prefix is read once, from the first member's pages, for all of them. Frozen: this struct has
/// no `struct_size` and does not change within ABI version 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferPrefixGroup {
    /// Keys the members share.
    pub prefix_len: u32,
    /// Entries of `members` (at least 2).
    pub num_members: u32,
    /// Indices of requests of the batch, each in at most one group.
    pub members: *const i32,
}

/// One engine step: the batch's shape and its CSR page tables (FlashInfer's convention). All
/// arrays are copied during `packinfer_plan_create`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferBatchDesc {
    /// sizeof(PackinferBatchDesc).
    pub struct_size: usize,
    /// Requests in the step.
    pub batch_size: u32,
    /// `[batch_size + 1]`: request i's queries are tokens `qo_indptr[i] .. qo_indptr[i+1]`.
    pub qo_indptr: *const i32,
    /// `[batch_size + 1]`: request i's pages are `kv_page_indices[kv_indptr[i] .. kv_indptr[i+1]]`.
    pub kv_indptr: *const i32,
    /// `[kv_indptr[batch_size]]`: page numbers in the cache.
    pub kv_page_indices: *const i32,
    /// `[batch_size]`: tokens in each request's last page (1..=page_size; 0 for a request with no pages).
    pub kv_last_page_len: *const i32,
    /// Tokens per page; any size, 1 included.
    pub page_size: u32,
    /// Pages in the cache; every page index must be below it.
    pub num_pages: u32,
    /// Query heads (a multiple of num_kv_heads).
    pub num_qo_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// A `PackinferDtype` value.
    pub dtype: u32,
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// 0 = 1/sqrt(head_dim).
    pub sm_scale: f32,
    /// Entries of `prefix_groups`.
    pub num_prefix_groups: u32,
    /// Requests sharing a prefix; NULL when num_prefix_groups is 0.
    pub prefix_groups: *const PackinferPrefixGroup,
    /// Custom masks (tree speculative decoding), bit-packed as FlashInfer packs them: request
    /// i's mask is the bytes `custom_mask[mask_indptr[i] .. mask_indptr[i+1]]`, holding its
    /// q_len × kv_len bits row-major (query a, key b is bit a·kv_len + b) and little-endian
    /// within each byte (bit c of byte B is bit 8·B + c), padded to whole bytes. A set bit lets
    /// the query see the key. With a mask the causal mask is NOT applied (`causal` is ignored;
    /// the mask replaces it, as in FlashInfer); the sliding window and the soft-cap still apply.
    /// A query whose every key is masked gets O = 0 and LSE = -inf. Keys a mask hides from all
    /// of a tile's queries are not read. NULL when `mask_indptr` is NULL. Both backends
    /// apply custom masks (CUDA: up to 2^32 mask bits; a launch made with a
    /// capacity needs room for them, `PackinferLaunchCapacity::max_custom_mask_bytes`). Added in
    /// ABI 1's second release: an older struct means no mask.
    pub custom_mask: *const u8,
    /// NULL (no custom mask) or `[batch_size + 1]` byte offsets into `custom_mask`, from 0;
    /// request i's segment holds exactly ceil(q_len × kv_len / 8) bytes.
    pub mask_indptr: *const i32,
    /// Element type of the K/V cache: 0 or `dtype` for K and V of Q's dtype;
    /// PACKINFER_DTYPE_FP8_E4M3 for an fp8 cache, whose elements are dequantized with the
    /// scales each run is given (`PackinferRunArgs::k_scale` etc.); Q and O stay `dtype`
    /// (F16 or BF16; F32 on the CPU). Fixed at plan time (element strides of the cache are then
    /// in bytes). Both backends run fp8 caches. Added in ABI 1's third release: an older struct
    /// means K/V of `dtype`.
    pub kv_dtype: u32,
}

/// Bits of `PackinferPlanOptions::flags`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferPlanFlags {
    /// Fixed split boundaries: a request's output does not depend on the rest of the batch.
    Deterministic = 1,
    /// Ablation: one request per tile.
    NoPacking = 2,
    /// Ablation: one group per request, no load balancing.
    NoBalancing = 4,
    /// Ablation: read shared prefixes once per member.
    NoPrefixSharing = 8,
    /// Ablation: never split a request's keys.
    NoSplitKv = 16,
    /// Sliding-window attention: each query sees only the `window_left` keys before its own
    /// position (and, causal, its own); see `PackinferPlanOptions::window_left`.
    SlidingWindow = 32,
}

impl PackinferPlanFlags {
    pub(crate) const ALL: [PackinferPlanFlags; 6] =
        [Self::Deterministic, Self::NoPacking, Self::NoBalancing, Self::NoPrefixSharing, Self::NoSplitKv, Self::SlidingWindow];
}

/// How the planner may schedule.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferPlanOptions {
    /// sizeof(PackinferPlanOptions).
    pub struct_size: usize,
    /// OR of PackinferPlanFlags.
    pub flags: u32,
    /// Split granularity in keys for deterministic mode; 0 = 2048.
    pub split_keys: u32,
    /// Capacity in cost units (pieces costing more are split; a prefix group or short request
    /// within it stays on one CTA); 0 = chosen from the device and the batch; negative or
    /// non-finite is INVALID_ARGUMENT.
    pub capacity: f64,
    /// With PACKINFER_PLAN_FLAGS_SLIDING_WINDOW (ignored without it): the sliding window,
    /// FlashInfer's `window_left`. Query i of a request of q_len queries and kv_len keys sits at
    /// position p = kv_len - q_len + i and sees keys p - window_left .. p (causal) or
    /// p - window_left .. kv_len - 1 (not causal), from key 0 at the least. Fixed at plan time:
    /// the plan reads no key outside the window. A model whose layers have different windows
    /// (Gemma 2: local and global layers) makes one plan per window. Added in ABI 1's second
    /// release: an older struct means no window.
    pub window_left: u32,
}

/// What the planner did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PackinferPlanStats {
    /// sizeof(PackinferPlanStats).
    pub struct_size: usize,
    /// Requests of the step.
    pub num_requests: u32,
    /// Execution groups.
    pub num_groups: u32,
    /// Work items (tiles).
    pub num_work_items: u32,
    /// Requests whose keys were split into several pieces.
    pub num_split_requests: u32,
    /// (token, head) rows merged from pieces.
    pub num_merge_rows: u32,
    /// Partial rows the pieces write.
    pub num_partial_slots: u32,
    /// Real (row, visible key) pairs / (row, key) pairs computed, in (0, 1].
    pub tile_utilization: f64,
    /// Cost of the costliest group, in cost units.
    pub max_group_cost: f64,
    /// Mean cost of a group.
    pub mean_group_cost: f64,
    /// The capacity the plan was made with.
    pub capacity: f64,
    /// Time spent planning.
    pub planning_time_us: f64,
    /// Bytes of fp32 scratch the plan's split partials need.
    pub scratch_bytes: u64,
    /// Load of the busiest CTA (worker) when workers take groups in order, and the mean over
    /// all the device's workers, in the profile's cost units.
    pub max_worker_cost: f64,
    /// See max_worker_cost.
    pub mean_worker_cost: f64,
    /// Work items that write partial slots (split pieces, prefix tiles, prefix members' suffixes).
    pub num_partial_items: u32,
}

/// Binding options of a launch.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferLaunchOptions {
    /// sizeof(PackinferLaunchOptions).
    pub struct_size: usize,
    /// Caller-owned scratch of at least the plan's scratch_bytes (device memory on CUDA), valid
    /// until the launch is destroyed; NULL = the launch allocates it once, at creation.
    pub scratch: *mut c_void,
    /// Size of `scratch` in bytes.
    pub scratch_bytes: usize,
}

/// Where K and V live: element (page p, token t, kv head h, dim d) of K is at
/// `k + p*stride_page + t*stride_token + h*stride_head + d*stride_dim` (in elements). Frozen:
/// this struct has no `struct_size` and does not change within ABI version 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferKvLayout {
    /// Address of K.
    pub k: *const c_void,
    /// Address of V.
    pub v: *const c_void,
    /// Elements between pages.
    pub stride_page: i64,
    /// Elements between the tokens of a page.
    pub stride_token: i64,
    /// Elements between KV heads.
    pub stride_head: i64,
    /// Elements between dims (1 for the fast paths).
    pub stride_dim: i64,
}

/// One layer's tensors for `packinfer_run`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferRunArgs {
    /// sizeof(PackinferRunArgs).
    pub struct_size: usize,
    /// [total_q, num_qo_heads, head_dim]; strides in elements, 0 = contiguous.
    pub q: *const c_void,
    /// Q's token stride.
    pub q_stride_token: i64,
    /// Q's head stride.
    pub q_stride_head: i64,
    /// The K/V cache the plan's page indices point into.
    pub kv: PackinferKvLayout,
    /// [total_q, num_qo_heads, head_dim], same dtype as Q; strides in elements, 0 = contiguous.
    pub o: *mut c_void,
    /// O's token stride.
    pub o_stride_token: i64,
    /// O's head stride.
    pub o_stride_head: i64,
    /// Optional float32 [total_q, num_qo_heads], natural log; NULL = not written.
    pub lse: *mut f32,
    /// cudaStream_t / CUstream to run on (ignored by the CPU backend); NULL = the default stream.
    pub stream: *mut c_void,
    /// Logit soft-cap (Gemma 2): each score s = sm_scale * q.k becomes cap * tanh(s / cap)
    /// before the softmax; 0 = off; negative or non-finite is INVALID_ARGUMENT. A run
    /// parameter: every run uses the value it is given (the plan fixes nothing about it), so
    /// layers with different caps share one plan. Added in ABI 1's second release: an older
    /// struct means no soft-cap.
    pub logits_soft_cap: f32,
    // The pointers come first: a second-release struct ends with 4 bytes of padding after
    // logits_soft_cap, which its caller may leave uninitialized, so no field may start there.
    /// For an fp8 cache (`PackinferBatchDesc::kv_dtype` = PACKINFER_DTYPE_FP8_E4M3): NULL, or
    /// `num_kv_heads` float scales of K, one per KV head, in device memory on CUDA (host memory
    /// on the CPU), read by each run (a captured CUDA graph reads their values at replay).
    /// Element x of KV head h of K is `e4m3(x) × k_scale × k_head_scales[h]` (1 where NULL).
    /// Positive and finite (not checked: the caller's memory). Must be NULL for a cache of Q's
    /// dtype. Added in ABI 1's third release, like the fields below: an older struct means no
    /// scales (1).
    pub k_head_scales: *const f32,
    /// As `k_head_scales`, for V.
    pub v_head_scales: *const f32,
    /// K's per-tensor scale (vLLM's and FlashInfer's `k_scale`: one per layer, so a run
    /// parameter): 0 = 1; negative or non-finite is INVALID_ARGUMENT; 0 or 1 for a cache of Q's
    /// dtype. A captured CUDA graph replays the value of its capture.
    pub k_scale: f32,
    /// As `k_scale`, for V.
    pub v_scale: f32,
}

/// Sizes of a launch's device buffers, so that `packinfer_launch_update` can later upload any
/// plan that fits (and a CUDA graph captured around `packinfer_run` replays it). Each field is
/// raised to the first plan's own count, so 0 means "the first plan's count". The CPU backend
/// sizes its host scratch for it and refuses an update over it, as CUDA does.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PackinferLaunchCapacity {
    /// sizeof(PackinferLaunchCapacity).
    pub struct_size: usize,
    /// Work items.
    pub max_work_items: u32,
    /// Row segments.
    pub max_row_segments: u32,
    /// KV chunks.
    pub max_kv_chunks: u32,
    /// Requests.
    pub max_requests: u32,
    /// Entries of kv_page_indices.
    pub max_pages: u32,
    /// Merge rows.
    pub max_merge_rows: u32,
    /// Entries of the merge slot list.
    pub max_merge_slots: u32,
    /// Execution groups.
    pub max_groups: u32,
    /// Partial slots (they size the scratch).
    pub max_partial_slots: u32,
    /// Bytes of custom mask (`custom_mask` of the batch description). Added in ABI 1's second
    /// release: an older struct means the first plan's.
    pub max_custom_mask_bytes: u32,
    /// Query tokens of a step that carries a custom mask. Added in ABI 1's second release.
    pub max_masked_query_tokens: u32,
}

super::versioned!(
    PackinferContextOptions,
    PackinferContextOptions {
        struct_size: std::mem::size_of::<PackinferContextOptions>(),
        backend: PackinferBackend::Auto as u32,
        device_ordinal: 0,
        num_threads: 0,
        kernel_cache_dir: std::ptr::null(),
    },
    [backend, device_ordinal, num_threads, kernel_cache_dir]
);

super::versioned!(
    PackinferContextInfo,
    PackinferContextInfo { struct_size: std::mem::size_of::<PackinferContextInfo>(), backend: 0, num_workers: 0, device_name: [0; 128] },
    [backend, num_workers, device_name]
);

super::versioned!(
    PackinferBatchDesc,
    PackinferBatchDesc {
        struct_size: std::mem::size_of::<PackinferBatchDesc>(),
        batch_size: 0,
        qo_indptr: std::ptr::null(),
        kv_indptr: std::ptr::null(),
        kv_page_indices: std::ptr::null(),
        kv_last_page_len: std::ptr::null(),
        page_size: 16,
        num_pages: 0,
        num_qo_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        dtype: PackinferDtype::Bf16 as u32,
        causal: true,
        sm_scale: 0.0,
        num_prefix_groups: 0,
        prefix_groups: std::ptr::null(),
        custom_mask: std::ptr::null(),
        mask_indptr: std::ptr::null(),
        kv_dtype: 0,
    },
    [
        batch_size,
        qo_indptr,
        kv_indptr,
        kv_page_indices,
        kv_last_page_len,
        page_size,
        num_pages,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        dtype,
        causal,
        sm_scale,
        num_prefix_groups,
        prefix_groups
    ]
    [custom_mask, mask_indptr, kv_dtype]
);

super::versioned!(
    PackinferPlanOptions,
    PackinferPlanOptions {
        struct_size: std::mem::size_of::<PackinferPlanOptions>(),
        flags: 0,
        split_keys: 0,
        capacity: 0.0,
        window_left: 0
    },
    [flags, split_keys, capacity][window_left]
);

super::versioned!(
    PackinferPlanStats,
    PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() },
    [
        num_requests,
        num_groups,
        num_work_items,
        num_split_requests,
        num_merge_rows,
        num_partial_slots,
        tile_utilization,
        max_group_cost,
        mean_group_cost,
        capacity,
        planning_time_us,
        scratch_bytes
    ]
    [max_worker_cost, mean_worker_cost, num_partial_items]
);

super::versioned!(
    PackinferLaunchOptions,
    PackinferLaunchOptions { struct_size: std::mem::size_of::<PackinferLaunchOptions>(), scratch: std::ptr::null_mut(), scratch_bytes: 0 },
    [scratch, scratch_bytes]
);

super::versioned!(
    PackinferRunArgs,
    PackinferRunArgs {
        struct_size: std::mem::size_of::<PackinferRunArgs>(),
        q: std::ptr::null(),
        q_stride_token: 0,
        q_stride_head: 0,
        kv: PackinferKvLayout { k: std::ptr::null(), v: std::ptr::null(), stride_page: 0, stride_token: 0, stride_head: 0, stride_dim: 0 },
        o: std::ptr::null_mut(),
        o_stride_token: 0,
        o_stride_head: 0,
        lse: std::ptr::null_mut(),
        stream: std::ptr::null_mut(),
        logits_soft_cap: 0.0,
        k_head_scales: std::ptr::null(),
        v_head_scales: std::ptr::null(),
        k_scale: 0.0,
        v_scale: 0.0,
    },
    [q, q_stride_token, q_stride_head, kv, o, o_stride_token, o_stride_head, lse, stream][
        logits_soft_cap,
        k_head_scales,
        v_head_scales,
        k_scale,
        v_scale
    ]
);

super::versioned!(
    PackinferLaunchCapacity,
    PackinferLaunchCapacity { struct_size: std::mem::size_of::<PackinferLaunchCapacity>(), ..Default::default() },
    [
        max_work_items,
        max_row_segments,
        max_kv_chunks,
        max_requests,
        max_pages,
        max_merge_rows,
        max_merge_slots,
        max_groups,
        max_partial_slots
    ][max_custom_mask_bytes, max_masked_query_tokens]
);
