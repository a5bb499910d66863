//! The CUDA-specific C ABI: NO_DEVICE with the reason where CUDA is unusable (what CI sees), and on
//! the GPU machine precompile, launch_create_with_capacity, run, launch_update and run again on
//! the same launch (also after plan_update), each result checked against the float64 reference. Without a usable CUDA
//! device the GPU test is reported as ignored, with the reason; with `PACKINFER_REQUIRE_GPU=1`
//! it fails instead.

use packinfer_testkit as common;
mod support;
use packinfer_testkit::harness;
use support::CDesc;

use std::ffi::CStr;

use common::{assert_close, rng, Case, CaseSpec, Tensor};
use packinfer::backend::cuda::CudaBackend;
use packinfer::backend::{BackendChoice, BackendKind};
use packinfer::testing::{self, sync_stream, DeviceBuffer};
use packinfer::types::{DType, KvLayout};
use packinfer_capi::*;

fn last_error() -> String {
    // SAFETY: never NULL: this thread's message, valid until its next failing call.
    unsafe { CStr::from_ptr(packinfer_last_error()) }.to_string_lossy().into_owned()
}

fn main() {
    harness::main(harness::trials![
        calibrate_is_unsupported_on_the_cpu_backend,
        capacity_launch_update_and_run_through_the_c_abi,
        custom_masks_run_through_the_c_abi,
        fp8_caches_run_on_the_gpu,
        runs_of_one_launch_on_two_streams_do_not_overlap
    ]);
}

/// A CUDA context; where CUDA is unusable (NO_DEVICE, with its reason) the test is reported as
/// skipped (`None`), or fails under `PACKINFER_REQUIRE_GPU=1`.
/// Run arguments over device buffers: `packinfer_run_args_default`'s (contiguous Q and O, the
/// default stream, no soft-cap, no fp8 scales) with the buffers, `l`'s K/V strides and an LSE.
fn device_run_args(
    q: &DeviceBuffer,
    k: &DeviceBuffer,
    v: &DeviceBuffer,
    o: &DeviceBuffer,
    lse: &DeviceBuffer,
    l: &KvLayout,
) -> PackinferRunArgs {
    let mut args = std::mem::MaybeUninit::<PackinferRunArgs>::uninit();
    // SAFETY: a writable PackinferRunArgs, which the call fills whole.
    assert_eq!(unsafe { packinfer_run_args_default(args.as_mut_ptr()) }, PackinferStatus::Ok, "{}", last_error());
    // SAFETY: initialized by the call above.
    let args = unsafe { args.assume_init() };
    let kv = PackinferKvLayout {
        k: k.ptr() as *const _,
        v: v.ptr() as *const _,
        stride_page: l.stride_page,
        stride_token: l.stride_token,
        stride_head: l.stride_head,
        stride_dim: l.stride_dim,
    };
    PackinferRunArgs { q: q.ptr() as *const _, kv, o: o.ptr() as *mut _, lse: lse.ptr() as *mut f32, ..args }
}

fn cuda_context() -> Option<PackinferContext> {
    let mut o = std::mem::MaybeUninit::<PackinferContextOptions>::uninit();
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_options_default(o.as_mut_ptr()) }, PackinferStatus::Ok);
    // SAFETY: packinfer_context_options_default filled every field (asserted OK above).
    let mut o = unsafe { o.assume_init() };
    o.backend = PackinferBackend::Cuda as u32;
    let mut ctx = PackinferContext::default();
    // SAFETY: live locals of the types and lengths the call expects.
    match unsafe { packinfer_context_create(&o, &mut ctx) } {
        PackinferStatus::Ok => Some(ctx),
        PackinferStatus::NoDevice => {
            let msg = last_error();
            assert!(msg.contains("packinfer_context_create") && msg.len() > 40, "NO_DEVICE without a reason: {msg:?}");
            assert!(!harness::required("PACKINFER_REQUIRE_GPU"), "PACKINFER_REQUIRE_GPU=1 but CUDA is unusable here: {msg}");
            harness::skipped(format!("no usable CUDA device here: {msg}"));
            None
        }
        other => panic!("context_create(CUDA) gave {other:?}: {}", last_error()),
    }
}

fn plan(ctx: PackinferContext, case: &Case) -> PackinferPlan {
    let desc = case.c_desc(&[]);
    let mut p = PackinferPlan::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_plan_create(ctx, &desc, std::ptr::null(), &mut p) }, PackinferStatus::Ok, "{}", last_error());
    p
}

fn calibrate_is_unsupported_on_the_cpu_backend() {
    let mut o = std::mem::MaybeUninit::<PackinferContextOptions>::uninit();
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_options_default(o.as_mut_ptr()) }, PackinferStatus::Ok);
    // SAFETY: packinfer_context_options_default filled every field (asserted OK above).
    let mut o = unsafe { o.assume_init() };
    o.backend = PackinferBackend::Cpu as u32;
    let mut ctx = PackinferContext::default();
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_create(&o, &mut ctx) }, PackinferStatus::Ok);
    assert_eq!(packinfer_context_precompile(ctx), PackinferStatus::Ok);
    assert_eq!(packinfer_context_calibrate(ctx), PackinferStatus::Unsupported);
    assert!(last_error().contains("CUDA"), "{}", last_error());
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

/// fp8 e4m3 caches through the C ABI on the GPU: an fp8 batch (per-tensor scales in the run
/// arguments, per-head ones in device memory) plans, launches and runs, and matches the float64
/// reference of the dequantized cache; an fp8 pool is created and hands out its layers' per-head
/// scale addresses.
fn fp8_caches_run_on_the_gpu() {
    let Some(ctx) = cuda_context() else { return };
    let cu = CudaBackend::new(&BackendChoice { kind: Some(BackendKind::Cuda), device_ordinal: 0, cpu_threads: 0, kernel_cache_dir: None })
        .unwrap();
    let dev = testing::device(&cu);
    let spec = CaseSpec {
        batch_size: 0,
        max_kv: 0,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 128,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let mut r = rng(29);
    let case = Case::build(&mut r, &spec, &[(1, 2000), (30, 700), (1, 9)], vec![]).with_fp8_kv(&mut r, common::Fp8Scales::Both);
    let p = plan(ctx, &case);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals; the NULLs are checked by the call.
    let status = unsafe { packinfer_launch_create(ctx, p, std::ptr::null(), std::ptr::null_mut(), &mut launch) };
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    let buf = |bytes: &[u8], what: &str| {
        let b = DeviceBuffer::new(dev, bytes.len(), what).unwrap();
        b.write(dev, bytes).unwrap();
        b
    };
    let f32_bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let (q, k, v) = (buf(&case.q.bytes, "q"), buf(&case.k.bytes, "k"), buf(&case.v.bytes, "v"));
    let (ks, vs) = (buf(&f32_bytes(&case.k_head_scales), "k scales"), buf(&f32_bytes(&case.v_head_scales), "v scales"));
    let o = buf(&Tensor::poisoned(DType::Bf16, case.out_len()).bytes, "o");
    let lse = buf(&vec![0xffu8; case.total_q() * 8 * 4], "lse");
    let l = case.layout;
    let args = PackinferRunArgs {
        k_head_scales: ks.ptr() as *const f32,
        v_head_scales: vs.ptr() as *const f32,
        k_scale: case.k_scale,
        v_scale: case.v_scale,
        ..device_run_args(&q, &k, &v, &o, &lse, &l)
    };
    // SAFETY: args address device buffers of the case's sizes, alive until the stream is synced.
    assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
    sync_stream(dev, 0).unwrap();
    let mut out = Tensor::poisoned(DType::Bf16, case.out_len());
    o.read(dev, &mut out.bytes).unwrap();
    let mut raw = vec![0u8; case.total_q() * 8 * 4];
    lse.read(dev, &mut raw).unwrap();
    let lse_v: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_close(&case, &out, &lse_v, "C ABI, fp8 cache");
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    assert_eq!(packinfer_plan_destroy(p), PackinferStatus::Ok);
    let mut po = std::mem::MaybeUninit::<PackinferPoolOptions>::uninit();
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_pool_options_default(po.as_mut_ptr()) }, PackinferStatus::Ok);
    // SAFETY: packinfer_pool_options_default filled every field (asserted OK above).
    let mut po = unsafe { po.assume_init() };
    (po.num_layers, po.num_qo_heads, po.num_kv_heads, po.head_dim, po.num_pages) = (2, 8, 2, 128, 64);
    po.kv_dtype = PackinferDtype::Fp8E4m3 as u32;
    let mut pool = PackinferPool::default();
    // SAFETY: live locals of the types and lengths the call expects.
    let status = unsafe { packinfer_pool_create(ctx, &po, &mut pool) };
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    let (mut kh, mut vh) = (std::ptr::null::<f32>(), std::ptr::null::<f32>());
    // SAFETY: live locals of the types the call expects.
    assert_eq!(unsafe { packinfer_pool_kv_scales(pool, 1, &mut kh, &mut vh) }, PackinferStatus::Ok, "{}", last_error());
    assert!(!kh.is_null() && !vh.is_null() && kh != vh, "an fp8 pool's layer has per-head scale arrays");
    assert_eq!(packinfer_pool_destroy(pool), PackinferStatus::Ok);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

/// A batch with custom masks (and fully masked rows) plans, launches and runs through the C ABI
/// on the GPU, matching the float64 reference of the masked attention.
fn custom_masks_run_through_the_c_abi() {
    let Some(ctx) = cuda_context() else { return };
    let cu_backend =
        CudaBackend::new(&BackendChoice { kind: Some(BackendKind::Cuda), device_ordinal: 0, cpu_threads: 0, kernel_cache_dir: None })
            .unwrap();
    let dev = testing::device(&cu_backend);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 700,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 128,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let mut r = rng(23);
    let case = Case::build(&mut r, &spec, &[(8, 600), (1, 70), (24, 700)], vec![]).with_random_mask(&mut r, 0.5, true);
    let p = plan(ctx, &case);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals; the NULLs are checked by the call.
    let status = unsafe { packinfer_launch_create(ctx, p, std::ptr::null(), std::ptr::null_mut(), &mut launch) };
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    let _g = dev.enter().unwrap();
    let buffer = |bytes: &[u8], what| {
        let b = DeviceBuffer::new(dev, bytes.len(), what).unwrap();
        b.write(dev, bytes).unwrap();
        b
    };
    let (q, k, v) = (buffer(&case.q.bytes, "q"), buffer(&case.k.bytes, "k"), buffer(&case.v.bytes, "v"));
    let o = buffer(&Tensor::poisoned(DType::Bf16, case.out_len()).bytes, "o");
    let lse_len = case.total_q() * case.shape.num_qo_heads as usize;
    let lse = DeviceBuffer::new(dev, lse_len * 4, "lse").unwrap();
    let l = case.layout;
    let args = device_run_args(&q, &k, &v, &o, &lse, &l);
    // SAFETY: args address device buffers of the case's sizes, alive until the stream is synced.
    assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
    sync_stream(dev, 0).unwrap();
    let mut out = Tensor::poisoned(DType::Bf16, case.out_len());
    o.read(dev, &mut out.bytes).unwrap();
    let mut raw = vec![0u8; lse_len * 4];
    lse.read(dev, &mut raw).unwrap();
    let lse_v: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    common::assert_close_to(&case, &case.reference(), &out, &lse_v, "masked batch through the C ABI");
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    assert_eq!(packinfer_plan_destroy(p), PackinferStatus::Ok);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

fn capacity_launch_update_and_run_through_the_c_abi() {
    let Some(ctx) = cuda_context() else { return };
    assert_eq!(packinfer_context_precompile(ctx), PackinferStatus::Ok, "{}", last_error());
    assert_eq!(packinfer_context_calibrate(ctx), PackinferStatus::Ok, "{}", last_error());
    let mut info = PackinferContextInfo {
        struct_size: std::mem::size_of::<PackinferContextInfo>(),
        backend: 0,
        num_workers: 0,
        device_name: [0; 128],
    };
    // SAFETY: live locals of the types and lengths the call expects.
    assert_eq!(unsafe { packinfer_context_info(ctx, &mut info) }, PackinferStatus::Ok);
    // SAFETY: device_name is NUL-terminated (the library writes at most 127 bytes).
    println!("device {:?}, {} workers after calibration", unsafe { CStr::from_ptr(info.device_name.as_ptr()) }, info.num_workers);
    let cu = CudaBackend::new(&BackendChoice { kind: Some(BackendKind::Cuda), device_ordinal: 0, cpu_threads: 0, kernel_cache_dir: None })
        .unwrap();
    let dev = testing::device(&cu);
    let mut r = rng(21);
    let spec = CaseSpec {
        batch_size: 4,
        max_kv: 600,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F16,
        causal: true,
        decode_fraction: 0.5,
        hnd: true,
    };
    let a = Case::build(&mut r, &spec, &[(1, 500), (12, 40), (1, 3), (6, 600)], vec![]);
    let b = Case::build(&mut r, &spec, &[(3, 200), (1, 599), (15, 15), (1, 77)], vec![]);
    let (pa, pb) = (plan(ctx, &a), plan(ctx, &b));
    let cap = PackinferLaunchCapacity {
        struct_size: std::mem::size_of::<PackinferLaunchCapacity>(),
        max_work_items: 256,
        max_row_segments: 256,
        max_kv_chunks: 256,
        max_requests: 16,
        max_pages: 256,
        max_merge_rows: 1024,
        max_merge_slots: 4096,
        max_groups: 256,
        max_partial_slots: 4096,
        max_custom_mask_bytes: 0,
        max_masked_query_tokens: 0,
    };
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    let st = unsafe { packinfer_launch_create_with_capacity(ctx, pa, std::ptr::null(), &cap, std::ptr::null_mut(), &mut launch) };
    assert_eq!(st, PackinferStatus::Ok, "{}", last_error());
    let kv_bytes = a.k.bytes.len().max(b.k.bytes.len());
    let (q, k, v) = (
        DeviceBuffer::new(dev, a.q.bytes.len(), "q").unwrap(),
        DeviceBuffer::new(dev, kv_bytes, "k").unwrap(),
        DeviceBuffer::new(dev, kv_bytes, "v").unwrap(),
    );
    let (o, lse) = (DeviceBuffer::new(dev, a.out_len() * 2, "o").unwrap(), DeviceBuffer::new(dev, a.total_q() * 8 * 4, "lse").unwrap());
    // Third: batch A again, re-planned into B's plan (packinfer_plan_update) and uploaded into
    // the same launch (the path that skips the consistency check for planner-made plans).
    for (case, which) in [(&a, "A"), (&b, "B"), (&a, "A re-planned")] {
        assert_eq!(case.total_q(), a.total_q());
        q.write(dev, &case.q.bytes).unwrap();
        k.write(dev, &case.k.bytes).unwrap();
        v.write(dev, &case.v.bytes).unwrap();
        o.write(dev, &Tensor::poisoned(DType::F16, case.out_len()).bytes).unwrap();
        if which == "A re-planned" {
            let desc = a.c_desc(&[]);
            // SAFETY: `desc` borrows case A's arrays, alive for the call.
            assert_eq!(unsafe { packinfer_plan_update(ctx, pb, &desc, std::ptr::null()) }, PackinferStatus::Ok, "{}", last_error());
        }
        if which != "A" {
            // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
            assert_eq!(unsafe { packinfer_launch_update(launch, pb, std::ptr::null_mut()) }, PackinferStatus::Ok, "{}", last_error());
        }
        assert_eq!(packinfer_launch_wait(launch), PackinferStatus::Ok);
        let l = case.layout;
        let args = device_run_args(&q, &k, &v, &o, &lse, &l);
        // SAFETY: args address device buffers of the case's sizes, alive until the stream is synced.
        assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
        sync_stream(dev, 0).unwrap();
        let mut out = Tensor::poisoned(DType::F16, case.out_len());
        o.read(dev, &mut out.bytes).unwrap();
        let mut raw = vec![0u8; case.total_q() * 8 * 4];
        lse.read(dev, &mut raw).unwrap();
        let lse_v: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_close(case, &out, &lse_v, &format!("C ABI, batch {which}"));
    }
    // A plan of another shape is refused by update with a message.
    let c = Case::build(&mut r, &CaseSpec { head_dim: 128, ..spec }, &[(1, 10)], vec![]);
    let pc = plan(ctx, &c);
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    assert_eq!(unsafe { packinfer_launch_update(launch, pc, std::ptr::null_mut()) }, PackinferStatus::InvalidArgument);
    assert!(last_error().contains("shape"), "{}", last_error());
    for p in [pa, pb, pc] {
        assert_eq!(packinfer_plan_destroy(p), PackinferStatus::Ok);
    }
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}

/// Runs of one launch on two streams, back to back without a host wait: the launch's work list,
/// group counter and scratch are one per launch, so the library orders the second stream after
/// the first. Each run writes its own poisoned output; both must be complete and right.
fn runs_of_one_launch_on_two_streams_do_not_overlap() {
    let Some(ctx) = cuda_context() else { return };
    use cudarc::driver::result as cu;
    let cu_backend =
        CudaBackend::new(&BackendChoice { kind: Some(BackendKind::Cuda), device_ordinal: 0, cpu_threads: 0, kernel_cache_dir: None })
            .unwrap();
    let dev = testing::device(&cu_backend);
    let mut r = rng(77);
    let spec = CaseSpec {
        batch_size: 6,
        max_kv: 4096,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 128,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let case = Case::build(&mut r, &spec, &[(1, 4000), (300, 3000), (1, 4096), (64, 2048), (1, 1500), (900, 900)], vec![]);
    let p = plan(ctx, &case);
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
    let status = unsafe { packinfer_launch_create(ctx, p, std::ptr::null(), std::ptr::null_mut(), &mut launch) };
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
    assert_eq!(packinfer_launch_wait(launch), PackinferStatus::Ok);
    let _g = dev.enter().unwrap();
    let streams: Vec<u64> = (0..2).map(|_| cu::stream::create(cu::stream::StreamKind::NonBlocking).unwrap() as u64).collect();
    let (q, k, v) = (
        DeviceBuffer::new(dev, case.q.bytes.len(), "q").unwrap(),
        DeviceBuffer::new(dev, case.k.bytes.len(), "k").unwrap(),
        DeviceBuffer::new(dev, case.v.bytes.len(), "v").unwrap(),
    );
    q.write(dev, &case.q.bytes).unwrap();
    k.write(dev, &case.k.bytes).unwrap();
    v.write(dev, &case.v.bytes).unwrap();
    const RUNS: usize = 16;
    let lse_len = case.total_q() * case.shape.num_qo_heads as usize;
    let outs: Vec<(DeviceBuffer, DeviceBuffer)> = (0..RUNS)
        .map(|_| (DeviceBuffer::new(dev, case.out_len() * 2, "o").unwrap(), DeviceBuffer::new(dev, lse_len * 4, "lse").unwrap()))
        .collect();
    for (o, _) in &outs {
        o.write(dev, &Tensor::poisoned(DType::Bf16, case.out_len()).bytes).unwrap();
    }
    let l = case.layout;
    for (i, (o, lse)) in outs.iter().enumerate() {
        let args = PackinferRunArgs { stream: streams[i % 2] as *mut _, ..device_run_args(&q, &k, &v, o, lse, &l) };
        // SAFETY: args address device buffers of the case's sizes, alive until the stream is synced.
        assert_eq!(unsafe { packinfer_run(launch, &args) }, PackinferStatus::Ok, "{}", last_error());
    }
    for &s in &streams {
        sync_stream(dev, s).unwrap();
    }
    let reference = case.reference();
    for (i, (o, lse)) in outs.iter().enumerate() {
        let mut out = Tensor::poisoned(DType::Bf16, case.out_len());
        o.read(dev, &mut out.bytes).unwrap();
        let mut raw = vec![0u8; lse_len * 4];
        lse.read(dev, &mut raw).unwrap();
        let lse_v: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        common::assert_close_to(&case, &reference, &out, &lse_v, &format!("run {i} on stream {}", i % 2));
    }
    for s in streams {
        // SAFETY: a stream this test created, its work finished.
        unsafe { cu::stream::destroy(s as _) }.unwrap();
    }
    assert_eq!(packinfer_launch_destroy(launch), PackinferStatus::Ok);
    assert_eq!(packinfer_plan_destroy(p), PackinferStatus::Ok);
    assert_eq!(packinfer_context_destroy(ctx), PackinferStatus::Ok);
}
