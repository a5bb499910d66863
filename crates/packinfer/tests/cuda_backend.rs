//! The CUDA backend against the naive float64 reference on the GPU machine: random batches
//! (prefill, decode, mixed; page sizes 1/16/64, scattered pages, NHD/HND; both dtypes; every
//! head_dim; GQA 1/4/8), hand-made plans that exercise what today's planner does not emit yet
//! (packed multi-segment tiles, multi-chunk items, split-KV partials + merges, shared-prefix
//! tiles), deterministic rows across batches, graph capture + replay after `update`, and the KV
//! append / page-copy kernels. Outputs are poisoned with NaN first, so an unwritten row fails.
//! Without a usable CUDA device the GPU tests are reported as ignored, with the reason; with
//! `PACKINFER_REQUIRE_GPU=1` (the GPU machine's suite) they fail instead.

use packinfer_testkit as common;
use packinfer_testkit::harness;

use std::sync::Arc;

use common::{assert_close_to, rel_frobenius, rng, Case, CaseSpec, Tensor};
use cudarc::driver::{result as cu, sys};
use packinfer::backend::cuda::CudaBackend;
use packinfer::backend::{Backend, BackendChoice, BackendKind, BoundPlan, LaunchCapacity};
use packinfer::plan::{DeviceProfile, KvChunk, MergeRow, MergeSlot, Plan, PlanOptions, RowSegment, WorkItem, WorkUnit, FINAL_OUTPUT};
use packinfer::testing::{self, sync_stream, CudaBound, DeviceBuffer};
use packinfer::types::{DType, KvLayout, PrefixGroup, RowsTensor, RunArgs};
use rand::rngs::SmallRng;
use rand::Rng;

fn main() {
    harness::main(harness::trials![
        random_batches_match_f64_reference,
        warp_specialized_kernel_with_tma,
        specialized_launches_choose_the_kernel_per_run_layout,
        warp_specialized_kernel_is_chosen_for_long_rows_over_pages_in_order,
        short_batches_run_on_narrow_tiles,
        every_head_dim_dtype_gqa_and_page_size,
        every_plan_options_combination,
        handmade_plans_packed_split_prefix,
        deterministic_rows_are_bitwise_identical_across_batches,
        graph_capture_replays_updated_plans,
        steps_planned_ahead_on_another_thread_update_without_waiting,
        append_kv_and_copy_pages_match_host,
        precompile_builds_every_variant,
        handmade_plans_are_valid_on_the_cpu_backend,
        calibration_fits_and_stores_a_profile,
        window_and_soft_cap_on_every_kernel,
        soft_cap_is_taken_from_each_run,
        head_dims_96_and_192_long_and_split,
        fp8_cache_random_batches_match_f64_reference,
        fp8_scales_are_taken_from_each_run,
        custom_masks_on_every_kernel,
        custom_masks_through_capacity_updates,
        a_capacity_launch_suits_the_plans_of_its_kernel,
    ]);
}

/// The backend on device 0; without one the test is reported as skipped (`None`), or fails
/// under `PACKINFER_REQUIRE_GPU=1`.
fn backend(test: &str) -> Option<CudaBackend> {
    let choice = BackendChoice {
        kind: Some(BackendKind::Cuda),
        device_ordinal: 0,
        cpu_threads: 0,
        kernel_cache_dir: std::env::var_os("PACKINFER_TEST_CACHE_DIR").map(Into::into),
    };
    match CudaBackend::new(&choice) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(!harness::required("PACKINFER_REQUIRE_GPU"), "{test}: PACKINFER_REQUIRE_GPU=1 but no usable CUDA device here ({e})");
            harness::skipped(format!("no usable CUDA device here ({e})"));
            None
        }
    }
}

/// A case's tensors on the device, with room for `q_cap`/`kv_cap` bytes so another case of the
/// same shape can be loaded into the same addresses (graph replay).
struct DeviceCase {
    q: DeviceBuffer,
    k: DeviceBuffer,
    v: DeviceBuffer,
    o: DeviceBuffer,
    lse: DeviceBuffer,
    /// An fp8 case's per-head K and V scales (device memory, as runs read them), if it has them.
    head_scales: Option<(DeviceBuffer, DeviceBuffer)>,
}

impl DeviceCase {
    fn new(cu: &CudaBackend, q_bytes: usize, kv_bytes: usize, out_bytes: usize, lse_len: usize) -> DeviceCase {
        let dev = testing::device(cu);
        DeviceCase {
            q: DeviceBuffer::new(dev, q_bytes, "q").unwrap(),
            k: DeviceBuffer::new(dev, kv_bytes, "k").unwrap(),
            v: DeviceBuffer::new(dev, kv_bytes, "v").unwrap(),
            o: DeviceBuffer::new(dev, out_bytes, "o").unwrap(),
            lse: DeviceBuffer::new(dev, lse_len * 4, "lse").unwrap(),
            head_scales: None,
        }
    }
    fn for_case(cu: &CudaBackend, case: &Case) -> DeviceCase {
        let d = DeviceCase::new(
            cu,
            case.q.bytes.len(),
            case.k.bytes.len(),
            case.out_len() * 2,
            case.total_q() * case.shape.num_qo_heads as usize,
        );
        let mut d = d;
        if !case.k_head_scales.is_empty() || !case.v_head_scales.is_empty() {
            let h = case.shape.num_kv_heads as usize;
            let dev = testing::device(cu);
            d.head_scales = Some((DeviceBuffer::new(dev, h * 4, "k scales").unwrap(), DeviceBuffer::new(dev, h * 4, "v scales").unwrap()));
        }
        d.load(cu, case);
        d
    }
    /// Copies the case's inputs and poisons the outputs (NaN everywhere).
    fn load(&self, cu: &CudaBackend, case: &Case) {
        let dev = testing::device(cu);
        self.q.write(dev, &case.q.bytes).unwrap();
        self.k.write(dev, &case.k.bytes).unwrap();
        self.v.write(dev, &case.v.bytes).unwrap();
        self.o.write(dev, &Tensor::poisoned(case.shape.dtype, case.out_len()).bytes).unwrap();
        let nan: Vec<u8> =
            std::iter::repeat_n(f32::NAN.to_le_bytes(), case.total_q() * case.shape.num_qo_heads as usize).flatten().collect();
        self.lse.write(dev, &nan).unwrap();
        if let Some((k, v)) = &self.head_scales {
            let bytes = |x: &Vec<f32>| -> Vec<u8> {
                let ones = vec![1.0f32; case.shape.num_kv_heads as usize];
                (if x.is_empty() { &ones } else { x }).iter().flat_map(|f| f.to_le_bytes()).collect()
            };
            k.write(dev, &bytes(&case.k_head_scales)).unwrap();
            v.write(dev, &bytes(&case.v_head_scales)).unwrap();
        }
    }
    fn args(&self, case: &Case, stream: u64) -> RunArgs {
        let (hq, d) = (case.shape.num_qo_heads as i64, case.shape.head_dim as i64);
        RunArgs {
            q: RowsTensor { ptr: self.q.ptr(), stride_token: hq * d, stride_head: d },
            kv: KvLayout { k: self.k.ptr(), v: self.v.ptr(), ..case.layout },
            o: RowsTensor { ptr: self.o.ptr(), stride_token: hq * d, stride_head: d },
            lse: self.lse.ptr(),
            stream,
            logits_soft_cap: case.logits_soft_cap,
            // The case's scales (1 and none for a 16-bit cache), the per-head ones in device memory.
            kv_scales: packinfer::types::KvScales {
                k_scale: case.k_scale,
                v_scale: case.v_scale,
                k_head_scales: self.head_scales.as_ref().map_or(0, |(k, _)| k.ptr()),
                v_head_scales: self.head_scales.as_ref().map_or(0, |(_, v)| v.ptr()),
            },
        }
    }
    fn outputs(&self, cu: &CudaBackend, case: &Case) -> (Tensor, Vec<f32>) {
        let dev = testing::device(cu);
        let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
        self.o.read(dev, &mut o.bytes).unwrap();
        let mut raw = vec![0u8; case.total_q() * case.shape.num_qo_heads as usize * 4];
        self.lse.read(dev, &mut raw).unwrap();
        (o, raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Runs `plan` for `case` on stream 0 and returns the outputs.
fn run_plan(cu: &CudaBackend, case: &Case, plan: Plan) -> (Tensor, Vec<f32>) {
    run_plan_inspected(cu, case, plan, |_, _| {})
}

/// `run_plan`, letting `inspect` look at the launch and the run's arguments before the run
/// (which kernel it bound, whether the run copies K/V by TMA).
fn run_plan_inspected(cu: &CudaBackend, case: &Case, plan: Plan, inspect: impl FnOnce(&CudaBound, &RunArgs)) -> (Tensor, Vec<f32>) {
    let dcase = DeviceCase::for_case(cu, case);
    let bound = testing::bind_cuda(cu, Arc::new(plan), 0, None, None).expect("bind");
    bound.wait().unwrap();
    let args = dcase.args(case, 0);
    inspect(&bound, &args);
    // SAFETY: the device copies of the case's tensors, alive until after the stream is synced.
    unsafe { bound.run(&args) }.expect("run");
    sync_stream(testing::device(cu), 0).expect("kernels failed");
    dcase.outputs(cu, case)
}

/// Checks outputs against the f64 reference: per element (tests/common's tolerances) and the
/// relative Frobenius error of O and LSE (≤ 1e-2 bf16, ≤ 2e-3 fp16). Returns the O error.
fn check(case: &Case, o: &Tensor, lse: &[f32], ctx: &str) -> f64 {
    let reference = case.reference();
    let fro_o = rel_frobenius((0..case.out_len()).map(|i| o.get(i)), &reference.0);
    let fro_l = rel_frobenius(lse.iter().map(|&x| x as f64), &reference.1);
    let tol = if case.shape.dtype == DType::Bf16 { 1e-2 } else { 2e-3 };
    assert!(fro_o <= tol && fro_l <= tol, "{ctx}: relative Frobenius error O {fro_o:.2e}, LSE {fro_l:.2e} over {tol:.0e}");
    assert_close_to(case, &reference, o, lse, ctx);
    fro_o
}

fn gpu_spec(r: &mut SmallRng) -> CaseSpec {
    let mut s = CaseSpec::random(r);
    if s.dtype == DType::F32 {
        s.dtype = if r.random_bool(0.5) { DType::F16 } else { DType::Bf16 };
    }
    s
}

/// Checks cases on all cores (the f64 reference is the slow part).
fn check_all(items: Vec<(Case, Tensor, Vec<f32>, String)>) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let chunks: Vec<_> = items.chunks(items.len().div_ceil(threads).max(1)).collect();
    let worst = std::thread::scope(|s| {
        let hs: Vec<_> = chunks
            .iter()
            .map(|c| s.spawn(move || c.iter().map(|(case, o, l, ctx)| check(case, o, l, ctx)).fold(0.0f64, f64::max)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).fold(0.0f64, f64::max)
    });
    println!("{} cases, worst relative Frobenius error of O {worst:.2e}", items.len());
}

fn random_batches_match_f64_reference() {
    let Some(cu) = backend("random_batches_match_f64_reference") else { return };
    let n: usize = std::env::var("PACKINFER_GPU_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let mut r = rng(0xc0da);
    let mut done = Vec::new();
    for i in 0..n {
        let spec = gpu_spec(&mut r);
        let case = Case::random(&mut r, &spec);
        let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let (o, lse) = run_plan(&cu, &case, plan);
        done.push((case, o, lse, format!("case {i} {spec:?}")));
    }
    check_all(done);
}

/// Case `i` of a series that cycles through both dtypes, head_dims 128 and 64, GQA 4 and 1,
/// page sizes 1/16/64, causal and not, NHD and HND (lengths are the caller's).
fn cycled_spec(i: u32) -> CaseSpec {
    let dtype = if i.is_multiple_of(2) { DType::Bf16 } else { DType::F16 };
    let head_dim = if i % 4 < 2 { 128 } else { 64 };
    let group = if i % 8 < 4 { 4 } else { 1 };
    CaseSpec {
        batch_size: 0,
        max_kv: 0,
        page_size: [1, 16, 64][i as usize % 3],
        num_kv_heads: 2,
        group,
        head_dim,
        dtype,
        causal: i % 3 != 2,
        decode_fraction: 0.0,
        hnd: i.is_multiple_of(5),
    }
}

/// The warp-specialised kernel (Hopper; forced here, chosen by default for long rows over pages
/// in order) against the reference: pages in order, so its producer copies whole blocks of
/// consecutive rows by TMA, beside chunk tails and scattered requests that go by cp.async. Page
/// sizes 1/16/64, both dtypes, head_dims 64 and 128, GQA 1 and 4, causal and not, NHD and HND
/// (which has no row view, so no TMA), decodes among the prefills.
fn warp_specialized_kernel_with_tma() {
    // Read when a context opens; the GPU suite runs one test at a time.
    std::env::set_var("PACKINFER_WARP_SPECIALIZED", "1");
    let cu = backend("warp_specialized_kernel_with_tma");
    std::env::remove_var("PACKINFER_WARP_SPECIALIZED");
    let Some(cu) = cu else { return };
    let mut r = rng(0x7e4a);
    let mut done = Vec::new();
    for i in 0..30u32 {
        let spec = cycled_spec(i);
        let lens: Vec<(u32, u32)> = (0..r.random_range(1..5))
            .map(|_| {
                let q = if r.random_bool(0.2) { 1 } else { r.random_range(1..700u32) };
                (q, q + r.random_range(0..1500))
            })
            .collect();
        let case = Case::build_with(&mut r, &spec, &lens, vec![], i % 6 == 5);
        let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let (o, lse) = run_plan_inspected(&cu, &case, plan, |bound, args| {
            // NHD caches have the (dims, heads, rows) view TMA copies from; HND caches do not,
            // except with one slot per page (then they are the same layout).
            assert_eq!(bound.copies_kv_by_tma(args).unwrap(), !spec.hnd || spec.page_size == 1, "case {i}: TMA use");
        });
        done.push((case, o, lse, format!("warp-specialised {i}: {spec:?}, lens {lens:?}")));
    }
    check_all(done);
}

/// A default context binds a long prefill over pages in order to the warp-specialised kernel;
/// a run whose cache has no row view for TMA (HND here) runs the plain kernel instead, one that
/// has one runs TMA. Both against the reference.
fn specialized_launches_choose_the_kernel_per_run_layout() {
    let Some(cu) = backend("specialized_launches_choose_the_kernel_per_run_layout") else { return };
    let mut r = rng(0x1a70);
    let mut done = Vec::new();
    for (i, hnd) in [false, true].into_iter().enumerate() {
        let spec = prompts_spec(hnd);
        let case = Case::build_with(&mut r, &spec, &[(3000, 3000), (2000, 3500)], vec![], false);
        let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let hopper = testing::device(&cu).cc() == (9, 0);
        let (o, lse) = run_plan_inspected(&cu, &case, plan, |bound, args| {
            assert_eq!(bound.warp_specialized(), hopper, "a long prefill over pages in order");
            assert_eq!(bound.copies_kv_by_tma(args).unwrap(), hopper && !hnd);
        });
        done.push((case, o, lse, format!("case {i}, hnd {hnd}")));
    }
    check_all(done);
}

/// Hand-built requests (`Case::build_with`) of the common shape: 2 KV heads of 4 query heads,
/// head_dim 128, bf16, causal, 16-token pages, K/V rows HND-major where `hnd`.
fn prompts_spec(hnd: bool) -> CaseSpec {
    CaseSpec {
        batch_size: 0,
        max_kv: 0,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 128,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.0,
        hnd,
    }
}

/// Which plans the default context runs on the warp-specialised kernel: long rows over pages in
/// order; not scattered pages, short prompts or decodes. Pure (no device).
fn warp_specialized_kernel_is_chosen_for_long_rows_over_pages_in_order() {
    use packinfer::testing::suits_warp_specialized;
    let mut r = rng(0x5e1e);
    let spec = |page_size| CaseSpec {
        batch_size: 0,
        max_kv: 0,
        page_size,
        num_kv_heads: 1,
        group: 1,
        head_dim: 64,
        dtype: DType::F16,
        causal: true,
        decode_fraction: 0.0,
        hnd: false,
    };
    let prefill = [(3000, 3000), (2500, 2500)];
    let ragged = Case::build_with(&mut r, &spec(1), &prefill, vec![], false);
    assert!(suits_warp_specialized(&ragged.shape, &ragged.batch));
    let in_order = Case::build_with(&mut r, &spec(16), &prefill, vec![], false);
    assert!(suits_warp_specialized(&in_order.shape, &in_order.batch));
    let scattered = Case::build_with(&mut r, &spec(16), &prefill, vec![], true);
    assert!(!suits_warp_specialized(&scattered.shape, &scattered.batch));
    let short = Case::build_with(&mut r, &spec(1), &[(200, 200); 8], vec![], false);
    assert!(!suits_warp_specialized(&short.shape, &short.batch));
    let decodes = Case::build_with(&mut r, &spec(16), &[(1, 4000); 8], vec![], false);
    assert!(!suits_warp_specialized(&decodes.shape, &decodes.batch));
    // A chunk of a long prompt beside a few decodes (a continuous-batching step).
    let mixed = Case::build_with(&mut r, &spec(16), &[(2048, 6000), (1, 3000), (1, 2500)], vec![], false);
    assert!(!suits_warp_specialized(&mixed.shape, &mixed.batch));
}

/// Batches of short prompts are planned with 64-row tiles (`profile_for`), so they run on the
/// short-prefill kernel on Hopper (the 4-warp kernel elsewhere); checked like the rest, for both dtypes, head_dims 64 and 128 (the wgmma
/// path on Hopper) and GQA 1 and 4, causal and not.
fn short_batches_run_on_narrow_tiles() {
    let Some(cu) = backend("short_batches_run_on_narrow_tiles") else { return };
    let mut r = rng(0x5407);
    let mut done = Vec::new();
    for i in 0..24u32 {
        let spec = cycled_spec(i);
        // Prompts of 1-200 tokens (a few with a cached part), well under 512 keys per row.
        let lens: Vec<(u32, u32)> = (0..r.random_range(3..24))
            .map(|_| {
                let q = r.random_range(1..200u32);
                (q, q + if r.random_bool(0.2) { r.random_range(1..64) } else { 0 })
            })
            .collect();
        let case = Case::build(&mut r, &spec, &lens, vec![]);
        let profile = cu.profile_for(&case.shape, &case.batch);
        if cu.profile().block_m > 64 {
            assert_eq!(profile.block_m, 64, "a short batch keeps the wide tiles");
        }
        // Every other batch on two workers: a large capacity, so each request's tiles form one
        // run, several items one after another on a CTA (each reusing the row table and the Q
        // tile its predecessor left O rows in).
        let profile = if i % 2 == 1 { DeviceProfile { num_workers: 2, ..profile } } else { profile };
        let plan = Plan::build(case.shape, case.batch.clone(), &profile, PlanOptions::default()).unwrap();
        assert!(plan.items.iter().all(|it| it.num_rows <= profile.block_m));
        // On Hopper they run on the short-prefill kernel (32-key blocks, several CTAs per SM),
        // which moves whole one-request Q and O tiles by TMA (head_dim <= 128 there).
        let (o, lse) = run_plan_inspected(&cu, &case, plan, |bound, args| {
            let short_kernel = testing::device(&cu).cc() == (9, 0) && cu.profile().block_m > 64;
            assert_eq!(bound.block_n() == 32, short_kernel, "short batch {i}: kernel");
            assert_eq!(bound.moves_qo_by_tma(args).unwrap(), short_kernel && spec.head_dim <= 128, "short batch {i}: Q/O by TMA");
        });
        done.push((case, o, lse, format!("short batch {i}: {spec:?}, lens {lens:?}")));
    }
    check_all(done);
}

fn every_head_dim_dtype_gqa_and_page_size() {
    let Some(cu) = backend("every_head_dim_dtype_gqa_and_page_size") else { return };
    let mut r = rng(3);
    let mut done = Vec::new();
    for dtype in [DType::F16, DType::Bf16] {
        for head_dim in [64, 96, 128, 192, 256] {
            for group in [1, 4, 8] {
                for page_size in [1, 16, 64] {
                    let spec = CaseSpec {
                        batch_size: 4,
                        max_kv: 300,
                        page_size,
                        num_kv_heads: 2,
                        group,
                        head_dim,
                        dtype,
                        causal: group != 4,
                        decode_fraction: 0.4,
                        hnd: page_size == 16,
                    };
                    let case = Case::random(&mut r, &spec);
                    let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
                    // Named before it runs: a kernel fault ends the process before check_all.
                    eprintln!("every_head_dim_dtype_gqa_and_page_size: {spec:?}");
                    let (o, lse) = run_plan(&cu, &case, plan);
                    done.push((case, o, lse, format!("{spec:?}")));
                }
            }
        }
    }
    check_all(done);
}

fn every_plan_options_combination() {
    let Some(cu) = backend("every_plan_options_combination") else { return };
    let mut r = rng(99);
    let mut done = Vec::new();
    for bits in 0..32u32 {
        let spec = gpu_spec(&mut r);
        let lens = [(1, 3000), (200, 900), (1, 40), (17, 17), (3, 500)];
        let prefix = vec![PrefixGroup { prefix_len: 30, members: vec![2, 4] }];
        let case = Case::build(&mut r, &CaseSpec { causal: true, ..spec }, &lens, prefix);
        let options = PlanOptions {
            deterministic: bits & 1 != 0,
            packing: bits & 2 == 0,
            balancing: bits & 4 == 0,
            prefix_sharing: bits & 8 == 0,
            split_kv: bits & 16 == 0,
            split_keys: 512,
            ..PlanOptions::default()
        };
        let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), options.clone()).unwrap();
        let (o, lse) = run_plan(&cu, &case, plan);
        done.push((case, o, lse, format!("{options:?}")));
    }
    check_all(done);
}

/// A work item of a hand-made plan with its own row segments and KV chunks, and per query
/// token it holds partially, the token and its tile row (query head 0).
type HandItem = (WorkItem, Vec<RowSegment>, Vec<KvChunk>, Vec<(u32, u32)>);

/// A plan made by hand, with everything the planner may emit: short requests packed into shared
/// tiles (several row segments and chunks), final items split into two chunks, long ones split
/// into partial pieces merged by LSE, and shared prefixes read once for all members' rows; the
/// items in random units, of one group per KV head or of one group per item copy.
fn handmade_plan(case: &Case, block_m: u32, r: &mut SmallRng) -> Plan {
    let base = Plan::build(case.shape, case.batch.clone(), &packinfer::plan::DeviceProfile::cpu(1), PlanOptions::default()).unwrap();
    let mut plan = base;
    (plan.items, plan.units, plan.row_segments, plan.kv_chunks, plan.merges, plan.merge_slots) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let shape = case.shape;
    let group = shape.group_size();
    let mut prefix_of = vec![None; case.batch.len()];
    for pg in &case.batch.prefix_groups {
        for &m in &pg.members {
            prefix_of[m as usize] = Some((pg.members[0], pg.prefix_len, pg.members.clone()));
        }
    }
    let mut items: Vec<HandItem> = vec![];
    // Shared prefixes: one partial item per group holding all members' rows (if they fit).
    let mut prefixed = vec![false; case.batch.len()];
    for pg in &case.batch.prefix_groups {
        let rows: u32 = pg.members.iter().map(|&m| plan.requests[m as usize].q_len * group).sum();
        if rows == 0 || rows > block_m {
            continue;
        }
        let mut segs = vec![];
        let mut tokens = vec![];
        let mut row = 0;
        for &m in &pg.members {
            let q = plan.requests[m as usize].q_len;
            if q == 0 {
                continue;
            }
            segs.push(RowSegment { request: m, q_begin: 0, q_count: q, row_begin: row });
            tokens.extend((0..q).map(|t| (plan.requests[m as usize].q_start + t, row + t * group)));
            row += q * group;
            prefixed[m as usize] = true;
        }
        let chunk = KvChunk { request: pg.members[0], key_begin: 0, key_end: pg.prefix_len, row_begin: 0, row_end: rows };
        items.push((WorkItem { num_rows: rows, partial_slot: 0, ..Default::default() }, segs, vec![chunk], tokens));
    }
    let mut small: Vec<(RowSegment, KvChunk)> = vec![];
    for (ri, req) in plan.requests.iter().enumerate() {
        let ri = ri as u32;
        let key_from = if prefixed[ri as usize] { prefix_of[ri as usize].as_ref().unwrap().1 } else { 0 };
        let per_tile = (block_m / group).max(1);
        let mut q = 0;
        while q < req.q_len {
            let count = per_tile.min(req.q_len - q);
            let rows = count * group;
            let key_end = req.key_limit(q + count - 1, shape.causal);
            let seg = RowSegment { request: ri, q_begin: q, q_count: count, row_begin: 0 };
            let split = key_end > key_from + 128 && r.random_bool(0.6);
            if prefixed[ri as usize] || split {
                // Partial pieces: the suffix after a prefix, and/or 2–3 key ranges.
                let n = if split { r.random_range(2..=3) } else { 1 };
                let mut bounds = vec![key_from];
                for p in 1..n {
                    bounds.push(key_from + (key_end - key_from) * p / n);
                }
                bounds.push(key_end);
                for w in bounds.windows(2) {
                    let chunk = KvChunk { request: ri, key_begin: w[0], key_end: w[1], row_begin: 0, row_end: rows };
                    let tokens = (0..count).map(|t| (req.q_start + q + t, t * group)).collect();
                    items.push((WorkItem { num_rows: rows, partial_slot: 0, ..Default::default() }, vec![seg], vec![chunk], tokens));
                }
            } else if rows <= block_m / 2 {
                small.push((seg, KvChunk { request: ri, key_begin: 0, key_end, row_begin: 0, row_end: rows }));
            } else {
                // A final item whose keys come as two chunks (the online softmax continues).
                let mid = key_end / 2;
                let c1 = KvChunk { request: ri, key_begin: 0, key_end: mid, row_begin: 0, row_end: rows };
                let c2 = KvChunk { key_begin: mid, key_end, ..c1 };
                items.push((
                    WorkItem { num_rows: rows, partial_slot: FINAL_OUTPUT, ..Default::default() },
                    vec![seg],
                    vec![c1, c2],
                    vec![],
                ));
            }
            q += count;
        }
    }
    // Pack the short ones: several requests' rows in one tile, one chunk per segment.
    let mut segs = vec![];
    let mut chunks = vec![];
    let mut row = 0;
    let flush = |segs: &mut Vec<RowSegment>, chunks: &mut Vec<KvChunk>, row: &mut u32, items: &mut Vec<HandItem>| {
        if *row > 0 {
            let item = WorkItem { num_rows: *row, partial_slot: FINAL_OUTPUT, ..Default::default() };
            items.push((item, std::mem::take(segs), std::mem::take(chunks), vec![]));
            *row = 0;
        }
    };
    for (seg, chunk) in small {
        let rows = chunk.row_end;
        if row + rows > block_m {
            flush(&mut segs, &mut chunks, &mut row, &mut items);
        }
        segs.push(RowSegment { row_begin: row, ..seg });
        chunks.push(KvChunk { row_begin: row, row_end: row + rows, ..chunk });
        row += rows;
    }
    flush(&mut segs, &mut chunks, &mut row, &mut items);
    // Random units of 1–3 items in random order: most one group per KV head (several items per
    // group), some a group per item copy. Partial slots in copy order.
    rand::seq::SliceRandom::shuffle(&mut items[..], r);
    let heads = shape.num_kv_heads;
    let (mut next_group, mut next_slot) = (0u32, 0u32);
    // Per (token, KV head 0 query head 0): the merge slots.
    let mut pieces: std::collections::BTreeMap<u32, Vec<MergeSlot>> = Default::default();
    let mut rest = &items[..];
    while !rest.is_empty() {
        let n = r.random_range(1..=3).min(rest.len());
        let (unit, tail) = rest.split_at(n);
        rest = tail;
        let per_copy = r.random_bool(0.3);
        let item_begin = plan.items.len() as u32;
        let slot_stride: u32 = unit.iter().filter(|u| u.0.partial_slot != FINAL_OUTPUT).map(|u| u.0.num_rows).sum();
        let mut slot = next_slot;
        for (k, (item, segs, chunks, tokens)) in unit.iter().enumerate() {
            let mut item = *item;
            item.group = next_group + if per_copy { k as u32 } else { 0 };
            if item.partial_slot != FINAL_OUTPUT {
                item.partial_slot = slot;
                for &(token, row) in tokens {
                    pieces.entry(token).or_default().push(MergeSlot { slot: slot + row, head_stride: slot_stride });
                }
                slot += item.num_rows;
            }
            item.seg_begin = plan.row_segments.len() as u32;
            item.seg_count = segs.len() as u32;
            item.chunk_begin = plan.kv_chunks.len() as u32;
            item.chunk_count = chunks.len() as u32;
            plan.row_segments.extend(segs);
            plan.kv_chunks.extend(chunks);
            plan.items.push(item);
        }
        let group_stride = if per_copy { n as u32 } else { 1 };
        plan.units.push(WorkUnit { item_begin, item_count: n as u32, group_stride, slot_stride });
        next_group += group_stride * heads;
        next_slot += slot_stride * heads;
    }
    for (token, s) in pieces {
        plan.merges.push(MergeRow { q_token: token, slot_begin: plan.merge_slots.len() as u32, slot_count: s.len() as u32 });
        plan.merge_slots.extend(s);
    }
    plan
}

fn handmade_plans_packed_split_prefix() {
    let Some(cu) = backend("handmade_plans_packed_split_prefix") else { return };
    let mut r = rng(0x4a4d);
    let mut done = Vec::new();
    let n: usize = std::env::var("PACKINFER_GPU_CASES").ok().and_then(|s| s.parse().ok()).map(|n: usize| n.min(60)).unwrap_or(60);
    for i in 0..n {
        let spec = gpu_spec(&mut r);
        let spec = CaseSpec { batch_size: 6, ..spec };
        let mut lens: Vec<(u32, u32)> = common::random_lengths(&mut r, &spec);
        // Two requests share a prefix in half the cases.
        let prefix = if i % 2 == 0 {
            let plen = r.random_range(1..=lens[0].1.min(lens[1].1));
            lens[0].0 = lens[0].0.min(lens[0].1 - plen).max(1).min(lens[0].1);
            lens[1].0 = lens[1].0.min(lens[1].1 - plen).max(1).min(lens[1].1);
            vec![PrefixGroup { prefix_len: plen, members: vec![0, 1] }]
        } else {
            vec![]
        };
        let case = Case::build(&mut r, &spec, &lens, prefix);
        // Every other case on 64-row tiles (the 4-warp kernels).
        let plan = handmade_plan(&case, if i % 2 == 1 { 64 } else { cu.profile().block_m }, &mut r);
        let ctx = format!("handmade {i} ({} items, {} merges) {spec:?}", plan.items.len(), plan.merges.len());
        let (o, lse) = run_plan(&cu, &case, plan);
        done.push((case, o, lse, ctx));
    }
    check_all(done);
}

fn deterministic_rows_are_bitwise_identical_across_batches() {
    let Some(cu) = backend("deterministic_rows_are_bitwise_identical_across_batches") else { return };
    let mut r = rng(5);
    for dtype in [DType::F16, DType::Bf16] {
        let spec = CaseSpec {
            batch_size: 3,
            max_kv: 3000,
            page_size: 16,
            num_kv_heads: 2,
            group: 4,
            head_dim: 128,
            dtype,
            causal: true,
            decode_fraction: 0.5,
            hnd: false,
        };
        // Request 0 inside a batch, and the same request (same Q rows, same cache) alone.
        let options = PlanOptions { deterministic: true, split_keys: 512, ..PlanOptions::default() };
        let mut lens = vec![(40, 2500)];
        lens.extend(common::random_lengths(&mut r, &spec));
        let mixed = Case::build(&mut r, &spec, &lens, vec![]);
        let b = &mixed.batch;
        let q0 = b.qo_indptr[1] as usize;
        let batch = packinfer::types::Batch {
            qo_indptr: vec![0, q0 as i32],
            kv_indptr: vec![0, b.kv_indptr[1]],
            kv_page_indices: b.kv_page_indices[..b.kv_indptr[1] as usize].to_vec(),
            kv_last_page_len: vec![b.kv_last_page_len[0]],
            prefix_groups: vec![],
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
            ..b.clone()
        };
        let row = (mixed.shape.num_qo_heads * mixed.shape.head_dim) as usize;
        let copy = |t: &Tensor, n: usize| Tensor { dtype: t.dtype, bytes: t.bytes[..n * 2].to_vec(), exact: t.exact[..n].to_vec() };
        let alone = Case {
            shape: mixed.shape,
            batch,
            q: copy(&mixed.q, q0 * row),
            k: copy(&mixed.k, mixed.k.exact.len()),
            v: copy(&mixed.v, mixed.v.exact.len()),
            layout: mixed.layout,
            hnd: mixed.hnd,
            window_left: None,
            logits_soft_cap: 0.0,
            k_scale: 1.0,
            v_scale: 1.0,
            k_head_scales: Vec::new(),
            v_head_scales: Vec::new(),
        };
        let run = |case: &Case| run_plan(&cu, case, Plan::build(case.shape, case.batch.clone(), &cu.profile(), options.clone()).unwrap());
        let (o1, l1) = run(&alone);
        let (o2, l2) = run(&mixed);
        check(&alone, &o1, &l1, "deterministic, alone");
        let n = alone.out_len() * 2;
        assert_eq!(&o1.bytes[..n], &o2.bytes[..n], "{dtype:?}: request 0's output differs between batches");
        assert_eq!(l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), l2[..l1.len()].iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
}

fn create_stream(cu: &CudaBackend) -> u64 {
    let _g = testing::device(cu).enter().unwrap();
    cu::stream::create(cu::stream::StreamKind::NonBlocking).unwrap() as u64
}

/// `run` captured once in a CUDA graph; the graph replayed after `update` uploads a different
/// batch of the same capacity (same device tensors, new contents) gives that batch's results.
fn graph_capture_replays_updated_plans() {
    let Some(cu) = backend("graph_capture_replays_updated_plans") else { return };
    let mut r = rng(0x96a9);
    let stream = create_stream(&cu);
    for dtype in [DType::Bf16, DType::F16] {
        let spec = CaseSpec {
            batch_size: 5,
            max_kv: 1500,
            page_size: 16,
            num_kv_heads: 2,
            group: 4,
            head_dim: 128,
            dtype,
            causal: true,
            decode_fraction: 0.5,
            hnd: false,
        };
        // Same total query tokens so the O/LSE tensors have the same size.
        let a = Case::build(&mut r, &spec, &[(1, 1400), (30, 300), (1, 90), (8, 1000), (1, 7)], vec![]);
        let b = Case::build(&mut r, &spec, &[(20, 20), (1, 1499), (1, 1), (16, 800), (3, 64)], vec![]);
        assert_eq!(a.total_q(), b.total_q());
        let plan_a = Plan::build(a.shape, a.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let plan_b = Plan::build(b.shape, b.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let cap = LaunchCapacity::of(&plan_a).max(&LaunchCapacity::of(&plan_b));
        let bytes = |c: &Case| c.k.bytes.len();
        let dcase =
            DeviceCase::new(&cu, a.q.bytes.len(), bytes(&a).max(bytes(&b)), a.out_len() * 2, a.total_q() * a.shape.num_qo_heads as usize);
        dcase.load(&cu, &a);
        let bound = cu.bind_with_capacity(Arc::new(plan_a), stream, None, &cap).unwrap();
        bound.wait().unwrap();
        let args = dcase.args(&a, stream);
        let exec = {
            let _g = testing::device(&cu).enter().unwrap();
            // SAFETY: a stream of this context (current), which this test created.
            unsafe { cu::stream::begin_capture(stream as sys::CUstream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) }
                .unwrap();
            // SAFETY: the device copies of case A's tensors, which outlive every replay.
            let ran = unsafe { bound.run(&args) };
            // SAFETY: the capture begun above, on the same thread.
            let graph = unsafe { cu::stream::end_capture(stream as sys::CUstream) }.unwrap();
            ran.unwrap();
            // SAFETY: the graph just captured.
            let exec = unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }.unwrap();
            // SAFETY: the graph, no longer needed once instantiated.
            unsafe { cu::graph::destroy(graph) }.unwrap();
            exec
        };
        let replay = || {
            let _g = testing::device(&cu).enter().unwrap();
            // SAFETY: the instantiated graph, on the stream it was captured from (context current).
            unsafe { cu::graph::launch(exec, stream as sys::CUstream) }.unwrap();
            drop(_g);
            sync_stream(testing::device(&cu), stream).unwrap();
        };
        replay();
        let (o, lse) = dcase.outputs(&cu, &a);
        check(&a, &o, &lse, &format!("{dtype:?} graph, batch A"));
        // Batch B: new contents at the same addresses (B's KV layout has A's strides: same spec),
        // a new plan uploaded into the same buffers, the same graph replayed.
        assert_eq!(a.layout.stride_page, b.layout.stride_page);
        dcase.load(&cu, &b);
        bound.update(Arc::new(plan_b), stream).unwrap();
        bound.wait().unwrap();
        replay();
        let (o, lse) = dcase.outputs(&cu, &b);
        check(&b, &o, &lse, &format!("{dtype:?} graph replay, batch B"));
        // A plan over the capacity is refused with a message naming the count.
        let big = Case::build(&mut r, &spec, &[(1, 10); 40], vec![]);
        let plan_big = Plan::build(big.shape, big.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
        let err = bound.update(Arc::new(plan_big), stream).unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
        let _g = testing::device(&cu).enter().unwrap();
        // SAFETY: the instantiated graph; its replays have finished (synced).
        unsafe { cu::graph::exec_destroy(exec) }.unwrap();
    }
}

/// The engine loop of docs/design.md §10 on the device: step N's layers are enqueued, then a
/// thread re-plans step N+1 into the same plan (`Plan::rebuild`: the launch holds no plan) while
/// the device runs them, then `update` enqueues the upload behind them and step N+1's layers
/// follow, with no host wait anywhere until the end. More steps than the launch has staging
/// images, so the ring fills. Every step's outputs are checked after one final sync, and some
/// update must have returned while its own upload was still queued (no host synchronisation).
fn steps_planned_ahead_on_another_thread_update_without_waiting() {
    let Some(cu) = backend("steps_planned_ahead_on_another_thread_update_without_waiting") else { return };
    let mut r = rng(0x2121);
    let stream = create_stream(&cu);
    let spec = CaseSpec {
        batch_size: 8,
        max_kv: 3000,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 128,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.7,
        hnd: false,
    };
    let mut steps: Vec<Case> = (0..7).map(|_| Case::random(&mut r, &spec)).collect();
    let shared: Vec<(u32, u32)> = (0..8).map(|i| (1, 2000 + 100 * i)).collect();
    steps.insert(3, Case::build(&mut r, &spec, &shared, vec![PrefixGroup { prefix_len: 1024, members: (0..8).collect() }]));
    let profile = cu.profile();
    let plan_of = |c: &Case| Plan::build(c.shape, c.batch.clone(), &profile, PlanOptions::default()).unwrap();
    let cap = steps.iter().map(|c| LaunchCapacity::of(&plan_of(c))).fold(LaunchCapacity::default(), |a, b| a.max(&b));
    let dcases: Vec<DeviceCase> = steps.iter().map(|c| DeviceCase::for_case(&cu, c)).collect();
    sync_stream(testing::device(&cu), 0).unwrap();
    let mut plan = Arc::new(plan_of(&steps[0]));
    let bound = cu.bind_with_capacity(plan.clone(), stream, None, &cap).unwrap();
    const LAYERS: usize = 24;
    let mut still_queued = 0;
    for n in 0..steps.len() {
        if n > 0 {
            bound.update(plan.clone(), stream).unwrap();
            still_queued += !bound.is_ready().unwrap() as usize;
        }
        let args = dcases[n].args(&steps[n], stream);
        for _ in 0..LAYERS {
            // SAFETY: the device copies of step n's tensors, alive until the final sync.
            unsafe { bound.run(&args) }.unwrap();
        }
        if n + 1 < steps.len() {
            // The launch holds no plan: the next step is planned into the same one, on another
            // thread, while the device runs this step.
            let p = Arc::get_mut(&mut plan).expect("a CUDA launch keeps no reference to its plan");
            let next = &steps[n + 1];
            std::thread::scope(|s| s.spawn(|| p.rebuild(next.shape, &next.batch, &profile, PlanOptions::default()).unwrap()).join())
                .unwrap();
        }
    }
    sync_stream(testing::device(&cu), stream).unwrap();
    println!("{still_queued} of {} updates returned before their upload ran", steps.len() - 1);
    assert!(still_queued > 0, "every update returned only after its upload had run: the host waited for the device");
    for (n, (c, d)) in steps.iter().zip(&dcases).enumerate() {
        let (o, lse) = d.outputs(&cu, c);
        check(c, &o, &lse, &format!("step {n}, planned ahead"));
    }
}

fn append_kv_and_copy_pages_match_host() {
    let Some(cu) = backend("append_kv_and_copy_pages_match_host") else { return };
    let mut r = rng(12);
    let dev = testing::device(&cu);
    for (page_size, hnd) in [(1u32, false), (16, true), (64, false)] {
        let (pages, heads, dim) = (12u32, 2u32, 128u32);
        let n = (pages * page_size * heads * dim) as usize;
        let (sp, st, sh) = if hnd {
            ((page_size * heads * dim) as i64, dim as i64, (page_size * dim) as i64)
        } else {
            ((page_size * heads * dim) as i64, (heads * dim) as i64, dim as i64)
        };
        let mut k: Vec<u16> = (0..n).map(|_| r.random()).collect();
        let mut v: Vec<u16> = (0..n).map(|_| r.random()).collect();
        let kd = DeviceBuffer::new(dev, n * 2, "k").unwrap();
        let vd = DeviceBuffer::new(dev, n * 2, "v").unwrap();
        let bytes = |x: &[u16]| x.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
        kd.write(dev, &bytes(&k)).unwrap();
        vd.write(dev, &bytes(&v)).unwrap();
        let layout = KvLayout { k: kd.ptr(), v: vd.ptr(), stride_page: sp, stride_token: st, stride_head: sh, stride_dim: 1 };
        // Append: distinct random slots, one skipped (-1).
        let tokens = 9u32;
        let mut all: Vec<i64> = (0..(pages * page_size) as i64).collect();
        rand::seq::SliceRandom::shuffle(&mut all[..], &mut r);
        let mut slots: Vec<i64> = all[..tokens as usize].to_vec();
        slots[3] = -1;
        let kn: Vec<u16> = (0..tokens * heads * dim).map(|_| r.random()).collect();
        let vn: Vec<u16> = (0..tokens * heads * dim).map(|_| r.random()).collect();
        let sd = DeviceBuffer::new(dev, slots.len() * 8, "slots").unwrap();
        sd.write(dev, &slots.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let knd = DeviceBuffer::new(dev, kn.len() * 2, "kn").unwrap();
        let vnd = DeviceBuffer::new(dev, vn.len() * 2, "vn").unwrap();
        knd.write(dev, &bytes(&kn)).unwrap();
        vnd.write(dev, &bytes(&vn)).unwrap();
        // SAFETY: device buffers of this size: `tokens` slots inside the cache's pages, as many
        // rows of new K and V; the copies below wait for the stream.
        unsafe { testing::append_kv(&cu, &layout, page_size, sd.ptr(), knd.ptr(), vnd.ptr(), tokens, heads, dim, DType::Bf16, 0) }.unwrap();
        let at = |page: i64, t: i64, h: i64, d: i64| (page * sp + t * st + h * sh + d) as usize;
        for (ti, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            for h in 0..heads as i64 {
                for d in 0..dim as i64 {
                    let src = (ti as i64 * heads as i64 + h) * dim as i64 + d;
                    k[at(slot / page_size as i64, slot % page_size as i64, h, d)] = kn[src as usize];
                    v[at(slot / page_size as i64, slot % page_size as i64, h, d)] = vn[src as usize];
                }
            }
        }
        // Copy pages 1→7, 4→2 and 9→0 (after the append, in stream order).
        let pairs: Vec<i32> = vec![1, 7, 4, 2, 9, 0];
        let pd = DeviceBuffer::new(dev, pairs.len() * 4, "pairs").unwrap();
        pd.write(dev, &pairs.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        // SAFETY: three pairs of distinct pages of the cache's twelve, in a device buffer.
        unsafe { testing::copy_pages(&cu, &layout, page_size, pd.ptr(), 3, heads, dim, 1, 0, DType::F16, 0) }.unwrap();
        for p in pairs.chunks(2) {
            for t in 0..page_size as i64 {
                for h in 0..heads as i64 {
                    for d in 0..dim as i64 {
                        k[at(p[1] as i64, t, h, d)] = k[at(p[0] as i64, t, h, d)];
                        v[at(p[1] as i64, t, h, d)] = v[at(p[0] as i64, t, h, d)];
                    }
                }
            }
        }
        sync_stream(dev, 0).unwrap();
        let mut got = vec![0u8; n * 2];
        kd.read(dev, &mut got).unwrap();
        assert!(got == bytes(&k), "K after append + copy differs (page_size {page_size}, hnd {hnd})");
        vd.read(dev, &mut got).unwrap();
        assert!(got == bytes(&v), "V after append + copy differs (page_size {page_size}, hnd {hnd})");
    }
}

fn precompile_builds_every_variant() {
    let Some(cu) = backend("precompile_builds_every_variant") else { return };
    let t = std::time::Instant::now();
    cu.precompile().unwrap();
    println!("precompile: {:.2} s (cache dir {:?})", t.elapsed().as_secs_f64(), testing::kernel_cache_dir(&cu));
    for d in [64, 96, 128, 192, 256] {
        for dt in [DType::F16, DType::Bf16] {
            let k = testing::attention_kernel_stats(&cu, d, dt).unwrap();
            println!(
                "attention d{d} {}: {} regs, {} B local, {} B smem, {} CTAs/SM",
                dt.name(),
                k.registers,
                k.local_bytes,
                k.smem_bytes,
                k.ctas_per_sm
            );
            for warps in [4, 8] {
                let k = testing::fp8_attention_kernel_stats(&cu, d, dt, warps).unwrap();
                println!(
                    "  fp8 K/V, {warps} warps: {} regs, {} B local, {} B smem, {} CTAs/SM",
                    k.registers, k.local_bytes, k.smem_bytes, k.ctas_per_sm
                );
            }
        }
    }
}

/// The hand-made plans are themselves checked on the CPU reference backend (runs in CI too), so
/// a GPU failure on them is the kernel's, not the generator's.
fn handmade_plans_are_valid_on_the_cpu_backend() {
    let cpu = packinfer::backend::cpu::CpuBackend::new(2);
    let mut r = rng(0x4a4d);
    for i in 0..12 {
        let spec = CaseSpec { batch_size: 6, max_kv: 700, ..gpu_spec(&mut r) };
        let mut lens: Vec<(u32, u32)> = common::random_lengths(&mut r, &spec);
        let plen = r.random_range(1..=lens[0].1.min(lens[1].1));
        lens[0].0 = lens[0].0.min(lens[0].1 - plen).max(1).min(lens[0].1);
        lens[1].0 = lens[1].0.min(lens[1].1 - plen).max(1).min(lens[1].1);
        let case = Case::build(&mut r, &spec, &lens, vec![PrefixGroup { prefix_len: plen, members: vec![0, 1] }]);
        let plan = Arc::new(handmade_plan(&case, 64, &mut r));
        let bound = cpu.bind(plan.clone(), 0, None).unwrap();
        let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
        unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.unwrap();
        common::assert_close(&case, &o, &lse, &format!("handmade on cpu {i} ({} items, {} merges)", plan.items.len(), plan.merges.len()));
    }
}

fn calibration_fits_and_stores_a_profile() {
    let Some(cu) = backend("calibration_fits_and_stores_a_profile") else { return };
    let (profile, samples) = testing::calibrate(&cu).unwrap();
    for s in &samples {
        println!("calibration: {:>2} rows x {:>4} keys: {:.2} us per item", s.rows, s.keys, s.item_us);
    }
    println!("calibrated profile: {profile:?} (stored at {:?})", cu.profile_path());
    assert!(profile.cost_row_key > 0.0 && profile.cost_key > 0.0 && profile.cost_item > 0.0);
    // Longer items must cost more under the fitted model.
    let cost = |rows: f64, keys: f64| profile.cost_row_key * rows * keys + profile.cost_key * keys + profile.cost_item;
    assert!(cost(64.0, 2048.0) > cost(64.0, 256.0) && cost(4.0, 2048.0) > cost(4.0, 16.0));
    if cu.profile_path().is_some() {
        let again = CudaBackend::new(&BackendChoice {
            kind: Some(BackendKind::Cuda),
            device_ordinal: 0,
            cpu_threads: 0,
            kernel_cache_dir: testing::kernel_cache_dir(&cu).map(Into::into),
        })
        .unwrap();
        assert_eq!(again.profile(), profile, "a new context does not load the stored profile");
    }
}

/// Sliding window and soft-cap on every kernel: the plain kernel (default context, mixed
/// batches with decodes and splits), the warp-specialised one (forced, long prefills over pages
/// in order, TMA) and the short-prefill one (batches of short prompts on 64-row tiles), both
/// dtypes, head_dims 64 and 128, GQA 1 and 4, causal and not, against the f64 reference.
fn window_and_soft_cap_on_every_kernel() {
    on_every_kernel(
        "window_and_soft_cap_on_every_kernel",
        0x51de,
        |kernel, i, r| {
            let spec = cycled_spec(i);
            let lens: Vec<(u32, u32)> = match kernel {
                "plain" => (0..r.random_range(2..7))
                    .map(|_| {
                        let q = if r.random_bool(0.5) { 1 } else { r.random_range(1..300u32) };
                        (q, q + r.random_range(0..5000))
                    })
                    .collect(),
                "warp-specialised" => {
                    (0..r.random_range(1..3)).map(|_| (r.random_range(300..1500u32), r.random_range(1500..3000u32))).collect()
                }
                _ => (0..r.random_range(3..16)).map(|_| (r.random_range(1..200u32), 0)).map(|(q, _)| (q, q)).collect(),
            };
            let lens: Vec<(u32, u32)> = lens.into_iter().map(|(q, kv)| (q.min(kv), kv.max(q))).collect();
            let window = [Some(0), Some(7), Some(100), Some(1024), None][i as usize % 5];
            let cap = [30.0, 0.0, 5.0][i as usize % 3];
            let case = Case::build_with(r, &spec, &lens, vec![], kernel == "plain").with_features(window, cap);
            (case, format!("window {window:?}, cap {cap}, {spec:?}, lens {lens:?}"))
        },
        |_, _, _| {},
    );
}

/// 16 cases on each kernel a plan can meet, each kernel on its own context: the plain kernel
/// (the default context), the warp-specialised one (forced) and the short-prefill one (its
/// batches planned for 64-row tiles). `case_of(kernel, i, rng)` builds case i and says what it
/// is; every fourth is planned deterministically in 512-key pieces. `inspect` sees each launch
/// and run's arguments before the run. All are checked against the f64 reference.
fn on_every_kernel(
    test: &str,
    seed: u64,
    mut case_of: impl FnMut(&str, u32, &mut SmallRng) -> (Case, String),
    inspect: impl Fn(&str, &CudaBound, &RunArgs),
) {
    let mut done = Vec::new();
    for kernel in ["plain", "warp-specialised", "short"] {
        // Read when a context opens; the GPU suite runs one test at a time.
        if kernel == "warp-specialised" {
            std::env::set_var("PACKINFER_WARP_SPECIALIZED", "1");
        }
        let cu = backend(test);
        std::env::remove_var("PACKINFER_WARP_SPECIALIZED");
        let Some(cu) = cu else { return };
        let mut r = rng(seed ^ kernel.len() as u64);
        for i in 0..16u32 {
            let (case, what) = case_of(kernel, i, &mut r);
            let profile = if kernel == "short" { cu.profile_for(&case.shape, &case.batch) } else { cu.profile() };
            let options = case.plan_options(if i % 4 == 3 {
                PlanOptions { deterministic: true, split_keys: 512, ..PlanOptions::default() }
            } else {
                PlanOptions::default()
            });
            let plan = Plan::build(case.shape, case.batch.clone(), &profile, options).unwrap();
            let ctx = format!("{kernel} {i}: {what}");
            let (o, lse) = run_plan_inspected(&cu, &case, plan, |bound, args| inspect(&ctx, bound, args));
            done.push((case, o, lse, ctx));
        }
    }
    check_all(done);
}

/// The soft-cap is a run parameter on the GPU too: one launch, run with caps 0, 50 and 5 in
/// turn (the kernel parameters change, the uploaded plan does not), each checked against the
/// reference of its own cap.
fn soft_cap_is_taken_from_each_run() {
    let Some(cu) = backend("soft_cap_is_taken_from_each_run") else { return };
    let mut r = rng(0x5ca9);
    let spec = cycled_spec(0);
    let mut case = Case::build(&mut r, &spec, &[(1, 3000), (40, 900), (1, 17), (200, 200)], vec![]);
    let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
    let dcase = DeviceCase::for_case(&cu, &case);
    let bound = testing::bind_cuda(&cu, Arc::new(plan), 0, None, None).expect("bind");
    bound.wait().unwrap();
    for cap in [0.0, 50.0, 5.0] {
        case.logits_soft_cap = cap;
        // SAFETY: the device copies of the case's tensors, alive until after the stream is synced.
        unsafe { bound.run(&dcase.args(&case, 0)) }.expect("run");
        sync_stream(testing::device(&cu), 0).expect("kernels failed");
        let (o, lse) = dcase.outputs(&cu, &case);
        check(&case, &o, &lse, &format!("cap {cap}"));
    }
}

/// head_dim 96 (Phi-3; stored in 128-dim tiles) and 192 run the plain mma.sync kernel: long
/// prefills (final rows staged through shared memory), split decodes (merged partials), windows
/// and soft-caps, both dtypes, against the reference.
fn head_dims_96_and_192_long_and_split() {
    let Some(cu) = backend("head_dims_96_and_192_long_and_split") else { return };
    let mut r = rng(0x96192);
    let mut done = Vec::new();
    for (i, head_dim) in [96u32, 192, 96, 192].into_iter().enumerate() {
        let spec = CaseSpec { head_dim, hnd: i >= 2, ..cycled_spec(i as u32) };
        let lens = [(1, 6000), (700, 1500), (1, 33), (40, 40), (3, 900)];
        let (window, cap) = if i >= 2 { (Some(300), 20.0) } else { (None, 0.0) };
        let case = Case::build_with(&mut r, &spec, &lens, vec![], i % 2 == 0).with_features(window, cap);
        // Deterministic 1024-key pieces: the long decode is split and merged.
        let options = case.plan_options(PlanOptions { deterministic: true, split_keys: 1024, ..PlanOptions::default() });
        let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), options).unwrap();
        assert!(!plan.merges.is_empty(), "the 6000-key decode is split");
        let (o, lse) = run_plan(&cu, &case, plan);
        done.push((case, o, lse, format!("head_dim {head_dim} case {i}: {spec:?}")));
    }
    check_all(done);
}

/// fp8 e4m3 K/V caches (the plain kernel's fp8 variant, whatever the context's kernel choice)
/// against the float64 reference of the dequantized cache (code × scale), with the output
/// dtype's tolerance (the conversion to Q's type is exact): decode-heavy batches (4-warp tiles),
/// mixed prefill and decode (8-warp tiles), split keys merged (deterministic 256-key pieces), GQA
/// 1/4/8, both Q dtypes, every head_dim, page sizes 1/16/64, scattered pages, NHD and HND,
/// per-tensor, per-head and combined scales (per-head ones differ by up to 8× between heads),
/// sliding windows and soft-caps, and a context that forces the warp-specialised kernel.
fn fp8_cache_random_batches_match_f64_reference() {
    use common::Fp8Scales;
    let mut done = Vec::new();
    for kernels in ["auto", "always-specialised"] {
        // Read when a context opens; the GPU suite runs one test at a time.
        if kernels == "always-specialised" {
            std::env::set_var("PACKINFER_WARP_SPECIALIZED", "1");
        }
        let cu = backend("fp8_cache_random_batches_match_f64_reference");
        std::env::remove_var("PACKINFER_WARP_SPECIALIZED");
        let Some(cu) = cu else { return };
        let mut r = rng(0xf8c0 ^ kernels.len() as u64);
        // PACKINFER_GPU_CASES lowers the count (the sanitizer runs of gpu_suite.sh).
        let cap: usize = std::env::var("PACKINFER_GPU_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48);
        let n = if kernels == "auto" { cap.min(48) } else { (cap / 4).clamp(1, 12) };
        for i in 0..n {
            let spec = CaseSpec { head_dim: [128, 64, 128, 256, 96, 192][i % 6], group: [4, 1, 8][i % 3], ..cycled_spec(i as u32) };
            let lens: Vec<(u32, u32)> = match i % 3 {
                // Decode-heavy: every tile at most 64 rows (the narrow kernel).
                0 => (0..r.random_range(4..24)).map(|_| (1, r.random_range(1..6000u32))).collect(),
                // Mixed prefill and decode.
                1 => (0..r.random_range(2..8))
                    .map(|_| {
                        let q = if r.random_bool(0.5) { 1 } else { r.random_range(1..400u32) };
                        (q, q + r.random_range(0..3000))
                    })
                    .collect(),
                // A long decode that the split merges, beside short prefills.
                _ => vec![(1, r.random_range(3000..9000u32)), (r.random_range(1..100u32), 700), (1, 17)],
            };
            let lens: Vec<(u32, u32)> = lens.into_iter().map(|(q, kv)| (q.min(kv), kv.max(q))).collect();
            let window = [None, Some(100), None, Some(0), None, Some(1024)][i % 6];
            let cap = [0.0, 0.0, 30.0][i % 3];
            let scales = [Fp8Scales::PerTensor, Fp8Scales::PerHead, Fp8Scales::Both][(i / 2) % 3];
            let case = Case::build_with(&mut r, &spec, &lens, vec![], i % 4 == 1).with_features(window, cap).with_fp8_kv(&mut r, scales);
            let options = case.plan_options(if i % 3 == 2 {
                PlanOptions { deterministic: true, split_keys: 256, ..PlanOptions::default() }
            } else {
                PlanOptions::default()
            });
            let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), options).unwrap();
            assert_eq!(plan.shape.kv_dtype, DType::Fp8E4m3);
            let split = !plan.merges.is_empty();
            let (o, lse) = run_plan_inspected(&cu, &case, plan, |bound, args| {
                assert!(!bound.warp_specialized(), "an fp8 plan runs the plain fp8 kernel");
                assert!(!bound.copies_kv_by_tma(args).unwrap());
            });
            done.push((
                case,
                o,
                lse,
                format!("{kernels} {i}: {scales:?}, window {window:?}, cap {cap}, split {split}, {spec:?}, lens {lens:?}"),
            ));
        }
    }
    check_all(done);
}

/// fp8 scales are run arguments on the GPU too: one fp8 launch, run with the case's scales,
/// then with other per-tensor scales and other per-head values written into the same device
/// arrays (the plan and the launch unchanged), each against the reference of its own scales;
/// last over a copy of the cache at an odd address (the kernel's byte-wise copies).
fn fp8_scales_are_taken_from_each_run() {
    use common::Fp8Scales;
    let Some(cu) = backend("fp8_scales_are_taken_from_each_run") else { return };
    let mut r = rng(0xf85c);
    let spec = cycled_spec(0);
    let mut case = Case::build(&mut r, &spec, &[(1, 3000), (40, 900), (1, 17), (200, 200)], vec![]).with_fp8_kv(&mut r, Fp8Scales::Both);
    let plan = Plan::build(case.shape, case.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
    let dcase = DeviceCase::for_case(&cu, &case);
    let bound = testing::bind_cuda(&cu, Arc::new(plan), 0, None, None).expect("bind");
    bound.wait().unwrap();
    for run in 0..3 {
        if run > 0 {
            case.k_scale *= 1.5;
            case.v_scale *= 0.5;
            for x in case.k_head_scales.iter_mut().chain(case.v_head_scales.iter_mut()) {
                *x *= r.random_range(0.5..2.0f32);
            }
            // New per-head values in the same device arrays; outputs poisoned again.
            dcase.load(&cu, &case);
        }
        // SAFETY: the device copies of the case's tensors, alive until after the stream is synced.
        unsafe { bound.run(&dcase.args(&case, 0)) }.expect("run");
        sync_stream(testing::device(&cu), 0).expect("kernels failed");
        let (o, lse) = dcase.outputs(&cu, &case);
        check(&case, &o, &lse, &format!("run {run}: k_scale {}, v_scale {}", case.k_scale, case.v_scale));
    }
    // The same cache one byte off 16-byte alignment: no vector copies (the byte-wise path).
    let dev = testing::device(&cu);
    let (k1, v1) =
        (DeviceBuffer::new(dev, case.k.bytes.len() + 1, "k+1").unwrap(), DeviceBuffer::new(dev, case.v.bytes.len() + 1, "v+1").unwrap());
    for (buf, bytes) in [(&k1, &case.k.bytes), (&v1, &case.v.bytes)] {
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(bytes);
        buf.write(dev, &shifted).unwrap();
    }
    dcase.load(&cu, &case);
    let mut args = dcase.args(&case, 0);
    (args.kv.k, args.kv.v) = (k1.ptr() + 1, v1.ptr() + 1);
    // SAFETY: the shifted device copies of the case's K/V, alive until after the stream is synced.
    unsafe { bound.run(&args) }.expect("run");
    sync_stream(dev, 0).expect("kernels failed");
    let (o, lse) = dcase.outputs(&cu, &case);
    check(&case, &o, &lse, "unaligned fp8 cache");
}

/// Custom masks (tree speculative decoding) on every kernel a masked plan can meet: the plain
/// kernel (mixed batches with decodes, splits, deterministic plans), a warp-specialised launch
/// (which runs masked plans on its plain kernel, without TMA) and the short-prefill one; masks
/// of several densities with fully masked rows, some with a window and a soft-cap, against the
/// f64 reference.
fn custom_masks_on_every_kernel() {
    let case_of = |kernel: &str, i: u32, r: &mut SmallRng| {
        let spec = cycled_spec(i);
        let lens: Vec<(u32, u32)> = match kernel {
            "plain" => (0..r.random_range(2..7))
                .map(|_| {
                    let q = if r.random_bool(0.5) { r.random_range(1..9) } else { r.random_range(1..200u32) };
                    (q, q + r.random_range(0..3000))
                })
                .collect(),
            "warp-specialised" => (0..r.random_range(1..3)).map(|_| (r.random_range(300..800u32), r.random_range(1500..2500u32))).collect(),
            _ => (0..r.random_range(3..16)).map(|_| r.random_range(1..200u32)).map(|q| (q, q)).collect(),
        };
        let window = [None, Some(100), None, Some(1024)][i as usize % 4];
        let cap = [0.0, 30.0, 0.0][i as usize % 3];
        let density = [0.5, 0.95, 0.05, 1.0][i as usize % 4];
        let case = Case::build_with(r, &spec, &lens, vec![], kernel == "plain").with_features(window, cap).with_random_mask(
            r,
            density,
            i.is_multiple_of(3),
        );
        (case, format!("mask density {density}, window {window:?}, cap {cap}, {spec:?}, lens {lens:?}"))
    };
    on_every_kernel("custom_masks_on_every_kernel", 0x3a5c, case_of, |ctx, bound, args| {
        assert!(!bound.copies_kv_by_tma(args).unwrap(), "{ctx}: a masked plan was run with K/V by TMA");
    });
}

/// A launch sized for masks (LaunchCapacity's mask bytes and masked query tokens) takes masked
/// and unmasked plans in turn, each checked against the reference; one sized without masks
/// refuses a masked plan by naming the count.
fn custom_masks_through_capacity_updates() {
    let Some(cu) = backend("custom_masks_through_capacity_updates") else { return };
    let mut r = rng(0x3a5d);
    let spec = cycled_spec(0);
    let lens = [(4, 900), (1, 30), (16, 400), (8, 8)];
    let plain = Case::build(&mut r, &spec, &lens, vec![]);
    let masked = Case::build(&mut r, &spec, &lens, vec![]).with_random_mask(&mut r, 0.6, true);
    let plan = |c: &Case| Plan::build(c.shape, c.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap();
    let unmasked_only = testing::bind_cuda(&cu, Arc::new(plan(&plain)), 0, None, None).expect("bind");
    let err = unmasked_only.update(Arc::new(plan(&masked)), 0).unwrap_err();
    assert!(err.to_string().contains("custom mask bytes"), "{err}");
    let cap = LaunchCapacity::of(&plan(&plain)).max(&LaunchCapacity::of(&plan(&masked)));
    let bound = cu.bind_with_capacity(Arc::new(plan(&plain)), 0, None, &cap).unwrap();
    let dcase = DeviceCase::for_case(&cu, &masked);
    for (step, case) in [&masked, &plain, &masked].into_iter().enumerate() {
        dcase.load(&cu, case);
        bound.update(Arc::new(plan(case)), 0).unwrap();
        // SAFETY: the device copies of the case's tensors, alive until after the stream is synced.
        unsafe { bound.run(&dcase.args(case, 0)) }.expect("run");
        sync_stream(testing::device(&cu), 0).expect("kernels failed");
        let (o, lse) = dcase.outputs(&cu, case);
        check(case, &o, &lse, &format!("step {step}, masked {}", case.batch.has_custom_mask()));
    }
}

/// A capacity launch keeps the kernel of its first plan: on Hopper one made for a long prefill
/// over pages in order (warp-specialised kernel) does not suit a decode step (plain kernel), one
/// made for the decode step does not suit the prefill, and each suits its own plan and, updated
/// to it, computes it right. Elsewhere both get the plain kernel and suit each other.
fn a_capacity_launch_suits_the_plans_of_its_kernel() {
    let Some(cu) = backend("a_capacity_launch_suits_the_plans_of_its_kernel") else { return };
    let mut r = rng(0x5017);
    let spec = prompts_spec(false);
    let prefill = Case::build_with(&mut r, &spec, &[(3000, 3000), (2000, 3500)], vec![], false);
    let decode = Case::build_with(&mut r, &spec, &[(1, 3000), (1, 3500), (1, 900)], vec![], false);
    let plan = |c: &Case| Arc::new(Plan::build(c.shape, c.batch.clone(), &cu.profile(), PlanOptions::default()).unwrap());
    let cap = LaunchCapacity::of(&plan(&prefill)).max(&LaunchCapacity::of(&plan(&decode)));
    let hopper = testing::device(&cu).cc() == (9, 0);
    let for_prefill = cu.bind_with_capacity(plan(&prefill), 0, None, &cap).unwrap();
    let for_decode = cu.bind_with_capacity(plan(&decode), 0, None, &cap).unwrap();
    assert!(for_prefill.suits(&plan(&prefill)) && for_decode.suits(&plan(&decode)), "each suits its own plan");
    assert_eq!(for_prefill.suits(&plan(&decode)), !hopper, "the prefill's launch, a decode plan");
    assert_eq!(for_decode.suits(&plan(&prefill)), !hopper, "the decode's launch, a prefill plan");
    for (bound, case) in [(&for_prefill, &prefill), (&for_decode, &decode), (&for_prefill, &decode)] {
        let dcase = DeviceCase::for_case(&cu, case);
        dcase.load(&cu, case);
        // Updating to a plan that does not suit is allowed (and computes right), only slower.
        bound.update(plan(case), 0).unwrap();
        // SAFETY: the device copies of the case's tensors, alive until after the stream is synced.
        unsafe { bound.run(&dcase.args(case, 0)) }.expect("run");
        sync_stream(testing::device(&cu), 0).expect("kernels failed");
        let (o, lse) = dcase.outputs(&cu, case);
        check(case, &o, &lse, "a capacity launch updated to a step");
    }
}
