//! The C ABI, called the way a C engine calls it: full flows, and every bad input the API can
//! receive, each with its status and a message naming the bad value, the context staying usable.

use packinfer_testkit as common;
mod support;
use support::{cpu_context as cpu_context_with, expect, last_error, run_args, CDesc};

fn cpu_context() -> PackinferContext {
    cpu_context_with(2)
}

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

use common::{assert_close, rng, Case, CaseSpec, Tensor};
use packinfer::types::{DType, PrefixGroup};
use packinfer_capi::*;

fn desc(case: &Case, groups: &[PackinferPrefixGroup]) -> PackinferBatchDesc {
    case.c_desc(groups)
}

fn small_case(seed: u64) -> Case {
    let spec = CaseSpec {
        batch_size: 4,
        max_kv: 90,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    Case::random(&mut rng(seed), &spec)
}

/// plan → launch → run → check, through the C ABI.
fn full_flow(ctx: PackinferContext, case: &Case, groups: &[PackinferPrefixGroup]) {
    let d = desc(case, groups);
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_plan_create(ctx, &d, null(), &mut plan) }, PackinferStatus::Ok, "{}", last_error());
    let mut stats = PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() };
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_plan_stats(plan, &mut stats) }, PackinferStatus::Ok);
    assert_eq!(stats.num_requests, case.batch.len() as u32);
    assert!(stats.tile_utilization > 0.0 && stats.tile_utilization <= 1.0);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok, "{}", last_error());
    let mut done = false;
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_launch_query(launch, &mut done) }, PackinferStatus::Ok);
    assert!(done);
    assert_eq!(packinfer_launch_wait(launch), PackinferStatus::Ok);
    // Every layer of a step reuses the launch.
    for _layer in 0..2 {
        let o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        let args = run_args(case, &o, &mut lse);
        // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
        assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
        assert_close(case, &o, &lse, "C ABI flow");
    }
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
}

#[test]
fn version_and_status_strings() {
    assert_eq!(packinfer_abi_version(), PACKINFER_ABI_VERSION);
    // SAFETY: a static C string.
    let v = unsafe { CStr::from_ptr(packinfer_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    // SAFETY: a static C string.
    let s = unsafe { CStr::from_ptr(packinfer_status_string(PackinferStatus::PoolExhausted as u32)) };
    assert_eq!(s.to_str().unwrap(), "PACKINFER_STATUS_POOL_EXHAUSTED");
    // SAFETY: a static C string.
    let s = unsafe { CStr::from_ptr(packinfer_status_string(77)) };
    assert_eq!(s.to_str().unwrap(), "PACKINFER_STATUS_UNKNOWN");
}

#[test]
fn flows_prefill_decode_mixed_and_prefix_groups() {
    let ctx = cpu_context();
    let mut info = PackinferContextInfo {
        struct_size: std::mem::size_of::<PackinferContextInfo>(),
        backend: 0,
        num_workers: 0,
        device_name: [0; 128],
    };
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_info(ctx, &mut info) }, PackinferStatus::Ok);
    assert_eq!(info.backend, PackinferBackend::Cpu as u32);
    assert_eq!(info.num_workers, 2);
    for seed in 0..5 {
        full_flow(ctx, &small_case(seed), &[]);
    }
    // Three requests sharing a 40-token prefix, plus one that does not.
    let spec = CaseSpec {
        batch_size: 4,
        max_kv: 1,
        page_size: 16,
        num_kv_heads: 1,
        group: 4,
        head_dim: 128,
        dtype: DType::F16,
        causal: true,
        decode_fraction: 0.0,
        hnd: true,
    };
    let members = [0i32, 1, 3];
    let case = Case::build(
        &mut rng(9),
        &spec,
        &[(1, 45), (3, 60), (5, 20), (1, 41)],
        vec![PrefixGroup { prefix_len: 40, members: vec![0, 1, 3] }],
    );
    let groups = [PackinferPrefixGroup { prefix_len: 40, num_members: 3, members: members.as_ptr() }];
    full_flow(ctx, &case, &groups);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

#[test]
fn auto_falls_back_to_cpu_and_cuda_says_no_device() {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferContextOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    unsafe { packinfer_context_options_default(&mut o) };
    let mut ctx = PackinferContext::default();
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_create(&o, &mut ctx) }, PackinferStatus::Ok);
    assert_ne!(ctx.bits, 0);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
    o.backend = PackinferBackend::Cuda as u32;
    // SAFETY: live locals of the types and lengths the call expects.
    let status = unsafe { packinfer_context_create(&o, &mut ctx) };
    if packinfer::testing::probe(0).is_err() {
        expect(status, PackinferStatus::NoDevice, &["packinfer_context_create"]);
        // and asking for a device that does not exist is NO_DEVICE too, never a crash
        o.device_ordinal = 7;
        // SAFETY: live locals of the types and lengths the call expects.
        expect(unsafe { packinfer_context_create(&o, &mut ctx) }, PackinferStatus::NoDevice, &[]);
    } else {
        eprintln!("a CUDA device is present: NO_DEVICE is checked only on machines without one");
        if status == PackinferStatus::Ok {
            packinfer_context_destroy(ctx);
        }
    }
}

#[test]
fn handles_destroyed_or_forged_are_refused() {
    let ctx = cpu_context();
    let case = small_case(1);
    let d = desc(&case, &[]);
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_plan_create(ctx, &d, null(), &mut plan) }, PackinferStatus::Ok);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok);
    // Destroying the plan leaves the launch usable; using the plan is refused.
    assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
    expect(packinfer_plan_destroy(plan), PackinferStatus::InvalidHandle, &["packinfer_plan_destroy", "plan handle", "destroyed"]);
    let mut stats = PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() };
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_plan_stats(plan, &mut stats) }, PackinferStatus::InvalidHandle, &["plan handle"]);
    let mut other = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut other) }, PackinferStatus::InvalidHandle, &["plan handle"]);
    let o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![0.0; case.total_q() * 8];
    let args = run_args(&case, &o, &mut lse);
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    expect(unsafe { packinfer_run(launch, &args) }, PackinferStatus::InvalidHandle, &["packinfer_run", "launch handle"]);
    expect(packinfer_launch_destroy(launch), PackinferStatus::InvalidHandle, &["launch handle"]);
    let mut done = false;
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_launch_query(launch, &mut done) }, PackinferStatus::InvalidHandle, &[]);
    expect(packinfer_launch_wait(launch), PackinferStatus::InvalidHandle, &[]);
    // Null, forged and cross-kind handles.
    expect(packinfer_context_destroy(PackinferContext { bits: 0 }), PackinferStatus::InvalidHandle, &["null"]);
    expect(
        packinfer_context_destroy(PackinferContext { bits: 0xC100_0000_0000_9999 }),
        PackinferStatus::InvalidHandle,
        &["context handle"],
    );
    expect(packinfer_context_destroy(PackinferContext { bits: plan.bits }), PackinferStatus::InvalidHandle, &["not a handle of this kind"]);
    // The context is still fine; then it is destroyed once, and only once.
    full_flow(ctx, &case, &[]);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
    expect(packinfer_context_destroy(ctx), PackinferStatus::InvalidHandle, &["context handle"]);
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_plan_create(ctx, &d, null(), &mut plan) }, PackinferStatus::InvalidHandle, &["context handle"]);
}

/// Each bad batch is refused with its status and a message naming the value; after each, the
/// context still plans and runs a good batch.
#[test]
fn bad_batches_are_refused_with_the_value_named() {
    let ctx = cpu_context();
    let good = small_case(2);
    let plan_status = |d: &PackinferBatchDesc| {
        let mut plan = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        let s = unsafe { packinfer_plan_create(ctx, d, null(), &mut plan) };
        if s == PackinferStatus::Ok {
            packinfer_plan_destroy(plan);
        }
        s
    };
    type Edit = Box<dyn Fn(&mut PackinferBatchDesc, &mut Vec<i32>)>;
    let nnz = good.batch.kv_page_indices.len();
    let mut bad_pages = good.batch.kv_page_indices.clone();
    bad_pages[nnz - 1] = good.batch.num_pages as i32 + 5;
    let bad_page_value = bad_pages[nnz - 1];
    let mut bad_indptr = good.batch.qo_indptr.clone();
    bad_indptr[2] = bad_indptr[1] - 1;
    let mut causal_too_long = good.batch.qo_indptr.clone();
    let extra = good.batch.kv_len(3) as i32 + 1 - good.batch.q_len(3) as i32;
    *causal_too_long.last_mut().unwrap() += extra;
    let mut last_len = good.batch.kv_last_page_len.clone();
    last_len[0] = 17;
    let cases: Vec<(&str, PackinferStatus, Vec<String>, Edit)> = vec![
        (
            "null qo_indptr",
            PackinferStatus::InvalidArgument,
            vec!["qo_indptr".into(), "null".into()],
            Box::new(|d, _| d.qo_indptr = null()),
        ),
        (
            "null kv_page_indices",
            PackinferStatus::InvalidArgument,
            vec!["kv_page_indices".into()],
            Box::new(|d, _| d.kv_page_indices = null()),
        ),
        (
            "page out of range",
            PackinferStatus::InvalidArgument,
            vec![format!("kv_page_indices[{}] = {bad_page_value}", nnz - 1), format!("{} pages", good.batch.num_pages)],
            {
                let p = bad_pages.clone();
                Box::new(move |d, keep| {
                    *keep = p.clone();
                    d.kv_page_indices = keep.as_ptr();
                })
            },
        ),
        ("indptr decreasing", PackinferStatus::InvalidArgument, vec!["qo_indptr[2]".into(), "must not decrease".into()], {
            let p = bad_indptr.clone();
            Box::new(move |d, keep| {
                *keep = p.clone();
                d.qo_indptr = keep.as_ptr();
            })
        }),
        ("q_len > kv_len causal", PackinferStatus::InvalidArgument, vec!["request 3".into(), "causal".into()], {
            let p = causal_too_long.clone();
            Box::new(move |d, keep| {
                *keep = p.clone();
                d.qo_indptr = keep.as_ptr();
            })
        }),
        ("last page too long", PackinferStatus::InvalidArgument, vec!["kv_last_page_len[0] = 17".into()], {
            let p = last_len.clone();
            Box::new(move |d, keep| {
                *keep = p.clone();
                d.kv_last_page_len = keep.as_ptr();
            })
        }),
        (
            "heads not divisible",
            PackinferStatus::InvalidArgument,
            vec!["num_qo_heads = 6".into(), "num_kv_heads = 4".into()],
            Box::new(|d, _| {
                d.num_qo_heads = 6;
                d.num_kv_heads = 4;
            }),
        ),
        ("zero kv heads", PackinferStatus::InvalidArgument, vec!["num_kv_heads = 0".into()], Box::new(|d, _| d.num_kv_heads = 0)),
        ("head_dim 100", PackinferStatus::Unsupported, vec!["head_dim = 100".into()], Box::new(|d, _| d.head_dim = 100)),
        ("dtype 9", PackinferStatus::InvalidArgument, vec!["dtype = 9".into()], Box::new(|d, _| d.dtype = 9)),
        ("page size 0", PackinferStatus::InvalidArgument, vec!["page_size = 0".into()], Box::new(|d, _| d.page_size = 0)),
        ("negative sm_scale", PackinferStatus::InvalidArgument, vec!["sm_scale = -1".into()], Box::new(|d, _| d.sm_scale = -1.0)),
        ("struct_size 0", PackinferStatus::InvalidArgument, vec!["struct_size = 0".into()], Box::new(|d, _| d.struct_size = 0)),
        ("struct_size short", PackinferStatus::InvalidArgument, vec!["struct_size = 8".into()], Box::new(|d, _| d.struct_size = 8)),
        (
            "prefix group with one member",
            PackinferStatus::InvalidArgument,
            vec!["prefix_groups[0]".into()],
            Box::new(|d, keep| {
                *keep = vec![0];
                d.num_prefix_groups = 1;
                d.prefix_groups = Box::leak(Box::new(PackinferPrefixGroup { prefix_len: 4, num_members: 1, members: keep.as_ptr() }));
            }),
        ),
        (
            "prefix longer than member",
            PackinferStatus::InvalidArgument,
            vec!["prefix_len = 100000".into()],
            Box::new(|d, keep| {
                *keep = vec![0, 1];
                d.num_prefix_groups = 1;
                d.prefix_groups = Box::leak(Box::new(PackinferPrefixGroup { prefix_len: 100000, num_members: 2, members: keep.as_ptr() }));
            }),
        ),
        (
            "request in two prefix groups",
            PackinferStatus::InvalidArgument,
            vec!["request 1".into(), "at most one prefix group".into()],
            Box::new(|d, keep| {
                *keep = vec![0, 1, 1, 2];
                d.num_prefix_groups = 2;
                d.prefix_groups = Box::leak(Box::new([
                    PackinferPrefixGroup { prefix_len: 1, num_members: 2, members: keep.as_ptr() },
                    // SAFETY: `keep` has four entries.
                    PackinferPrefixGroup { prefix_len: 1, num_members: 2, members: unsafe { keep.as_ptr().add(2) } },
                ])) as *const _ as *const PackinferPrefixGroup;
            }),
        ),
        (
            "prefix member out of batch",
            PackinferStatus::InvalidArgument,
            vec!["members[1] = 9".into()],
            Box::new(|d, keep| {
                *keep = vec![0, 9];
                d.num_prefix_groups = 1;
                d.prefix_groups = Box::leak(Box::new(PackinferPrefixGroup { prefix_len: 1, num_members: 2, members: keep.as_ptr() }));
            }),
        ),
    ];
    for (name, status, needles, edit) in cases {
        let mut d = desc(&good, &[]);
        let mut keep = Vec::new();
        edit(&mut d, &mut keep);
        let needles: Vec<&str> = needles.iter().map(|s| s.as_str()).collect();
        let s = plan_status(&d);
        let msg = last_error();
        assert_eq!(s, status, "{name}: {msg}");
        assert!(msg.starts_with("packinfer_plan_create: "), "{name}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{name}: message {msg:?} should mention {n:?}");
        }
        full_flow(ctx, &good, &[]);
    }
    // Null descriptor and null out-parameter.
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(
        unsafe { packinfer_plan_create(ctx, null(), null(), &mut PackinferPlan::default()) },
        PackinferStatus::InvalidArgument,
        &["batch is a null pointer"],
    );
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(
        unsafe { packinfer_plan_create(ctx, &desc(&good, &[]), null(), null_mut()) },
        PackinferStatus::InvalidArgument,
        &["out is a null pointer"],
    );
    // Bad plan options.
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut po = unsafe { std::mem::zeroed::<PackinferPlanOptions>() };
    // SAFETY: live locals of the types and lengths the call expects.
    unsafe { packinfer_plan_options_default(&mut po) };
    po.capacity = -3.0;
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_plan_create(ctx, &desc(&good, &[]), &po, &mut plan) }, PackinferStatus::InvalidArgument, &["capacity = -3"]);
    packinfer_context_destroy(ctx);
}

#[test]
fn bad_options_run_args_and_scratch() {
    // Context options.
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferContextOptions>() };
    let mut ctx = PackinferContext::default();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_context_create(&o, &mut ctx) }, PackinferStatus::InvalidArgument, &["struct_size = 0"]);
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_context_create(null(), &mut ctx) }, PackinferStatus::InvalidArgument, &["options is a null pointer"]);
    // SAFETY: live locals of the types and lengths the call expects.
    unsafe { packinfer_context_options_default(&mut o) };
    o.backend = 5;
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_context_create(&o, &mut ctx) }, PackinferStatus::InvalidArgument, &["backend = 5"]);
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_context_options_default(null_mut()) }, PackinferStatus::InvalidArgument, &["null"]);

    let ctx = cpu_context();
    let case = small_case(3);
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_plan_create(ctx, &desc(&case, &[]), null(), &mut plan) }, PackinferStatus::Ok);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok);
    let o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![0.0; case.total_q() * 8];
    let good = run_args(&case, &o, &mut lse);
    let mut a = good;
    a.q = null();
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    expect(unsafe { packinfer_run(launch, &a) }, PackinferStatus::InvalidArgument, &["packinfer_run", "q is a null pointer"]);
    a = good;
    a.kv.v = null();
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    expect(unsafe { packinfer_run(launch, &a) }, PackinferStatus::InvalidArgument, &["kv.k or kv.v"]);
    a = good;
    a.o_stride_head = -4;
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    expect(unsafe { packinfer_run(launch, &a) }, PackinferStatus::InvalidArgument, &["o strides"]);
    a = good;
    a.struct_size = 3;
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    expect(unsafe { packinfer_run(launch, &a) }, PackinferStatus::InvalidArgument, &["args->struct_size = 3"]);
    // SAFETY: a NULL args is refused.
    expect(unsafe { packinfer_run(launch, null()) }, PackinferStatus::InvalidArgument, &["args is a null pointer"]);
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    assert_eq!(unsafe { packinfer_run(launch, &good) }, PackinferStatus::Ok, "{}", last_error());
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_launch_query(launch, null_mut()) }, PackinferStatus::InvalidArgument, &["done"]);
    let mut stats = PackinferPlanStats::default();
    // SAFETY: live locals of the types and lengths the call expects.
    expect(unsafe { packinfer_plan_stats(plan, &mut stats) }, PackinferStatus::InvalidArgument, &["stats->struct_size = 0"]);
    // Caller scratch that is too small, when the plan needs some.
    stats.struct_size = std::mem::size_of::<PackinferPlanStats>();
    // SAFETY: live locals of the types and lengths the call expects.
    unsafe { packinfer_plan_stats(plan, &mut stats) };
    if stats.scratch_bytes > 0 {
        let mut buf = vec![0u8; 16];
        let lo = PackinferLaunchOptions {
            struct_size: std::mem::size_of::<PackinferLaunchOptions>(),
            scratch: buf.as_mut_ptr() as *mut c_void,
            scratch_bytes: 16,
        };
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        expect(
            unsafe { packinfer_launch_create(ctx, plan, &lo, null_mut(), &mut PackinferLaunch::default()) },
            PackinferStatus::InvalidArgument,
            &["scratch_bytes = 16"],
        );
    }
    let lo = PackinferLaunchOptions { struct_size: 1, scratch: null_mut(), scratch_bytes: 0 };
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(
        unsafe { packinfer_launch_create(ctx, plan, &lo, null_mut(), &mut PackinferLaunch::default()) },
        PackinferStatus::InvalidArgument,
        &["options->struct_size = 1"],
    );
    // A larger struct_size (a newer header) is accepted.
    a = good;
    a.struct_size += 16;
    // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
    assert_eq!(unsafe { packinfer_run(launch, &a) }, PackinferStatus::Ok, "{}", last_error());
    packinfer_launch_destroy(launch);
    packinfer_plan_destroy(plan);
    packinfer_context_destroy(ctx);
}

#[test]
fn layout_helpers_describe_nhd_and_hnd() {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut l = unsafe { std::mem::zeroed::<PackinferKvLayout>() };
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_kv_layout_nhd(null(), null(), 16, 8, 128, &mut l) }, PackinferStatus::Ok);
    assert_eq!((l.stride_page, l.stride_token, l.stride_head, l.stride_dim), (16 * 8 * 128, 8 * 128, 128, 1));
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_kv_layout_hnd(null(), null(), 16, 8, 128, &mut l) }, PackinferStatus::Ok);
    assert_eq!((l.stride_page, l.stride_token, l.stride_head, l.stride_dim), (16 * 8 * 128, 128, 16 * 128, 1));
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    expect(unsafe { packinfer_kv_layout_nhd(null(), null(), 16, 8, 128, null_mut()) }, PackinferStatus::InvalidArgument, &["layout"]);
}

/// A panic inside the library becomes INTERNAL with its message, and the thread carries on.
#[test]
fn panics_become_internal() {
    let s = packinfer_capi::guard_for_tests("packinfer_test", || panic!("boom {}", 42));
    expect(s, PackinferStatus::Internal, &["packinfer_test", "boom 42"]);
    assert_eq!(packinfer_abi_version(), PACKINFER_ABI_VERSION);
}

/// The C API: capacity 0 is automatic, a negative or non-finite one is INVALID_ARGUMENT, and
/// the statistics come through.
#[test]
fn c_api_capacity_and_stats() {
    let mut r = rng(1);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 50,
        page_size: 16,
        num_kv_heads: 1,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let case = Case::build(&mut r, &spec, &[(1, 40), (2, 30), (1, 20)], vec![]);
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
    unsafe {
        let mut copts: PackinferContextOptions = std::mem::zeroed();
        assert_eq!(packinfer_context_options_default(&mut copts), PackinferStatus::Ok);
        copts.backend = PackinferBackend::Cpu as u32;
        let mut ctx = PackinferContext::default();
        assert_eq!(packinfer_context_create(&copts, &mut ctx), PackinferStatus::Ok);
        let desc = case.c_desc(&[]);
        let mut opts: PackinferPlanOptions = std::mem::zeroed();
        assert_eq!(packinfer_plan_options_default(&mut opts), PackinferStatus::Ok);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            opts.capacity = bad;
            let mut plan = PackinferPlan::default();
            assert_eq!(packinfer_plan_create(ctx, &desc, &opts, &mut plan), PackinferStatus::InvalidArgument);
            let msg = std::ffi::CStr::from_ptr(packinfer_last_error()).to_string_lossy().into_owned();
            assert!(msg.contains("capacity"), "{msg}");
        }
        opts.capacity = 0.0;
        let mut plan = PackinferPlan::default();
        assert_eq!(packinfer_plan_create(ctx, &desc, &opts, &mut plan), PackinferStatus::Ok);
        let mut stats: PackinferPlanStats = std::mem::zeroed();
        stats.struct_size = std::mem::size_of::<PackinferPlanStats>();
        assert_eq!(packinfer_plan_stats(plan, &mut stats), PackinferStatus::Ok);
        assert_eq!(stats.num_requests, 3);
        assert!(stats.num_work_items >= 1 && stats.num_groups >= 1);
        assert!(stats.tile_utilization > 0.0 && stats.tile_utilization <= 1.0);
        assert!(stats.capacity > 0.0 && stats.max_worker_cost >= stats.mean_worker_cost && stats.mean_worker_cost > 0.0);
        assert!(stats.planning_time_us > 0.0);
        assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
        assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
    }
}

/// Sliding window and soft-cap through the C ABI: the window with PACKINFER_PLAN_FLAGS_SLIDING_WINDOW
/// (plan time), the soft-cap in the run arguments (each run its own); a first-release
/// PackinferPlanOptions (no window_left) plans without a window and a first-release
/// PackinferRunArgs (no logits_soft_cap) runs without a soft-cap; a bad cap is named.
#[test]
fn sliding_window_and_soft_cap() {
    let ctx = cpu_context();
    let base = small_case(41);
    let run = |launch: PackinferLaunch, case: &Case, args_size: usize| {
        let o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        let mut args = run_args(case, &o, &mut lse);
        args.struct_size = args_size;
        // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
        let status = unsafe { packinfer_run(launch, &args) };
        (status, o, lse)
    };
    let full = std::mem::size_of::<PackinferRunArgs>();
    let first_args = std::mem::offset_of!(PackinferRunArgs, logits_soft_cap);
    let first_options = std::mem::offset_of!(PackinferPlanOptions, window_left);
    for (window, options_size) in [(Some(3u32), std::mem::size_of::<PackinferPlanOptions>()), (None, first_options)] {
        let mut case = Case::random(
            &mut rng(41),
            &CaseSpec {
                batch_size: 4,
                max_kv: 90,
                page_size: 16,
                num_kv_heads: 2,
                group: 4,
                head_dim: 64,
                dtype: DType::Bf16,
                causal: true,
                decode_fraction: 0.5,
                hnd: false,
            },
        )
        .with_features(window, 0.0);
        assert_eq!(case.batch, base.batch);
        let d = desc(&case, &[]);
        // A first-release caller knows neither the flag nor the field (the bytes past its struct
        // hold a window all the same, which must not be read).
        let options = PackinferPlanOptions {
            struct_size: options_size,
            flags: if window.is_some() { PackinferPlanFlags::SlidingWindow as u32 } else { 0 },
            split_keys: 0,
            capacity: 0.0,
            window_left: 3,
        };
        let mut plan = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects.
        let status = unsafe { packinfer_plan_create(ctx, &d, &options, &mut plan) };
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        let mut launch = PackinferLaunch::default();
        // SAFETY: live locals; the NULLs are checked by the call.
        assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok);
        for cap in [0.0f32, 4.0, 50.0] {
            case.logits_soft_cap = cap;
            let (status, o, lse) = run(launch, &case, full);
            assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
            assert_close(&case, &o, &lse, &format!("window {window:?} cap {cap}"));
            // An older header's run arguments end before the cap: no soft-cap, whatever the
            // bytes past their end hold.
            let (status, o, lse) = run(launch, &case, first_args);
            assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
            case.logits_soft_cap = 0.0;
            assert_close(&case, &o, &lse, &format!("window {window:?}, first-release run args"));
        }
        case.logits_soft_cap = f32::NAN;
        let (status, ..) = run(launch, &case, full);
        expect(status, PackinferStatus::InvalidArgument, &["logits_soft_cap = NaN"]);
        assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
        assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
    }
    // The flag with a struct too short to hold window_left is refused, by name.
    let d = desc(&base, &[]);
    let options = PackinferPlanOptions {
        struct_size: first_options,
        flags: PackinferPlanFlags::SlidingWindow as u32,
        split_keys: 0,
        capacity: 0.0,
        window_left: 3,
    };
    let mut plan = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects.
    let status = unsafe { packinfer_plan_create(ctx, &d, &options, &mut plan) };
    expect(status, PackinferStatus::InvalidArgument, &["SLIDING_WINDOW", "struct_size = 24"]);
}

/// Custom masks through the C ABI: a masked batch plans and runs to the reference (causal not
/// applied, a window still is); a second-release PackinferBatchDesc (no mask fields) plans
/// without a mask whatever the bytes past its end hold; bad offsets and a NULL mask are named.
#[test]
fn custom_mask_through_the_c_abi() {
    let ctx = cpu_context();
    let masked = small_case(43).with_features(Some(40), 0.0).with_random_mask(&mut rng(43), 0.4, true);
    let plan_run = |case: &Case, d: &PackinferBatchDesc| {
        let options = PackinferPlanOptions {
            struct_size: std::mem::size_of::<PackinferPlanOptions>(),
            flags: if case.window_left.is_some() { PackinferPlanFlags::SlidingWindow as u32 } else { 0 },
            split_keys: 0,
            capacity: 0.0,
            window_left: case.window_left.unwrap_or(0),
        };
        let mut plan = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects.
        let status = unsafe { packinfer_plan_create(ctx, d, &options, &mut plan) };
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        let mut launch = PackinferLaunch::default();
        // SAFETY: live locals; the NULLs are checked by the call.
        assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok);
        let o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        let args = run_args(case, &o, &mut lse);
        // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
        assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
        assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
        assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
        (o, lse)
    };
    let d = desc(&masked, &[]);
    assert!(!d.mask_indptr.is_null());
    let (o, lse) = plan_run(&masked, &d);
    assert_close(&masked, &o, &lse, "masked through the C ABI");
    // The mask matters: the same run differs from the unmasked reference.
    let unmasked = small_case(43).with_features(Some(40), 0.0);
    assert!(std::panic::catch_unwind(|| assert_close(&unmasked, &o, &lse, "")).is_err(), "the mask changed nothing");
    // A second-release caller's struct ends before custom_mask: no mask.
    let mut old = d;
    old.struct_size = std::mem::offset_of!(PackinferBatchDesc, custom_mask);
    let (o, lse) = plan_run(&unmasked, &old);
    assert_close(&unmasked, &o, &lse, "second-release batch description");
    // Bad masks are refused by name.
    let mut plan = PackinferPlan::default();
    let mut bad_indptr = masked.batch.mask_indptr.clone();
    bad_indptr[1] += 1;
    let mut d2 = d;
    d2.mask_indptr = bad_indptr.as_ptr();
    // SAFETY: live locals of the types and lengths the call expects.
    let status = unsafe { packinfer_plan_create(ctx, &d2, null(), &mut plan) };
    expect(status, PackinferStatus::InvalidArgument, &["mask_indptr[1] - mask_indptr[0]"]);
    let mut d3 = d;
    d3.custom_mask = null();
    // SAFETY: live locals of the types and lengths the call expects.
    let status = unsafe { packinfer_plan_create(ctx, &d3, null(), &mut plan) };
    expect(status, PackinferStatus::InvalidArgument, &["batch->custom_mask is a null pointer"]);
    let negative = [0i32, -1, -1, -1, -1];
    let mut d4 = d;
    d4.mask_indptr = negative.as_ptr();
    // SAFETY: live locals of the types and lengths the call expects (batch_size + 1 = 5 entries).
    let status = unsafe { packinfer_plan_create(ctx, &d4, null(), &mut plan) };
    expect(status, PackinferStatus::InvalidArgument, &["batch->mask_indptr[4] = -1 is negative"]);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

/// An fp8 e4m3 cache through the C ABI: `kv_dtype` in the batch description (plan time), the
/// scales in the run arguments (per-tensor, per-head, 0 meaning 1); a second-release
/// PackinferRunArgs ending before the scales runs with scales 1 whatever its padding and the
/// bytes past it hold; a second-release PackinferBatchDesc ending before kv_dtype plans K/V of
/// Q's dtype; bad dtypes and scales are named.
#[test]
fn fp8_cache_through_the_c_abi() {
    use common::Fp8Scales;
    assert_eq!(PackinferDtype::Fp8E4m3 as u32, 3);
    let ctx = cpu_context();
    let plan_launch = |d: &PackinferBatchDesc| {
        let mut plan = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects.
        let status = unsafe { packinfer_plan_create(ctx, d, null(), &mut plan) };
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        let mut launch = PackinferLaunch::default();
        // SAFETY: live locals; the NULLs are checked by the call.
        assert_eq!(unsafe { packinfer_launch_create(ctx, plan, null(), null_mut(), &mut launch) }, PackinferStatus::Ok);
        assert_eq!(packinfer_plan_destroy(plan), PackinferStatus::Ok);
        launch
    };
    let run = |launch: PackinferLaunch, case: &Case, edit: &dyn Fn(&mut PackinferRunArgs)| {
        let o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        let mut args = run_args(case, &o, &mut lse);
        edit(&mut args);
        // SAFETY: args address the case's tensors (and scale arrays), which outlive the call (a
        // CPU run is synchronous).
        let status = unsafe { packinfer_run(launch, &args) };
        (status, o, lse)
    };
    for scales in [Fp8Scales::PerTensor, Fp8Scales::PerHead, Fp8Scales::Both] {
        let mut case = small_case(47).with_features(None, 30.0).with_fp8_kv(&mut rng(47), scales);
        let d = desc(&case, &[]);
        assert_eq!(d.kv_dtype, PackinferDtype::Fp8E4m3 as u32);
        let launch = plan_launch(&d);
        let (status, o, lse) = run(launch, &case, &|_| {});
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        assert_close(&case, &o, &lse, &format!("{scales:?} through the C ABI"));
        // A scale of 0 is 1.
        case.k_scale = 1.0;
        let (status, o, lse) = run(launch, &case, &|a| a.k_scale = 0.0);
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        assert_close(&case, &o, &lse, &format!("{scales:?}, k_scale 0"));
        // A second-release caller's struct ends before the scales: scales 1, whatever the padding
        // after logits_soft_cap and the bytes past the struct hold.
        let second = std::mem::offset_of!(PackinferRunArgs, k_head_scales);
        assert_eq!(second, std::mem::offset_of!(PackinferRunArgs, logits_soft_cap) + 8);
        let old = |a: &mut PackinferRunArgs| {
            a.struct_size = second;
            let at = std::mem::offset_of!(PackinferRunArgs, logits_soft_cap) + 4;
            // SAFETY: the 4 padding bytes after logits_soft_cap, inside `a`.
            unsafe { std::ptr::write_bytes((a as *mut PackinferRunArgs as *mut u8).add(at), 0x5A, 4) };
        };
        let (status, o, lse) = run(launch, &case, &old);
        assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
        // The same codes (the same seeds), read with scales 1.
        let mut unscaled = small_case(47).with_features(None, 30.0).with_fp8_kv(&mut rng(47), scales);
        assert_eq!(unscaled.k.bytes, case.k.bytes);
        (unscaled.k_scale, unscaled.v_scale) = (1.0, 1.0);
        unscaled.k_head_scales.clear();
        unscaled.v_head_scales.clear();
        assert_close(&unscaled, &o, &lse, &format!("{scales:?}, second-release run args"));
        // Bad scales, by name.
        let (status, ..) = run(launch, &case, &|a| a.v_scale = -2.0);
        expect(status, PackinferStatus::InvalidArgument, &["v_scale = -2"]);
        let (status, ..) = run(launch, &case, &|a| a.k_scale = f32::INFINITY);
        expect(status, PackinferStatus::InvalidArgument, &["k_scale = inf"]);
        assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    }
    // A second-release description ends before kv_dtype: K/V are Q's dtype (bf16) whatever the
    // field holds in memory past it.
    let plain = small_case(47);
    let mut old = desc(&plain, &[]);
    old.kv_dtype = PackinferDtype::Fp8E4m3 as u32;
    old.struct_size = std::mem::offset_of!(PackinferBatchDesc, kv_dtype);
    let launch = plan_launch(&old);
    let (status, o, lse) = run(launch, &plain, &|_| {});
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    assert_close(&plain, &o, &lse, "second-release batch description");
    // Scales with a bf16 cache are refused (0 and 1 are no scaling).
    let (status, ..) = run(launch, &plain, &|a| (a.k_scale, a.v_scale) = (1.0, 0.0));
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    let (status, ..) = run(launch, &plain, &|a| a.k_scale = 0.5);
    expect(status, PackinferStatus::InvalidArgument, &["k_scale = 0.5", "fp8_e4m3 cache only"]);
    let heads = [1.0f32; 2];
    let (status, ..) = run(launch, &plain, &|a| a.k_head_scales = heads.as_ptr());
    expect(status, PackinferStatus::InvalidArgument, &["k_head_scales = 0x"]);
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    // Bad dtypes, by name.
    let mut plan = PackinferPlan::default();
    for (dtype, kv_dtype, want) in [
        (PackinferDtype::Bf16 as u32, 7, "batch->kv_dtype = 7 is not a PackinferDtype"),
        (PackinferDtype::Bf16 as u32, PackinferDtype::F32 as u32, "kv_dtype = f32 with dtype = bf16"),
        (PackinferDtype::Fp8E4m3 as u32, 0, "dtype = fp8_e4m3, but Q and O are"),
    ] {
        let mut d = desc(&plain, &[]);
        (d.dtype, d.kv_dtype) = (dtype, kv_dtype);
        // SAFETY: live locals of the types and lengths the call expects.
        let status = unsafe { packinfer_plan_create(ctx, &d, null(), &mut plan) };
        expect(status, PackinferStatus::InvalidArgument, &[want]);
    }
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}
