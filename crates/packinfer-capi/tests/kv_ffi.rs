//! The KV pool's C ABI on bad input: each call gives the right status and a message naming the
//! argument, and leaves the pool as it was.

use std::ffi::CStr;
use std::ptr::{null, null_mut};
use std::sync::Arc;

use packinfer::backend::{Backend, BackendKind, BoundPlan, Scratch};
use packinfer::kv::{KvPool, PoolConfig};
use packinfer::plan::{DeviceProfile, Plan};
use packinfer::types::{DType, Shape};
use packinfer::Error;
use packinfer_capi::*;

fn last_error() -> String {
    // SAFETY: never NULL: this thread's message, valid until its next failing call.
    unsafe { CStr::from_ptr(packinfer_last_error()) }.to_string_lossy().into_owned()
}

fn expect(status: PackinferStatus, want: PackinferStatus, needle: &str, what: &str) {
    assert_eq!(status, want, "{what}: {}", last_error());
    if want != PackinferStatus::Ok {
        let msg = last_error();
        assert!(msg.contains(needle), "{what}: message {msg:?} does not name {needle:?}");
    }
}

fn context() -> PackinferContext {
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut o: PackinferContextOptions = std::mem::zeroed();
        packinfer_context_options_default(&mut o);
        o.backend = PackinferBackend::Cpu as u32;
        o.num_threads = 1;
        let mut c = PackinferContext::default();
        expect(packinfer_context_create(&o, &mut c), PackinferStatus::Ok, "", "context");
        c
    }
}

fn pool_options() -> PackinferPoolOptions {
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut o: PackinferPoolOptions = std::mem::zeroed();
        packinfer_pool_options_default(&mut o);
        o.num_layers = 2;
        o.num_qo_heads = 4;
        o.num_kv_heads = 2;
        o.head_dim = 8;
        o.dtype = PackinferDtype::F32 as u32;
        o.page_size = 4;
        o.num_pages = 8;
        o
    }
}

fn stats(pool: PackinferPool) -> PackinferPoolStats {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut st: PackinferPoolStats = unsafe { std::mem::zeroed() };
    st.struct_size = std::mem::size_of::<PackinferPoolStats>();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_pool_stats(pool, &mut st) }, PackinferStatus::Ok, "", "stats");
    st
}

fn same(a: &PackinferPoolStats, b: &PackinferPoolStats) -> bool {
    (a.pages_used, a.pages_free, a.num_sequences, a.tokens_logical, a.tokens_stored, a.cow_page_copies)
        == (b.pages_used, b.pages_free, b.num_sequences, b.tokens_logical, b.tokens_stored, b.cow_page_copies)
}

#[test]
fn pool_creation_checks_its_options() {
    use PackinferStatus::*;
    let c = context();
    let mut pool = PackinferPool::default();
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut o = pool_options();
        o.num_pages = 0;
        o.capacity_bytes = 0;
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "num_pages = 0", "zero-sized pool");
        o.capacity_bytes = 100; // less than one page of 2*2*4*2*8*4 = 1024 bytes
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "num_pages = 0", "pool smaller than a page");
        o.capacity_bytes = 1024 * 5 + 3;
        expect(packinfer_pool_create(c, &o, &mut pool), Ok, "", "pool in bytes");
        assert_eq!(stats(pool).num_pages, 5);
        expect(packinfer_pool_destroy(pool), Ok, "", "destroy");
        let mut o = pool_options();
        o.page_size = 0;
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "page_size = 0", "page size 0");
        let mut o = pool_options();
        o.num_layers = 0;
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "num_layers = 0", "no layers");
        let mut o = pool_options();
        o.num_qo_heads = 3;
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "num_qo_heads = 3", "bad GQA");
        let mut o = pool_options();
        o.struct_size = 8;
        expect(packinfer_pool_create(c, &o, &mut pool), InvalidArgument, "struct_size = 8", "old struct");
        expect(packinfer_pool_create(c, null(), &mut pool), InvalidArgument, "options", "null options");
        expect(packinfer_pool_create(c, &pool_options(), null_mut()), InvalidArgument, "out", "null out");
        expect(
            packinfer_pool_create(PackinferContext { bits: 12345 }, &pool_options(), &mut pool),
            InvalidHandle,
            "context",
            "bad context",
        );
    }
    packinfer_context_destroy(c);
}

#[test]
fn handles_and_sequence_ids_are_checked() {
    use PackinferStatus::*;
    let c = context();
    let mut pool = PackinferPool::default();
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        expect(packinfer_pool_create(c, &pool_options(), &mut pool), Ok, "", "pool");
        let (mut a, mut b) = (0u64, 0u64);
        expect(packinfer_pool_sequence_create(pool, &mut a), Ok, "", "seq a");
        expect(packinfer_pool_sequence_create(pool, &mut b), Ok, "", "seq b");
        expect(packinfer_pool_append(pool, a, 6, null_mut(), null_mut()), Ok, "", "append");
        expect(packinfer_pool_release(pool, b), Ok, "", "release b");
        let before = stats(pool);
        let mut child = 0u64;
        let mut len = 0u32;
        let bs = format!("sequence id {b}");
        expect(packinfer_pool_append(pool, b, 1, null_mut(), null_mut()), InvalidArgument, &bs, "append to released");
        expect(packinfer_pool_append(pool, 777, 1, null_mut(), null_mut()), InvalidArgument, "sequence id 777", "append to unknown");
        expect(packinfer_pool_release(pool, b), InvalidArgument, &bs, "double release");
        expect(packinfer_pool_truncate(pool, a, 7), InvalidArgument, "len = 7", "truncate longer");
        expect(packinfer_pool_fork(pool, a, 7, null_mut(), &mut child), InvalidArgument, "prefix_len = 7", "fork beyond length");
        expect(packinfer_pool_fork(pool, b, 0, null_mut(), &mut child), InvalidArgument, &bs, "fork released");
        expect(packinfer_pool_sequence_length(pool, b, &mut len), InvalidArgument, &bs, "length of released");
        // Writing: shapes and counts.
        let k = vec![0f32; 64];
        let ids = [a];
        let n7 = [7u32];
        let n1 = [1u32];
        let good = PackinferKvSource {
            struct_size: std::mem::size_of::<PackinferKvSource>(),
            k: k.as_ptr() as _,
            v: k.as_ptr() as _,
            num_rows: 1,
            num_kv_heads: 2,
            head_dim: 8,
            dtype: PackinferDtype::F32 as u32,
            stride_token: 0,
        };
        let write = |layer: u32, ids: *const u64, counts: &[u32], src: &PackinferKvSource| {
            packinfer_pool_write_kv(pool, layer, ids, counts.as_ptr(), 1, src, null_mut())
        };
        expect(
            write(0, ids.as_ptr(), &n7, &PackinferKvSource { num_rows: 7, ..good }),
            InvalidArgument,
            "num_tokens[0] = 7",
            "write more than stored",
        );
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { num_rows: 2, ..good }),
            InvalidArgument,
            "num_rows = 2",
            "rows differ from num_tokens",
        );
        expect(write(0, ids.as_ptr(), &n1, &PackinferKvSource { head_dim: 16, ..good }), InvalidArgument, "head_dim 8", "head_dim differs");
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { num_kv_heads: 1, ..good }),
            InvalidArgument,
            "2 KV heads",
            "kv heads differ",
        );
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { dtype: PackinferDtype::Bf16 as u32, ..good }),
            InvalidArgument,
            "dtype = bf16",
            "dtype differs",
        );
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { stride_token: 15, ..good }),
            InvalidArgument,
            "src->stride_token = 15",
            "stride smaller than a row",
        );
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { stride_token: -16, ..good }),
            InvalidArgument,
            "src->stride_token = -16",
            "negative stride",
        );
        expect(
            write(0, ids.as_ptr(), &n1, &PackinferKvSource { struct_size: 4, ..good }),
            InvalidArgument,
            "struct_size = 4",
            "old struct",
        );
        expect(write(2, ids.as_ptr(), &n1, &good), InvalidArgument, "layer = 2", "layer out of range");
        expect(write(0, ids.as_ptr(), &n1, &PackinferKvSource { k: null(), v: null(), ..good }), InvalidArgument, "null", "null k/v");
        expect(write(0, null(), &n1, &good), InvalidArgument, "seq_ids", "null ids");
        expect(packinfer_pool_write_kv(pool, 0, ids.as_ptr(), n1.as_ptr(), 1, null(), null_mut()), InvalidArgument, "src", "null src");
        expect(write(0, ids.as_ptr(), &n1, &good), Ok, "", "a good write");
        let mut layout: PackinferKvLayout = std::mem::zeroed();
        expect(packinfer_pool_kv_layout(pool, 2, &mut layout), InvalidArgument, "layer = 2", "layout of a missing layer");
        expect(packinfer_pool_kv_layout(pool, 1, null_mut()), InvalidArgument, "layout", "null layout");
        // Planning.
        let mut plan = PackinferPlan::default();
        let twice = [a, a];
        let q = [1u32, 1];
        expect(
            packinfer_pool_plan_create(c, pool, twice.as_ptr(), q.as_ptr(), 2, null(), &mut plan),
            InvalidArgument,
            "repeats",
            "same sequence twice",
        );
        expect(
            packinfer_pool_plan_create(c, pool, ids.as_ptr(), n7.as_ptr(), 1, null(), &mut plan),
            InvalidArgument,
            "num_new_tokens[0] = 7",
            "more queries than tokens",
        );
        let gone = [b];
        expect(
            packinfer_pool_plan_create(c, pool, gone.as_ptr(), n1.as_ptr(), 1, null(), &mut plan),
            InvalidArgument,
            &bs,
            "plan released",
        );
        expect(packinfer_pool_plan_create(c, pool, ids.as_ptr(), n1.as_ptr(), 1, null(), &mut plan), Ok, "", "plan");
        expect(
            packinfer_pool_relayout(pool, plan, twice.as_ptr(), 2, true, null_mut(), null_mut()),
            InvalidArgument,
            "2 seq_ids",
            "relayout with other ids",
        );
        expect(
            packinfer_pool_relayout(pool, PackinferPlan { bits: 5 }, ids.as_ptr(), 1, true, null_mut(), null_mut()),
            InvalidHandle,
            "plan",
            "relayout bad plan",
        );
        assert!(same(&before, &stats(pool)), "a refused call changed the pool");
        // Exhaustion through the C API: 8 pages of 4, 2 used.
        expect(packinfer_pool_append(pool, a, 4 * 7, null_mut(), null_mut()), PoolExhausted, "needs 7 free page(s)", "too big");
        assert!(same(&before, &stats(pool)), "an exhausted append changed the pool");
        expect(packinfer_pool_append(pool, a, 4 * 6 + 2, null_mut(), null_mut()), Ok, "", "exactly full");
        expect(packinfer_pool_fork(pool, a, 5, null_mut(), &mut child), PoolExhausted, "forking", "fork copy with no page");
        expect(packinfer_pool_fork(pool, a, 4, null_mut(), &mut child), Ok, "", "aligned fork needs no page");
        // Handles.
        expect(packinfer_plan_destroy(plan), Ok, "", "plan destroy");
        expect(packinfer_pool_destroy(pool), Ok, "", "destroy");
        expect(packinfer_pool_destroy(pool), InvalidHandle, "pool handle", "double destroy");
        expect(packinfer_pool_append(pool, a, 1, null_mut(), null_mut()), InvalidHandle, "pool handle", "use after destroy");
        expect(
            packinfer_pool_append(PackinferPool { bits: c.bits }, a, 1, null_mut(), null_mut()),
            InvalidHandle,
            "not a handle of this kind",
            "context as pool",
        );
        expect(packinfer_pool_append(PackinferPool::default(), a, 1, null_mut(), null_mut()), InvalidHandle, "null", "null pool");
    }
    packinfer_context_destroy(c);
}

/// A backend that does not implement `alloc_kv` (the trait's default says Unsupported).
struct NoPoolBackend;

impl Backend for NoPoolBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device_name(&self) -> String {
        "test gpu".into()
    }
    fn profile(&self) -> DeviceProfile {
        DeviceProfile::cpu(1)
    }
    fn bind(&self, _: Arc<Plan>, _: u64, _: Option<Scratch>) -> packinfer::Result<Box<dyn BoundPlan>> {
        unimplemented!()
    }
}

#[test]
fn backends_without_pool_support_say_unsupported() {
    let config = PoolConfig {
        num_layers: 1,
        shape: Shape {
            num_qo_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            dtype: DType::F16,
            kv_dtype: DType::F16,
            causal: true,
            sm_scale: 0.0,
        },
        page_size: 16,
        num_pages: 4,
        headroom_pages: 0,
    };
    match KvPool::new(Arc::new(NoPoolBackend), config) {
        Err(Error::Unsupported(m)) => assert!(m.contains("test gpu"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

fn plan_counts(plan: PackinferPlan) -> (u32, u32, u32, u32) {
    // SAFETY: a C struct of integers and floats, for which all zeros is a valid value.
    let mut s: PackinferPlanStats = unsafe { std::mem::zeroed() };
    s.struct_size = std::mem::size_of::<PackinferPlanStats>();
    // SAFETY: `s` is a live struct with its struct_size set.
    expect(unsafe { packinfer_plan_stats(plan, &mut s) }, PackinferStatus::Ok, "", "plan stats");
    (s.num_requests, s.num_work_items, s.num_groups, s.num_merge_rows)
}

#[test]
fn pool_plan_update_plans_what_pool_plan_create_plans() {
    use PackinferStatus::*;
    let c = context();
    let mut pool = PackinferPool::default();
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut o = pool_options();
        o.num_pages = 32;
        expect(packinfer_pool_create(c, &o, &mut pool), Ok, "", "pool");
        // a: 9 tokens; b and d share a's first 8 (two full pages); e is alone.
        let (mut a, mut b, mut d, mut e) = (0u64, 0u64, 0u64, 0u64);
        expect(packinfer_pool_sequence_create(pool, &mut a), Ok, "", "seq a");
        expect(packinfer_pool_append(pool, a, 9, null_mut(), null_mut()), Ok, "", "append a");
        expect(packinfer_pool_fork(pool, a, 8, null_mut(), &mut b), Ok, "", "fork b");
        expect(packinfer_pool_fork(pool, a, 8, null_mut(), &mut d), Ok, "", "fork d");
        expect(packinfer_pool_sequence_create(pool, &mut e), Ok, "", "seq e");
        for (s, n) in [(b, 3), (d, 2), (e, 5)] {
            expect(packinfer_pool_append(pool, s, n, null_mut(), null_mut()), Ok, "", "append");
        }
        let (all, q_all) = ([a, b, d, e], [1u32, 1, 2, 5]);
        let (one, q_one) = ([e], [1u32]);
        let (mut want, mut plan) = (PackinferPlan::default(), PackinferPlan::default());
        expect(packinfer_pool_plan_create(c, pool, all.as_ptr(), q_all.as_ptr(), 4, null(), &mut want), Ok, "", "plan all");
        expect(packinfer_pool_plan_create(c, pool, one.as_ptr(), q_one.as_ptr(), 1, null(), &mut plan), Ok, "", "plan one");
        assert!(plan_counts(want).3 > 0, "a, b and d share two pages: their prefix is read once and merged");
        assert_ne!(plan_counts(plan), plan_counts(want));
        expect(packinfer_pool_plan_update(c, pool, plan, all.as_ptr(), q_all.as_ptr(), 4, null()), Ok, "", "update to all");
        assert_eq!(plan_counts(plan), plan_counts(want));
        // Bad handles and arguments leave the plan as it was.
        expect(
            packinfer_pool_plan_update(c, pool, PackinferPlan { bits: 5 }, all.as_ptr(), q_all.as_ptr(), 4, null()),
            InvalidHandle,
            "plan",
            "bad plan",
        );
        expect(packinfer_pool_plan_update(c, pool, plan, null(), q_all.as_ptr(), 4, null()), InvalidArgument, "seq_ids", "null ids");
        assert_eq!(plan_counts(plan), plan_counts(want));
        // An error while planning empties the plan; the next update works.
        let twice = [a, b, a];
        expect(
            packinfer_pool_plan_update(c, pool, plan, twice.as_ptr(), q_all.as_ptr(), 3, null()),
            InvalidArgument,
            "seq_ids[2]",
            "a sequence twice",
        );
        assert_eq!(plan_counts(plan), (0, 0, 0, 0));
        expect(packinfer_pool_plan_update(c, pool, plan, all.as_ptr(), q_all.as_ptr(), 4, null()), Ok, "", "update again");
        assert_eq!(plan_counts(plan), plan_counts(want));
        // A CPU launch keeps the step it was made from.
        let mut launch = PackinferLaunch::default();
        expect(packinfer_launch_create(c, plan, null(), null_mut(), &mut launch), Ok, "", "launch");
        expect(packinfer_pool_plan_update(c, pool, plan, one.as_ptr(), q_one.as_ptr(), 1, null()), Ok, "", "update to one");
        assert_eq!(plan_counts(plan).0, 1);
        for h in [packinfer_launch_destroy(launch), packinfer_plan_destroy(plan), packinfer_plan_destroy(want)] {
            expect(h, Ok, "", "destroy");
        }
        expect(packinfer_pool_destroy(pool), Ok, "", "pool destroy");
        expect(packinfer_context_destroy(c), Ok, "", "context destroy");
    }
}

/// An fp8 pool's options through the C ABI: kv_dtype and the per-layer, per-head scales; scales
/// for a pool of Q's dtype are refused by name; `packinfer_pool_kv_scales` gives the layer's
/// scales (NULL for a pool of Q's dtype); a first-release PackinferPoolOptions ending before the
/// new fields (padding included) makes a pool of Q's dtype.
#[test]
fn fp8_pool_options_and_scales() {
    let ctx = context();
    let scales: Vec<f32> = (0..2 * 2 * 2).map(|i| 0.25 * (i + 1) as f32).collect();
    let create = |o: &PackinferPoolOptions| {
        let mut pool = PackinferPool::default();
        // SAFETY: live locals of the types and lengths the call expects (kv_head_scales, when
        // set, has num_layers × 2 × num_kv_heads = 8 entries).
        let status = unsafe { packinfer_pool_create(ctx, o, &mut pool) };
        (status, pool)
    };
    let layer_scales = |pool: PackinferPool, layer: u32| {
        let (mut k, mut v) = (null(), null());
        // SAFETY: live locals of the types the call expects.
        expect(unsafe { packinfer_pool_kv_scales(pool, layer, &mut k, &mut v) }, PackinferStatus::Ok, "", "kv_scales");
        let read = |p: *const f32| {
            // SAFETY: a non-null address is the pool's num_kv_heads = 2 host f32 of the layer.
            (!p.is_null()).then(|| unsafe { [*p, *p.add(1)] })
        };
        (read(k), read(v))
    };
    let mut o = pool_options();
    o.kv_dtype = PackinferDtype::Fp8E4m3 as u32;
    o.kv_head_scales = scales.as_ptr();
    let (status, fp8) = create(&o);
    expect(status, PackinferStatus::Ok, "", "fp8 pool");
    assert_eq!(layer_scales(fp8, 0), (Some([0.25, 0.5]), Some([0.75, 1.0])));
    assert_eq!(layer_scales(fp8, 1), (Some([1.25, 1.5]), Some([1.75, 2.0])));
    // SAFETY: live locals of the types the call expects.
    let status = unsafe { packinfer_pool_kv_scales(fp8, 2, &mut null(), &mut null()) };
    expect(status, PackinferStatus::InvalidArgument, "layer = 2 but the pool has 2 layers", "kv_scales layer");
    // SAFETY: the NULL is checked by the call.
    let status = unsafe { packinfer_pool_kv_scales(fp8, 0, null_mut(), &mut null()) };
    expect(status, PackinferStatus::InvalidArgument, "null pointer", "kv_scales NULL");
    // Without an array every scale is 1.
    o.kv_head_scales = null();
    let (_, fp8_ones) = create(&o);
    assert_eq!(layer_scales(fp8_ones, 1), (Some([1.0, 1.0]), Some([1.0, 1.0])), "NULL scales are 1");
    // Scales for an f32 pool, a bad scale, a bad kv_dtype.
    let mut plain = pool_options();
    plain.kv_head_scales = scales.as_ptr();
    let (status, _) = create(&plain);
    expect(status, PackinferStatus::InvalidArgument, "options->kv_head_scales is not NULL but the pool's K and V are f32", "plain scales");
    let mut bad = scales.clone();
    bad[3] = f32::NAN;
    o.kv_head_scales = bad.as_ptr();
    let (status, _) = create(&o);
    expect(status, PackinferStatus::InvalidArgument, "kv_head_scales[3] = NaN", "NaN scale");
    o.kv_head_scales = null();
    o.kv_dtype = 9;
    let (status, _) = create(&o);
    expect(status, PackinferStatus::InvalidArgument, "options->kv_dtype = 9 is not a PackinferDtype", "kv_dtype 9");
    // A first-release struct: no kv_dtype (whatever its padding and the bytes past it hold).
    let mut old = pool_options();
    old.kv_dtype = PackinferDtype::Fp8E4m3 as u32;
    old.kv_head_scales = scales.as_ptr();
    old.struct_size = std::mem::offset_of!(PackinferPoolOptions, kv_head_scales);
    let pad = std::mem::offset_of!(PackinferPoolOptions, headroom_pages) + 4;
    assert_eq!(pad + 4, old.struct_size, "the first release ends with 4 bytes of padding");
    // SAFETY: the padding bytes after headroom_pages, inside `old`.
    unsafe { std::ptr::write_bytes((&mut old as *mut PackinferPoolOptions as *mut u8).add(pad), 0xA5, 4) };
    let (status, first) = create(&old);
    expect(status, PackinferStatus::Ok, "", "first-release options");
    assert_eq!(layer_scales(first, 0), (None, None), "a pool of Q's dtype has no scales");
    for pool in [fp8, fp8_ones, first] {
        assert_eq!(packinfer_pool_destroy(pool), PackinferStatus::Ok);
    }
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}
