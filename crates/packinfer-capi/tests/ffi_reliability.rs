//! Regressions of the C ABI's reliability defects (issue 24), each reproduced the way it was
//! found: through the exported functions. A wrong answer, an out-of-bounds read, an abort, a
//! stack overflow or a panic across the boundary must instead be a specific status and message.

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};

use packinfer_capi::*;

mod support;
use support::{expect, last_error, ok};

fn cpu_context() -> PackinferContext {
    support::cpu_context(1)
}

/// A pool of f32 K/V on the CPU: 1 layer, 1 KV head of head_dim 8.
fn small_pool(ctx: PackinferContext, page_size: u32, num_pages: u32) -> PackinferPool {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferPoolOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_options_default(&mut o) });
    o.num_layers = 1;
    o.num_qo_heads = 1;
    o.num_kv_heads = 1;
    o.head_dim = 8;
    o.dtype = PackinferDtype::F32 as u32;
    o.page_size = page_size;
    o.num_pages = num_pages;
    let mut pool = PackinferPool::default();
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_create(ctx, &o, &mut pool) });
    pool
}

/// Writes the last `values.len() / 8` tokens of `seq` (K = V = the values).
fn write(pool: PackinferPool, seq: u64, values: &[f32]) {
    let n = (values.len() / 8) as u32;
    let src = PackinferKvSource {
        struct_size: std::mem::size_of::<PackinferKvSource>(),
        k: values.as_ptr() as *const c_void,
        v: values.as_ptr() as *const c_void,
        num_rows: n,
        num_kv_heads: 1,
        head_dim: 8,
        dtype: PackinferDtype::F32 as u32,
        stride_token: 0,
    };
    // SAFETY: src addresses the rows it describes, on the host; live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_write_kv(pool, 0, &seq, &n, 1, &src, null_mut()) });
}

fn append(pool: PackinferPool, seq: u64, n: u32) {
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    ok(unsafe { packinfer_pool_append(pool, seq, n, null_mut(), null_mut()) });
}

fn new_seq(pool: PackinferPool) -> u64 {
    let mut id = 0;
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_sequence_create(pool, &mut id) });
    id
}

/// Defect 1: a page registered under a content hash, then written in place by another sequence
/// that came to own it, must not be served to a later `match_prefix` under the old hash.
#[test]
fn a_page_written_in_place_loses_its_content_hash() {
    let ctx = cpu_context();
    for write_without_append in [false, true] {
        let pool = small_pool(ctx, 4, 16);
        let a = new_seq(pool);
        append(pool, a, 4);
        write(pool, a, &[1.0; 32]);
        let mut b = 0;
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { packinfer_pool_fork(pool, a, 4, null_mut(), &mut b) });
        ok(packinfer_pool_truncate(pool, b, 1));
        let h = 0x5eed_u64;
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_register_page_hashes(pool, a, &h, 1) });
        ok(packinfer_pool_release(pool, a));
        if write_without_append {
            // B rewrites its one token, in the page it now owns alone.
            write(pool, b, &[2.0; 8]);
        } else {
            append(pool, b, 3);
            write(pool, b, &[2.0; 24]);
        }
        let c = new_seq(pool);
        let mut matched = u32::MAX;
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_match_prefix(pool, c, &h, 1, &mut matched) });
        assert_eq!(matched, 0, "the page now holds B's tokens, not A's prompt (write without append: {write_without_append})");
        ok(packinfer_pool_destroy(pool));
    }
    // A page that keeps its content keeps its hash: the shared prefix still works.
    let pool = small_pool(ctx, 4, 16);
    let a = new_seq(pool);
    append(pool, a, 5);
    write(pool, a, &[1.0; 40]);
    let h = 7u64;
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_register_page_hashes(pool, a, &h, 1) });
    append(pool, a, 1); // writes into A's second page, not the hashed one
    let c = new_seq(pool);
    let mut matched = 0;
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_match_prefix(pool, c, &h, 1, &mut matched) });
    assert_eq!(matched, 4);
    ok(packinfer_pool_destroy(pool));
    ok(packinfer_context_destroy(ctx));
}

// One argument per field of the C struct it fills.
#[allow(clippy::too_many_arguments)]
fn batch(
    qo: &[i32],
    kv: &[i32],
    pages: &[i32],
    last: &[i32],
    page_size: u32,
    num_pages: u32,
    heads: (u32, u32),
    causal: bool,
) -> PackinferBatchDesc {
    PackinferBatchDesc {
        struct_size: std::mem::size_of::<PackinferBatchDesc>(),
        batch_size: last.len() as u32,
        qo_indptr: qo.as_ptr(),
        kv_indptr: kv.as_ptr(),
        kv_page_indices: pages.as_ptr(),
        kv_last_page_len: last.as_ptr(),
        page_size,
        num_pages,
        num_qo_heads: heads.0,
        num_kv_heads: heads.1,
        head_dim: 64,
        dtype: PackinferDtype::Bf16 as u32,
        causal,
        sm_scale: 0.0,
        num_prefix_groups: 0,
        prefix_groups: null(),
        custom_mask: null(),
        mask_indptr: null(),
        kv_dtype: 0,
    }
}

fn plan_status(ctx: PackinferContext, b: &PackinferBatchDesc, options: Option<&PackinferPlanOptions>) -> PackinferStatus {
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    let s = unsafe { packinfer_plan_create(ctx, b, options.map_or(null(), |o| o as *const _), &mut plan) };
    if s == PackinferStatus::Ok {
        ok(packinfer_plan_destroy(plan));
    }
    s
}

/// Defects 2 and 7: a negative page index is refused whatever `num_pages` says, and kv_len is
/// computed in 64 bits (three pages of 2^31 tokens are not one key).
#[test]
fn page_indices_and_kv_lengths_are_checked_in_64_bits() {
    use PackinferStatus::*;
    let ctx = cpu_context();
    let b = batch(&[0, 1], &[0, 2], &[-2, 0], &[1], 16, u32::MAX, (1, 1), true);
    expect(plan_status(ctx, &b, None), InvalidArgument, &["kv_page_indices[0] = -2"]);
    let b = batch(&[0, 1], &[0, 3], &[0, 1, 2], &[1], 1 << 31, 8, (1, 1), false);
    expect(plan_status(ctx, &b, None), InvalidArgument, &["kv_len = 4294967297", "page_size = 2147483648"]);
    // The largest request that is allowed still plans.
    let b = batch(&[0, 1], &[0, 2], &[0, 1], &[(i32::MAX as u32 - (1 << 30)) as i32], 1 << 30, 8, (1, 1), false);
    assert!(matches!(plan_status(ctx, &b, None), Ok | InvalidArgument), "{}", last_error());
    ok(packinfer_context_destroy(ctx));
}

/// Defect 3: sizes that would make the library allocate without bound are refused with a status.
#[test]
fn huge_sizes_are_statuses_not_aborts() {
    use PackinferStatus::*;
    let ctx = cpu_context();
    let b = batch(&[0, 1], &[0, 1], &[0], &[1], 16, 8, (1 << 31, 1 << 31), true);
    expect(plan_status(ctx, &b, None), InvalidArgument, &["num_qo_heads = 2147483648"]);
    // 2^30 keys with a capacity of 1e-300 would be split into 2^24 pieces per KV head.
    let pages = vec![0i32; 1 << 10];
    let b = batch(&[0, 1], &[0, 1 << 10], &pages, &[1 << 20], 1 << 20, 1, (8, 8), false);
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferPlanOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_plan_options_default(&mut o) });
    o.capacity = 1e-300;
    expect(plan_status(ctx, &b, Some(&o)), InvalidArgument, &["work items", "capacity"]);
    o.capacity = 0.0;
    o.flags = PackinferPlanFlags::Deterministic as u32;
    o.split_keys = 1;
    expect(plan_status(ctx, &b, Some(&o)), InvalidArgument, &["work items", "split_keys = 1"]);
    // Within the rows limit, but more full tiles than a plan may have items: refused before
    // the planner allocates per tile (it used 1.6 GB and aborted under a 2 GiB limit).
    let b = batch(&[0, i32::MAX - 4], &[0, 1], &[0], &[4], 4, 1, (1, 1), false);
    expect(plan_status(ctx, &b, None), InvalidArgument, &["work items", "2147483643 query tokens"]);
    // More query rows than a step may have.
    let b = batch(&[0, 1 << 30], &[0, 0], &[], &[0], 16, 8, (4, 1), false);
    expect(plan_status(ctx, &b, None), InvalidArgument, &["rows"]);

    // A pool's headroom cannot exceed its pages, and a relayout never asks for more than it has.
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferPoolOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_options_default(&mut o) });
    (o.num_layers, o.num_qo_heads, o.num_kv_heads, o.head_dim, o.num_pages) = (1, 1, 1, 8, 64);
    o.dtype = PackinferDtype::F32 as u32;
    o.headroom_pages = u32::MAX;
    let mut pool = PackinferPool::default();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_pool_create(ctx, &o, &mut pool) }, InvalidArgument, &["headroom_pages = 4294967295"]);
    o.headroom_pages = 64;
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_create(ctx, &o, &mut pool) });
    let seqs: Vec<u64> = (0..4).map(|_| new_seq(pool)).collect();
    for &s in &seqs {
        append(pool, s, 3);
    }
    let counts = [3u32; 4];
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    ok(unsafe { packinfer_pool_plan_create(ctx, pool, seqs.as_ptr(), counts.as_ptr(), 4, null(), &mut plan) });
    let mut report = PackinferRelayoutReport { struct_size: std::mem::size_of::<PackinferRelayoutReport>(), ..Default::default() };
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    ok(unsafe { packinfer_pool_relayout(pool, plan, seqs.as_ptr(), 4, true, null_mut(), &mut report) });
    assert_eq!(report.groups_rebuilt, 0, "{report:?}");
    ok(packinfer_plan_destroy(plan));
    ok(packinfer_pool_destroy(pool));
    ok(packinfer_context_destroy(ctx));
}

/// Defect 4: a comb of forks (child i shares the root's first i pages) nests the prefix search
/// as deep as it has members; planning it must not overflow a small thread stack.
#[test]
fn a_comb_of_forks_plans_on_a_small_stack() {
    let ctx = cpu_context();
    const TEETH: u32 = 1000;
    let pool = small_pool(ctx, 1, 4 * TEETH);
    let root = new_seq(pool);
    append(pool, root, TEETH + 1);
    let mut seqs = vec![root];
    for i in 1..=TEETH {
        let mut child = 0;
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { packinfer_pool_fork(pool, root, i, null_mut(), &mut child) });
        append(pool, child, 1);
        seqs.push(child);
    }
    let counts = vec![1u32; seqs.len()];
    let (ctx_bits, pool_bits) = (ctx.bits, pool.bits);
    let status = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            let mut plan = PackinferPlan::default();
            // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
            let s = unsafe {
                packinfer_pool_plan_create(
                    PackinferContext { bits: ctx_bits },
                    PackinferPool { bits: pool_bits },
                    seqs.as_ptr(),
                    counts.as_ptr(),
                    seqs.len() as u32,
                    null(),
                    &mut plan,
                )
            };
            let mut stats = PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() };
            if s == PackinferStatus::Ok {
                // SAFETY: live locals of the types and lengths the call expects.
                ok(unsafe { packinfer_plan_stats(plan, &mut stats) });
                ok(packinfer_plan_destroy(plan));
            }
            (s, last_error(), stats.num_requests)
        })
        .unwrap()
        .join()
        .expect("planning the comb on a 256 KiB stack");
    assert_eq!(status.0, PackinferStatus::Ok, "{}", status.1);
    assert_eq!(status.2, TEETH + 1);
    ok(packinfer_pool_destroy(pool));
    ok(packinfer_context_destroy(ctx));
}

static AT_EXIT_STATUS: AtomicU32 = AtomicU32::new(u32::MAX);
static AT_EXIT_MESSAGE_LEN: AtomicU32 = AtomicU32::new(u32::MAX);

struct CallsAtThreadExit;

impl Drop for CallsAtThreadExit {
    fn drop(&mut self) {
        let s = packinfer_plan_destroy(PackinferPlan { bits: 0 });
        // SAFETY: never NULL: this thread's message, valid until its next failing call.
        let msg = unsafe { CStr::from_ptr(packinfer_last_error()) };
        AT_EXIT_STATUS.store(s as u32, Ordering::SeqCst);
        AT_EXIT_MESSAGE_LEN.store(msg.to_bytes().len() as u32, Ordering::SeqCst);
    }
}

thread_local! {
    static EXIT_HOOK: CallsAtThreadExit = const { CallsAtThreadExit };
}

/// Defect 5: a failing call and `packinfer_last_error` from a thread-local destructor that runs
/// after the library's own thread-local storage is gone: a status and a message, no abort.
#[test]
fn calls_from_thread_exit_destructors_do_not_abort() {
    std::thread::spawn(|| {
        // Registered first, so destroyed last: after the library's error text.
        EXIT_HOOK.with(|_| {});
        let _ = packinfer_plan_destroy(PackinferPlan { bits: 1 });
        assert!(last_error().contains("plan handle"));
    })
    .join()
    .expect("the thread exits cleanly");
    assert_eq!(AT_EXIT_STATUS.load(Ordering::SeqCst), PackinferStatus::InvalidHandle as u32);
    assert!(AT_EXIT_MESSAGE_LEN.load(Ordering::SeqCst) > 0);
}

/// Defect 6: a destroyed handle never comes back to life, however many handles follow it.
#[test]
fn destroyed_handles_stay_dead() {
    let ctx = cpu_context();
    let (qo, kv, pages, last) = ([0, 1], [0, 1], [0], [1]);
    let b = batch(&qo, &kv, &pages, &last, 16, 4, (1, 1), true);
    let mut first = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    ok(unsafe { packinfer_plan_create(ctx, &b, null(), &mut first) });
    ok(packinfer_plan_destroy(first));
    let mut seen = std::collections::HashSet::new();
    seen.insert(first.bits);
    for _ in 0..2000 {
        let mut p = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { packinfer_plan_create(ctx, &b, null(), &mut p) });
        assert!(seen.insert(p.bits), "handle 0x{:x} was handed out twice", p.bits);
        ok(packinfer_plan_destroy(p));
    }
    expect(packinfer_plan_destroy(first), PackinferStatus::InvalidHandle, &["destroyed"]);
    ok(packinfer_context_destroy(ctx));
}

/// Defect 8: the layout helpers check their sizes.
#[test]
fn layout_helpers_refuse_zero_and_overflowing_sizes() {
    use PackinferStatus::*;
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut l = unsafe { std::mem::zeroed::<PackinferKvLayout>() };
    for f in [packinfer_kv_layout_nhd, packinfer_kv_layout_hnd] {
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        expect(unsafe { f(null(), null(), 0, 8, 128, &mut l) }, InvalidArgument, &["page_size = 0"]);
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        expect(unsafe { f(null(), null(), 16, 0, 128, &mut l) }, InvalidArgument, &["num_kv_heads = 0"]);
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        expect(unsafe { f(null(), null(), 16, 8, 0, &mut l) }, InvalidArgument, &["head_dim = 0"]);
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        expect(unsafe { f(null(), null(), u32::MAX, u32::MAX, u32::MAX, &mut l) }, InvalidArgument, &["overflow"]);
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { f(null(), null(), 16, 8, 128, &mut l) });
        assert_eq!(l.stride_page, 16 * 8 * 128);
    }
}

/// Defect 9: one rule for statuses. A value outside the API is INVALID_ARGUMENT (a dtype that is
/// no PackinferDtype, head_dim 0); a valid value a backend cannot run is UNSUPPORTED.
#[test]
fn statuses_follow_one_rule() {
    use PackinferStatus::*;
    let ctx = cpu_context();
    let (qo, kv, pages, last) = ([0, 1], [0, 1], [0], [1]);
    let mut b = batch(&qo, &kv, &pages, &last, 16, 4, (1, 1), true);
    b.dtype = 7;
    expect(plan_status(ctx, &b, None), InvalidArgument, &["batch->dtype = 7"]);
    b.dtype = PackinferDtype::Bf16 as u32;
    b.head_dim = 0;
    expect(plan_status(ctx, &b, None), InvalidArgument, &["head_dim = 0"]);
    b.head_dim = 12;
    expect(plan_status(ctx, &b, None), Unsupported, &["head_dim = 12"]);

    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferPoolOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_options_default(&mut o) });
    (o.num_layers, o.num_qo_heads, o.num_kv_heads, o.head_dim, o.capacity_bytes) = (1, 1, 1, 8, 1 << 20);
    o.dtype = 9;
    let mut pool = PackinferPool::default();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_pool_create(ctx, &o, &mut pool) }, InvalidArgument, &["options->dtype = 9"]);
    o.dtype = PackinferDtype::F32 as u32;
    o.num_kv_heads = 0;
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_pool_create(ctx, &o, &mut pool) }, InvalidArgument, &["num_kv_heads = 0"]);
    o.num_kv_heads = 1;
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_pool_create(ctx, &o, &mut pool) });
    let s = new_seq(pool);
    append(pool, s, 1);
    let row = [0f32; 8];
    let src = PackinferKvSource {
        struct_size: std::mem::size_of::<PackinferKvSource>(),
        k: row.as_ptr() as *const c_void,
        v: row.as_ptr() as *const c_void,
        num_rows: 1,
        num_kv_heads: 1,
        head_dim: 8,
        dtype: 5,
        stride_token: 0,
    };
    // SAFETY: src addresses the rows it describes, on the host; live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_pool_write_kv(pool, 0, &s, &1, 1, &src, null_mut()) }, InvalidArgument, &["src->dtype = 5"]);
    ok(packinfer_pool_destroy(pool));
    ok(packinfer_context_destroy(ctx));
}

/// ABI evolution: an older header's shorter structs are read with defaults for the missing
/// fields and written only as far as they reach; a size inside a field is refused, and so are
/// flag bits this library does not know.
#[test]
fn older_and_newer_struct_sizes() {
    use PackinferStatus::*;
    let ctx = cpu_context();
    let (qo, kv, pages, last) = ([0, 1], [0, 1], [0], [1]);
    let b = batch(&qo, &kv, &pages, &last, 16, 4, (1, 1), true);
    // A newer header's longer struct: the fields this library does not know are ignored.
    #[repr(C)]
    struct NewerDesc {
        desc: PackinferBatchDesc,
        future: [u64; 4],
    }
    let mut newer = NewerDesc { desc: b, future: [u64::MAX; 4] };
    newer.desc.struct_size = std::mem::size_of::<NewerDesc>();
    ok(plan_status(ctx, &newer.desc, None));
    // A size that ends inside a field, or before the first version's last field, is no version.
    let mut cut = b;
    cut.struct_size = std::mem::offset_of!(PackinferBatchDesc, qo_indptr) + 3;
    expect(plan_status(ctx, &cut, None), InvalidArgument, &["batch->struct_size = 19"]);
    cut.struct_size = std::mem::offset_of!(PackinferBatchDesc, prefix_groups);
    expect(plan_status(ctx, &cut, None), InvalidArgument, &["batch->struct_size"]);

    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    ok(unsafe { packinfer_plan_create(ctx, &b, null(), &mut plan) });
    // Stats as ABI 1's first header had them (through scratch_bytes): the fields added since
    // are not written, nor anything past the caller's struct.
    #[repr(C)]
    struct FirstStats {
        struct_size: usize,
        counts: [u32; 6],
        costs: [f64; 5],
        scratch_bytes: u64,
        canary: [u64; 8],
    }
    let size = std::mem::offset_of!(PackinferPlanStats, max_worker_cost);
    assert_eq!(size, std::mem::offset_of!(FirstStats, canary));
    let mut s = FirstStats { struct_size: size, counts: [0; 6], costs: [0.0; 5], scratch_bytes: 7, canary: [0xdead_beef; 8] };
    // SAFETY: a first-version stats struct whose struct_size says how far it reaches.
    ok(unsafe { packinfer_plan_stats(plan, &mut s as *mut FirstStats as *mut PackinferPlanStats) });
    assert_eq!((s.struct_size, s.counts[0]), (size, 1));
    assert!(s.counts[1] >= 1 && s.costs[3] > 0.0);
    assert_eq!(s.scratch_bytes, 0);
    assert!(s.canary.iter().all(|&c| c == 0xdead_beef), "wrote past the caller's struct_size");
    s.struct_size = size - 8;
    // SAFETY: a first-version stats struct whose struct_size says how far it reaches.
    expect(
        unsafe { packinfer_plan_stats(plan, &mut s as *mut FirstStats as *mut PackinferPlanStats) },
        InvalidArgument,
        &["stats->struct_size"],
    );

    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferPlanOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    ok(unsafe { packinfer_plan_options_default(&mut o) });
    o.flags = 1 << 9;
    expect(plan_status(ctx, &b, Some(&o)), InvalidArgument, &["flags = 0x200"]);
    ok(packinfer_plan_destroy(plan));
    ok(packinfer_context_destroy(ctx));
}

/// Every input struct has a `_default()` filler: the struct's size and the documented defaults.
#[test]
fn every_input_struct_has_a_default_filler() {
    use PackinferStatus::*;
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut b = std::mem::zeroed::<PackinferBatchDesc>();
        ok(packinfer_batch_desc_default(&mut b));
        assert_eq!(
            (b.struct_size, b.page_size, b.dtype, b.causal),
            (std::mem::size_of::<PackinferBatchDesc>(), 16, PackinferDtype::Bf16 as u32, true)
        );
        let mut l = std::mem::zeroed::<PackinferLaunchOptions>();
        ok(packinfer_launch_options_default(&mut l));
        assert_eq!((l.struct_size, l.scratch.is_null()), (std::mem::size_of::<PackinferLaunchOptions>(), true));
        let mut c = std::mem::zeroed::<PackinferLaunchCapacity>();
        ok(packinfer_launch_capacity_default(&mut c));
        assert_eq!((c.struct_size, c.max_work_items), (std::mem::size_of::<PackinferLaunchCapacity>(), 0));
        let mut a = std::mem::zeroed::<PackinferRunArgs>();
        ok(packinfer_run_args_default(&mut a));
        assert_eq!((a.struct_size, a.lse.is_null()), (std::mem::size_of::<PackinferRunArgs>(), true));
        let mut s = std::mem::zeroed::<PackinferKvSource>();
        ok(packinfer_kv_source_default(&mut s));
        assert_eq!((s.struct_size, s.dtype), (std::mem::size_of::<PackinferKvSource>(), PackinferDtype::Bf16 as u32));
        expect(packinfer_batch_desc_default(null_mut()), InvalidArgument, &["desc is a null pointer"]);
        expect(packinfer_run_args_default(null_mut()), InvalidArgument, &["args is a null pointer"]);
    }
}

/// A plan made from a pool before a relayout that moved pages reads the keys' old places: the
/// launch refuses to be made from it or to run it, and a plan made after the relayout runs.
#[test]
fn plans_made_before_a_relayout_that_moved_pages_are_refused() {
    use PackinferStatus::*;
    let ctx = cpu_context();
    let pool = small_pool(ctx, 4, 64);
    let (a, b) = (new_seq(pool), new_seq(pool));
    // Interleaved pages: a relayout that makes each sequence contiguous has to move some.
    for _ in 0..3 {
        for s in [a, b] {
            append(pool, s, 4);
            write(pool, s, &[0.5; 32]);
        }
    }
    let ids = [a, b];
    let counts = [1u32, 1];
    let plan_now = || {
        let mut plan = PackinferPlan::default();
        // SAFETY: two ids and two counts; `plan` is writable.
        ok(unsafe { packinfer_pool_plan_create(ctx, pool, ids.as_ptr(), counts.as_ptr(), 2, null(), &mut plan) });
        plan
    };
    let old = plan_now();
    let mut launch = PackinferLaunch::default();
    // SAFETY: `launch` is writable; NULL options and stream are allowed.
    ok(unsafe { packinfer_launch_create(ctx, old, null(), null_mut(), &mut launch) });
    let q = [1.0f32; 16];
    let mut o = [0f32; 16];
    // SAFETY: PackinferRunArgs is plain data (pointers and integers); all-zero is a valid value.
    let mut args = unsafe { std::mem::zeroed::<PackinferRunArgs>() };
    // SAFETY: `args` is writable.
    ok(unsafe { packinfer_run_args_default(&mut args) });
    (args.q, args.o) = (q.as_ptr() as *const c_void, o.as_mut_ptr() as *mut c_void);
    // SAFETY: `args.kv` is writable.
    ok(unsafe { packinfer_pool_kv_layout(pool, 0, &mut args.kv) });
    // SAFETY: q and o hold the plan's 2 tokens × 1 head × 8 dims; the layout is the pool's.
    ok(unsafe { packinfer_run(launch, &args) });

    let mut report = PackinferRelayoutReport { struct_size: std::mem::size_of::<PackinferRelayoutReport>(), ..Default::default() };
    // SAFETY: two ids; `report` has its struct_size.
    ok(unsafe { packinfer_pool_relayout(pool, old, ids.as_ptr(), 2, true, null_mut(), &mut report) });
    assert!(report.pages_moved > 0, "{report:?}");
    // SAFETY: as above.
    expect(unsafe { packinfer_run(launch, &args) }, InvalidArgument, &["stale", "relayout"]);
    let mut other = PackinferLaunch::default();
    // SAFETY: as above.
    expect(unsafe { packinfer_launch_create(ctx, old, null(), null_mut(), &mut other) }, InvalidArgument, &["stale"]);

    let fresh = plan_now();
    // SAFETY: as above.
    ok(unsafe { packinfer_launch_create(ctx, fresh, null(), null_mut(), &mut other) });
    // SAFETY: as above.
    ok(unsafe { packinfer_run(other, &args) });
    for l in [launch, other] {
        ok(packinfer_launch_destroy(l));
    }
    for p in [old, fresh] {
        ok(packinfer_plan_destroy(p));
    }
    ok(packinfer_pool_destroy(pool));
    ok(packinfer_context_destroy(ctx));
}
