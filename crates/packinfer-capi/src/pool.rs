//! The C ABI of the managed KV pool (`src/kv`): create a pool on a context, manage sequences,
//! write a step's K/V, plan a step from the pool, keep groups contiguous, read metrics.

use std::ffi::c_void;

use super::api::{CONTEXTS, PLANS};
use super::handles::Registry;
use super::types::{
    dtype_from_c, kv_dtype_from_c, not_a_dtype, PackinferContext, PackinferDtype, PackinferKvLayout, PackinferPlan, PackinferPlanOptions,
};
use super::{guard, options, slice, write_out, PackinferStatus};
use packinfer::error::Result;
use packinfer::invalid;
use packinfer::kv::{groups_of_plan, KvPool, PoolConfig, RelayoutReport, SeqId};
use packinfer::types::Shape;

pub(super) static POOLS: Registry<KvPool> = Registry::new(0xD1, "pool");

/// Opaque handle to a KV pool: KV memory owned by the library, cut into pages shared by sequences.
///
/// Threads: any thread may call with a pool, concurrently too; every call takes the pool's lock.
/// The device copies a call enqueues (copy-on-write, write_kv, relayout) go on the stream it is
/// given: keep them on the stream of the runs that read the pool, or order the two yourself.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackinferPool {
    /// The handle's value (a type tag and a serial number); 0 is never a handle.
    pub bits: u64,
}

/// How to create a KV pool. The model's attention shape is given once here, so a step's plan
/// needs only the batch. Memory is `num_layers × 2 (K, V) × num_pages × page_size × num_kv_heads
/// × head_dim` elements, allocated once.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferPoolOptions {
    /// sizeof(PackinferPoolOptions).
    pub struct_size: usize,
    /// Layers the pool holds K and V for.
    pub num_layers: u32,
    /// Query heads of the model (plans made from the pool use them).
    pub num_qo_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// A `PackinferDtype` value.
    pub dtype: u32,
    /// Bottom-right aligned causal mask for plans made from the pool.
    pub causal: bool,
    /// 0 = 1/sqrt(head_dim).
    pub sm_scale: f32,
    /// Tokens per page (default 16).
    pub page_size: u32,
    /// Capacity in pages; 0 = as many as fit in capacity_bytes.
    pub num_pages: u32,
    /// Capacity in bytes, used when num_pages is 0.
    pub capacity_bytes: u64,
    /// δ: empty pages kept after each member of a laid-out group for its next tokens (default 2).
    pub headroom_pages: u32,
    // The pointer comes first: a struct of the first release ends with 4 bytes of padding after
    // headroom_pages, which its caller may leave uninitialized, so no field may start there.
    /// For an fp8 pool: NULL (every scale 1), or `num_layers × 2 × num_kv_heads` positive
    /// finite floats in host memory, `[layer][K, V][kv head]`, copied at creation and fixed for
    /// the pool's life (the values it stores depend on them). Must be NULL for a pool of Q's
    /// dtype. Added in ABI 1's third release, like `kv_dtype`.
    pub kv_head_scales: *const f32,
    /// Element type the pool stores K and V in: 0 or `dtype` for Q's dtype (an older struct
    /// means that); PACKINFER_DTYPE_FP8_E4M3 for fp8, one byte per element (the stats' bytes
    /// count it so): `packinfer_pool_write_kv` takes rows of `dtype` and stores each element x of
    /// KV head h as e4m3(x / scale) with the layer's scale of h, rounded to nearest even and
    /// saturated to ±448, and runs read them back through the scales
    /// `packinfer_pool_kv_scales` gives. On the CUDA backend the conversion is a kernel that
    /// gives the CPU's bytes exactly.
    pub kv_dtype: u32,
}

/// A pool's metrics.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PackinferPoolStats {
    /// sizeof(PackinferPoolStats).
    pub struct_size: usize,
    /// Pages of the pool.
    pub num_pages: u32,
    /// Pages some sequence holds (its tokens or headroom).
    pub pages_used: u32,
    /// Pages no sequence holds.
    pub pages_free: u32,
    /// Live sequences.
    pub num_sequences: u32,
    /// Sum of the sequences' lengths (a shared token counts once per sequence).
    pub tokens_logical: u64,
    /// Distinct tokens stored (a shared page's tokens count once).
    pub tokens_stored: u64,
    /// Internal fragmentation: slots of used pages that hold no token (partial pages, headroom).
    pub slots_reserved_unused: u64,
    /// KV bytes (all layers, K and V) the last plan made from the pool reads with each shared
    /// prefix read once per prefix group ...
    pub step_read_bytes_shared: u64,
    /// ... and with every request reading all of its keys.
    pub step_read_bytes_unshared: u64,
    /// Relayouts that moved pages, and how many pages and bytes they moved in total.
    pub relayouts: u64,
    /// See relayouts.
    pub relayout_pages_moved: u64,
    /// See relayouts.
    pub relayout_bytes_moved: u64,
    /// Pages copied on write (a fork's partly covered page, an append into a shared page).
    pub cow_page_copies: u64,
}

/// What one `packinfer_pool_relayout` did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PackinferRelayoutReport {
    /// sizeof(PackinferRelayoutReport).
    pub struct_size: usize,
    /// Groups given.
    pub groups: u32,
    /// Groups already contiguous, or not due for a rebuild.
    pub groups_in_place: u32,
    /// Groups whose pages were moved into one run.
    pub groups_rebuilt: u32,
    /// Groups due for a rebuild that found no free run of pages; left as they were.
    pub groups_no_room: u32,
    /// Pages copied.
    pub pages_moved: u64,
    /// Bytes those copies moved (every layer, K and V).
    pub bytes_moved: u64,
}

/// Fills `options` with defaults: page_size 16, headroom 2 pages, BF16, causal; the model's
/// shape and the capacity are left 0 and must be set.
///
/// # Safety
/// `options` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_options_default(options: *mut PackinferPoolOptions) -> PackinferStatus {
    // SAFETY: `options` is NULL or writable (this function's contract).
    guard("packinfer_pool_options_default", || unsafe {
        write_out("options", options, <PackinferPoolOptions as super::Versioned>::default_value())
    })
}

/// Creates a KV pool on a context's backend, allocating all of its memory now: host memory on
/// the CPU backend, one zeroed device allocation on the CUDA backend (which takes F16/BF16 K/V
/// and head_dim 64/96/128/192/256 only, as its attention kernels do, K/V stored as Q's dtype or
/// fp8; anything else is UNSUPPORTED). An fp8 pool keeps its scales after its pages.
///
/// # Safety
/// `options` must point to an initialized `PackinferPoolOptions` whose non-null
/// `kv_head_scales` has `num_layers × 2 × num_kv_heads` entries; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_create(
    context: PackinferContext,
    options: *const PackinferPoolOptions,
    out: *mut PackinferPool,
) -> PackinferStatus {
    guard("packinfer_pool_create", || {
        let backend = CONTEXTS.get(context.bits)?;
        // SAFETY: `options` points to an initialized struct (this function's contract).
        let o = unsafe { super::options("options", options)? };
        let dtype = dtype_from_c(o.dtype).ok_or_else(|| invalid!("{}", not_a_dtype("options->dtype", o.dtype)))?;
        let kv_dtype = kv_dtype_from_c("options->kv_dtype", o.kv_dtype, dtype)?;
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        let mut config = PoolConfig {
            num_layers: o.num_layers,
            shape: Shape {
                num_qo_heads: o.num_qo_heads,
                num_kv_heads: o.num_kv_heads,
                head_dim: o.head_dim,
                dtype,
                kv_dtype,
                causal: o.causal,
                sm_scale: o.sm_scale,
            },
            page_size: o.page_size,
            num_pages: o.num_pages,
            headroom_pages: o.headroom_pages,
        };
        // The shape first: a pool sized in bytes from a bad shape would blame num_pages.
        config.shape().validate()?;
        if config.num_pages == 0 && o.capacity_bytes > 0 {
            let pages = config.pages_for_bytes(o.capacity_bytes);
            config.num_pages = u32::try_from(pages)
                .map_err(|_| invalid!("options->capacity_bytes = {} makes {pages} pages, more than a pool can index", o.capacity_bytes))?;
        }
        let scales = if o.kv_head_scales.is_null() {
            &[][..]
        } else {
            // num_layers × 2 × num_kv_heads entries, or none where the pool is not fp8 (with_scales
            // refuses the array then, so read nothing of it).
            let n = (config.scale_bytes() / 4) as usize;
            if n == 0 {
                return Err(invalid!(
                    "options->kv_head_scales is not NULL but the pool's K and V are {}: scales apply to an fp8_e4m3 pool only",
                    kv_dtype.name()
                ));
            }
            // SAFETY: a non-null kv_head_scales has num_layers × 2 × num_kv_heads entries (this
            // function's contract).
            unsafe { slice("options->kv_head_scales", o.kv_head_scales, n)? }
        };
        let pool = KvPool::with_scales((*backend).clone(), config, scales)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferPool { bits: POOLS.insert(pool)? }) }
    })
}

/// Destroys a pool and frees its memory. Launches that read its KV must be finished.
#[no_mangle]
pub extern "C" fn packinfer_pool_destroy(pool: PackinferPool) -> PackinferStatus {
    guard("packinfer_pool_destroy", || POOLS.remove(pool.bits).map(drop))
}

/// The KV layout descriptor of one layer of the pool, for `PackinferRunArgs::kv`: pages are NHD
/// `[page, token, kv_head, dim]`, K and V separate.
///
/// # Safety
/// `layout` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_kv_layout(pool: PackinferPool, layer: u32, layout: *mut PackinferKvLayout) -> PackinferStatus {
    guard("packinfer_pool_kv_layout", || {
        let l = POOLS.get(pool.bits)?.kv_layout(layer)?;
        let value = PackinferKvLayout {
            k: l.k as *const c_void,
            v: l.v as *const c_void,
            stride_page: l.stride_page,
            stride_token: l.stride_token,
            stride_head: l.stride_head,
            stride_dim: l.stride_dim,
        };
        // SAFETY: `layout` is writable (this function's contract).
        unsafe { write_out("layout", layout, value) }
    })
}

/// The scales one layer's runs read the pool's K/V with, for `PackinferRunArgs::k_head_scales`
/// and `v_head_scales` (leave `k_scale` and `v_scale` 0): for an fp8 pool, the addresses of the
/// layer's per-head scales in the pool's memory (valid while the pool lives); NULL for a pool of
/// Q's dtype. Set them with `packinfer_pool_kv_layout`'s layout for every run of the layer: an
/// fp8 pool read without them is read with scale 1.
///
/// # Safety
/// `k_head_scales` and `v_head_scales` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_kv_scales(
    pool: PackinferPool,
    layer: u32,
    k_head_scales: *mut *const f32,
    v_head_scales: *mut *const f32,
) -> PackinferStatus {
    guard("packinfer_pool_kv_scales", || {
        let s = POOLS.get(pool.bits)?.kv_scales(layer)?;
        if k_head_scales.is_null() || v_head_scales.is_null() {
            return Err(invalid!("k_head_scales or v_head_scales is a null pointer"));
        }
        // SAFETY: both are writable (this function's contract).
        unsafe {
            write_out("k_head_scales", k_head_scales, s.k_head_scales as *const f32)?;
            write_out("v_head_scales", v_head_scales, s.v_head_scales as *const f32)
        }
    })
}

/// Creates an empty sequence; `*out` is its id (never 0, never reused).
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_sequence_create(pool: PackinferPool, out: *mut u64) -> PackinferStatus {
    guard("packinfer_pool_sequence_create", || {
        let pool = POOLS.get(pool.bits)?;
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, pool.create_sequence()) }
    })
}

/// Tokens stored for a sequence.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_sequence_length(pool: PackinferPool, seq: u64, out: *mut u32) -> PackinferStatus {
    guard("packinfer_pool_sequence_length", || {
        let len = POOLS.get(pool.bits)?.sequence_len(seq)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, len) }
    })
}

/// Reserves `n` more tokens at the end of `seq`. If `slots` is not NULL it receives their `n`
/// slots (`page * page_size + token in page`; valid until the next relayout). If the last page
/// is shared and partly filled it is copied first (copy-on-write), on `stream`. POOL_EXHAUSTED
/// when the pages do not fit, and then nothing changed.
///
/// # Safety
/// `slots` NULL or writable for `n` entries; `stream` a CUstream of the pool's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_append(
    pool: PackinferPool,
    seq: u64,
    n: u32,
    slots: *mut i64,
    stream: *mut c_void,
) -> PackinferStatus {
    guard("packinfer_pool_append", || {
        let pool = POOLS.get(pool.bits)?;
        let got = pool.append(seq, n, stream as u64)?;
        if !slots.is_null() {
            for (i, s) in got.into_iter().enumerate() {
                // SAFETY: non-null `slots` has `n` writable entries (this function's contract),
                // and append returned `n` slots.
                unsafe { *slots.add(i) = s as i64 };
            }
        }
        Ok(())
    })
}

/// A new sequence sharing the first `prefix_len` tokens of `parent` (full pages shared
/// copy-on-write, a partly covered page copied on `stream`); `*child` is its id.
///
/// # Safety
/// `child` must be writable; `stream` a CUstream of the pool's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_fork(
    pool: PackinferPool,
    parent: u64,
    prefix_len: u32,
    stream: *mut c_void,
    child: *mut u64,
) -> PackinferStatus {
    guard("packinfer_pool_fork", || {
        let pool = POOLS.get(pool.bits)?;
        if child.is_null() {
            return Err(invalid!("child is a null pointer"));
        }
        // SAFETY: `child` is writable (this function's contract).
        unsafe { write_out("child", child, pool.fork(parent, prefix_len, stream as u64)?) }
    })
}

/// Shortens `seq` to `len` tokens, returning pages nobody else uses.
#[no_mangle]
pub extern "C" fn packinfer_pool_truncate(pool: PackinferPool, seq: u64, len: u32) -> PackinferStatus {
    guard("packinfer_pool_truncate", || POOLS.get(pool.bits)?.truncate(seq, len))
}

/// Releases `seq`; its pages return when their last reference goes; the id becomes invalid.
#[no_mangle]
pub extern "C" fn packinfer_pool_release(pool: PackinferPool, seq: u64) -> PackinferStatus {
    guard("packinfer_pool_release", || POOLS.get(pool.bits)?.release(seq))
}

/// The step's new K and V for one layer, as the engine holds them: `[num_rows, num_kv_heads,
/// head_dim]` each, token-major. Shape and dtype are stated so a mismatch with the pool is an
/// error, not a silent misread.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferKvSource {
    /// sizeof(PackinferKvSource).
    pub struct_size: usize,
    /// Device memory on CUDA, host memory on the CPU backend.
    pub k: *const c_void,
    /// Like k, for V.
    pub v: *const c_void,
    /// Rows (tokens) in `k` and `v`; must equal the sum of `num_tokens`.
    pub num_rows: u32,
    /// Must equal the pool's.
    pub num_kv_heads: u32,
    /// Must equal the pool's.
    pub head_dim: u32,
    /// A `PackinferDtype` value.
    pub dtype: u32,
    /// Elements between consecutive tokens' rows; 0 = contiguous (num_kv_heads * head_dim).
    pub stride_token: i64,
}

/// Fills `src` with defaults: BF16, contiguous rows (stride 0); pointers and sizes left 0/NULL.
///
/// # Safety
/// `src` must be NULL or point to a writable `PackinferKvSource`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_kv_source_default(src: *mut PackinferKvSource) -> PackinferStatus {
    // SAFETY: `src` is NULL or writable (this function's contract).
    guard("packinfer_kv_source_default", || unsafe { write_out("src", src, <PackinferKvSource as super::Versioned>::default_value()) })
}

/// Writes one layer's K and V for the step's new tokens: the rows of `src` go, in order, to the
/// last `num_tokens[i]` tokens of `seq_ids[i]` (reserved by `packinfer_pool_append`). Runs on
/// `stream`. A source whose shape or dtype differs from the pool's is refused.
///
/// # Safety
/// Arrays of `n` entries; `src` initialized, its `k` and `v` addressing the rows it describes.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_write_kv(
    pool: PackinferPool,
    layer: u32,
    seq_ids: *const u64,
    num_tokens: *const u32,
    n: u32,
    src: *const PackinferKvSource,
    stream: *mut c_void,
) -> PackinferStatus {
    guard("packinfer_pool_write_kv", || {
        let pool = POOLS.get(pool.bits)?;
        // SAFETY: both arrays have `n` entries (this function's contract).
        let tokens = unsafe { zip_requests("seq_ids", seq_ids, "num_tokens", num_tokens, n)? };
        // SAFETY: `src` points to an initialized struct (this function's contract).
        let src = unsafe { options("src", src)? };
        let c = pool.config();
        if (src.num_kv_heads, src.head_dim) != (c.shape.num_kv_heads, c.shape.head_dim) {
            return Err(invalid!(
                "src is [{}, {}, {}] (tokens, kv heads, head_dim) but the pool stores {} KV heads of head_dim {}",
                src.num_rows,
                src.num_kv_heads,
                src.head_dim,
                c.shape.num_kv_heads,
                c.shape.head_dim
            ));
        }
        let dtype = dtype_from_c(src.dtype).ok_or_else(|| invalid!("{}", not_a_dtype("src->dtype", src.dtype)))?;
        if dtype != c.shape.dtype {
            return Err(invalid!(
                "src->dtype = {} but the pool takes {} rows (its dtype; it stores them as {})",
                dtype.name(),
                c.shape.dtype.name(),
                c.shape.kv_dtype.name()
            ));
        }
        let total: u64 = tokens.iter().map(|t| t.1 as u64).sum();
        if total != src.num_rows as u64 {
            return Err(invalid!("src->num_rows = {} but num_tokens sums to {total}", src.num_rows));
        }
        let row = (c.shape.num_kv_heads * c.shape.head_dim) as i64;
        if src.stride_token != 0 && src.stride_token < row {
            return Err(invalid!(
                "src->stride_token = {} is smaller than a token's row of num_kv_heads * head_dim = {row} elements (0 = contiguous)",
                src.stride_token
            ));
        }
        let stride = if src.stride_token == 0 { row } else { src.stride_token };
        // SAFETY: `src`'s k and v address the num_rows rows it describes, `stride` elements
        // apart, in the pool's kind of memory (this function's contract).
        unsafe { pool.write_kv(layer, &tokens, src.k as u64, src.v as u64, stride, stream as u64) }
    })
}

/// Registers the engine's content hashes of the first `n` full pages of `seq` (a chained hash of
/// the tokens up to each page's end), so later sequences with the same prefix can share them.
///
/// # Safety
/// `hashes` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_register_page_hashes(pool: PackinferPool, seq: u64, hashes: *const u64, n: u32) -> PackinferStatus {
    guard("packinfer_pool_register_page_hashes", || {
        let pool = POOLS.get(pool.bits)?;
        // SAFETY: `hashes` has `n` entries (this function's contract).
        pool.register_page_hashes(seq, unsafe { slice("hashes", hashes, n as usize)? })
    })
}

/// For an empty `seq`: shares the registered pages matching the leading entries of `hashes`
/// (one per full page of the engine's prompt); `*matched_tokens` is how many tokens they hold.
///
/// # Safety
/// `hashes` has `n` entries; `matched_tokens` writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_match_prefix(
    pool: PackinferPool,
    seq: u64,
    hashes: *const u64,
    n: u32,
    matched_tokens: *mut u32,
) -> PackinferStatus {
    guard("packinfer_pool_match_prefix", || {
        let pool = POOLS.get(pool.bits)?;
        // SAFETY: `hashes` has `n` entries (this function's contract).
        let hashes = unsafe { slice("hashes", hashes, n as usize)? };
        if matched_tokens.is_null() {
            return Err(invalid!("matched_tokens is a null pointer"));
        }
        // SAFETY: `matched_tokens` is writable (this function's contract).
        unsafe { write_out("matched_tokens", matched_tokens, pool.match_prefix(seq, hashes)?) }
    })
}

/// Plans a step from the pool: request i is `seq_ids[i]` with its last `num_new_tokens[i]`
/// tokens as queries (already appended). Page tables, kv lengths and prefix groups (sequences
/// whose leading pages are the same physical pages) come from the pool. The plan is a snapshot:
/// make it after the step's appends and after any relayout. `options` may be NULL.
///
/// # Safety
/// Arrays of `n` entries; `options` NULL or initialized; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_plan_create(
    context: PackinferContext,
    pool: PackinferPool,
    seq_ids: *const u64,
    num_new_tokens: *const u32,
    n: u32,
    options: *const PackinferPlanOptions,
    out: *mut PackinferPlan,
) -> PackinferStatus {
    guard("packinfer_pool_plan_create", || {
        CONTEXTS.get(context.bits)?;
        let pool = POOLS.get(pool.bits)?;
        // SAFETY: both arrays have `n` entries (this function's contract).
        let requests = unsafe { zip_requests("seq_ids", seq_ids, "num_new_tokens", num_new_tokens, n)? };
        // SAFETY: non-null `options` are initialized (this function's contract).
        let options = unsafe { super::api::plan_options(options)? };
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        let plan = pool.plan(&requests, None, options)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferPlan { bits: PLANS.insert(super::api::PlanCell::new(plan))? }) }
    })
}

/// Plans a step from the pool into an existing plan, as `packinfer_pool_plan_create` would,
/// reusing the plan's memory: once the plan has held a step as large, re-planning allocates
/// nothing (the pool plan counterpart of `packinfer_plan_update`, whose rules on launches and
/// threads apply). The plan may come from any create or update call. After an error the plan
/// is unchanged (bad handles or options are found first) or holds an empty batch (no requests,
/// no work): update it successfully before launching from it again.
///
/// # Safety
/// Arrays of `n` entries; `options` NULL or initialized.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_plan_update(
    context: PackinferContext,
    pool: PackinferPool,
    plan: PackinferPlan,
    seq_ids: *const u64,
    num_new_tokens: *const u32,
    n: u32,
    options: *const PackinferPlanOptions,
) -> PackinferStatus {
    guard("packinfer_pool_plan_update", || {
        CONTEXTS.get(context.bits)?;
        let pool = POOLS.get(pool.bits)?;
        let cell = PLANS.get(plan.bits)?;
        // SAFETY: both arrays have `n` entries (this function's contract).
        let ids = unsafe { slice("seq_ids", seq_ids, n as usize)? };
        // SAFETY: as above.
        let counts = unsafe { slice("num_new_tokens", num_new_tokens, n as usize)? };
        // SAFETY: non-null `options` are initialized (this function's contract).
        let options = unsafe { super::api::plan_options(options)? };
        let requests = ids.iter().copied().zip(counts.iter().copied());
        cell.update(
            |p| pool.replan(p, requests.clone(), None, options.clone()),
            // A launch on the CPU still executes the plan: the step goes into a new one.
            || pool.plan(&requests.clone().collect::<Vec<_>>(), None, options.clone()),
        )
    })
}

/// Keeps each execution group of `plan` contiguous in the pool (prefix once, then each member's
/// pages and headroom). `seq_ids` are the `n` ids the plan was made from. A group is rebuilt
/// when it is not contiguous and `regroup` is true (the regroup trigger fired) or one of its
/// members ran out of headroom; the copies run on `stream`. Every plan made from the pool before
/// a relayout that moved pages (any pages) is stale: launch_create, launch_update and run refuse
/// it with INVALID_ARGUMENT; plan again. A relayout that moves pages first waits for the runs of
/// plans from this pool that other threads have in progress (on CUDA, until their kernels are
/// enqueued: order their streams with `stream`), as they read the pages where they were.
/// `report` may be NULL.
///
/// # Safety
/// `seq_ids` has `n` entries; `report` NULL or a struct with `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_relayout(
    pool: PackinferPool,
    plan: PackinferPlan,
    seq_ids: *const u64,
    n: u32,
    regroup: bool,
    stream: *mut c_void,
    report: *mut PackinferRelayoutReport,
) -> PackinferStatus {
    guard("packinfer_pool_relayout", || {
        let pool = POOLS.get(pool.bits)?;
        let plan = PLANS.get(plan.bits)?.get();
        // SAFETY: `seq_ids` has `n` entries (this function's contract).
        let ids = unsafe { slice("seq_ids", seq_ids, n as usize)? };
        if !report.is_null() {
            // SAFETY: a non-null `report` has its struct_size set (this function's contract).
            unsafe { super::check_out("report", report)? };
        }
        let groups = groups_of_plan(&plan, ids)?;
        let r: RelayoutReport = pool.relayout(&groups, regroup, stream as u64)?;
        if !report.is_null() {
            let value = PackinferRelayoutReport {
                struct_size: std::mem::size_of::<PackinferRelayoutReport>(),
                groups: r.groups,
                groups_in_place: r.groups_in_place,
                groups_rebuilt: r.groups_rebuilt,
                groups_no_room: r.groups_no_room,
                pages_moved: r.pages_moved,
                bytes_moved: r.bytes_moved,
            };
            // SAFETY: as above.
            unsafe { super::write_versioned("report", report, value)? };
        }
        Ok(())
    })
}

/// The pool's metrics.
///
/// # Safety
/// `stats` must point to a `PackinferPoolStats` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_pool_stats(pool: PackinferPool, stats: *mut PackinferPoolStats) -> PackinferStatus {
    guard("packinfer_pool_stats", || {
        // SAFETY: `stats` points to a struct whose struct_size is set (this function's contract).
        unsafe { super::check_out("stats", stats)? };
        let s = POOLS.get(pool.bits)?.stats();
        let value = PackinferPoolStats {
            struct_size: std::mem::size_of::<PackinferPoolStats>(),
            num_pages: s.num_pages,
            pages_used: s.pages_used,
            pages_free: s.pages_free,
            num_sequences: s.num_sequences,
            tokens_logical: s.tokens_logical,
            tokens_stored: s.tokens_stored,
            slots_reserved_unused: s.slots_reserved_unused,
            step_read_bytes_shared: s.step_read_bytes_shared,
            step_read_bytes_unshared: s.step_read_bytes_unshared,
            relayouts: s.relayouts,
            relayout_pages_moved: s.relayout_pages_moved,
            relayout_bytes_moved: s.relayout_bytes_moved,
            cow_page_copies: s.cow_page_copies,
        };
        // SAFETY: as above.
        unsafe { super::write_versioned("stats", stats, value) }
    })
}

/// Pairs two caller arrays of `n` entries.
///
/// # Safety
/// Each array is NULL or has `n` readable entries.
pub(super) unsafe fn zip_requests(
    ids_name: &str,
    ids: *const u64,
    counts_name: &str,
    counts: *const u32,
    n: u32,
) -> Result<Vec<(SeqId, u32)>> {
    // SAFETY: NULL or `n` entries (this function's contract).
    let ids = unsafe { slice(ids_name, ids, n as usize)? };
    // SAFETY: as above.
    let counts = unsafe { slice(counts_name, counts, n as usize)? };
    let mut pairs = Vec::new();
    pairs.try_reserve_exact(ids.len()).map_err(|_| packinfer::Error::OutOfMemory(format!("no host memory for n = {n} requests")))?;
    pairs.extend(ids.iter().copied().zip(counts.iter().copied()));
    Ok(pairs)
}

super::versioned!(
    PackinferPoolOptions,
    PackinferPoolOptions {
        struct_size: std::mem::size_of::<PackinferPoolOptions>(),
        num_layers: 0,
        num_qo_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        dtype: PackinferDtype::Bf16 as u32,
        causal: true,
        sm_scale: 0.0,
        page_size: 16,
        num_pages: 0,
        capacity_bytes: 0,
        headroom_pages: 2,
        kv_head_scales: std::ptr::null(),
        kv_dtype: 0,
    },
    [num_layers, num_qo_heads, num_kv_heads, head_dim, dtype, causal, sm_scale, page_size, num_pages, capacity_bytes, headroom_pages]
    [kv_head_scales, kv_dtype]
);

super::versioned!(
    PackinferPoolStats,
    PackinferPoolStats { struct_size: std::mem::size_of::<PackinferPoolStats>(), ..Default::default() },
    [
        num_pages,
        pages_used,
        pages_free,
        num_sequences,
        tokens_logical,
        tokens_stored,
        slots_reserved_unused,
        step_read_bytes_shared,
        step_read_bytes_unshared,
        relayouts,
        relayout_pages_moved,
        relayout_bytes_moved,
        cow_page_copies
    ]
);

super::versioned!(
    PackinferRelayoutReport,
    PackinferRelayoutReport { struct_size: std::mem::size_of::<PackinferRelayoutReport>(), ..Default::default() },
    [groups, groups_in_place, groups_rebuilt, groups_no_room, pages_moved, bytes_moved]
);

super::versioned!(
    PackinferKvSource,
    PackinferKvSource {
        struct_size: std::mem::size_of::<PackinferKvSource>(),
        k: std::ptr::null(),
        v: std::ptr::null(),
        num_rows: 0,
        num_kv_heads: 0,
        head_dim: 0,
        dtype: PackinferDtype::Bf16 as u32,
        stride_token: 0,
    },
    [k, v, num_rows, num_kv_heads, head_dim, dtype, stride_token]
);
