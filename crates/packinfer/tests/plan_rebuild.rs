//! `Plan::rebuild`: the same plan as `Plan::build`, and no heap allocation once the plan has
//! held a step at least as large. Its own test binary: the counting allocator is global.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use packinfer::backend::LaunchCapacity;
use packinfer::plan::{DeviceProfile, Plan, PlanOptions};
use packinfer::testing::HostUpload;
use packinfer::types::{Batch, DType, Shape};
use packinfer_testkit::paged_batch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Counts the allocations (and reallocations) of the thread that is counting.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(|a| a.get())
}

fn shape(causal: bool) -> Shape {
    Shape { num_qo_heads: 32, num_kv_heads: 8, head_dim: 128, dtype: DType::Bf16, kv_dtype: DType::Bf16, causal, sm_scale: 0.088 }
}

fn decodes(n: usize, rng: &mut SmallRng) -> Vec<(u32, u32)> {
    (0..n).map(|_| (1, rng.random_range(100..30_000))).collect()
}

/// The workloads of plan_bench, smaller where that changes nothing: decodes with and without
/// prefix groups, short prompts (W5), long prompts with splits, a mixed step.
fn cases() -> Vec<(&'static str, Shape, Batch, PlanOptions)> {
    let mut rng = SmallRng::seed_from_u64(21);
    let mut mixed = decodes(96, &mut rng);
    mixed.push((2048, 4096));
    let short: Vec<(u32, u32)> = (0..256).map(|_| rng.random_range(16..=256)).map(|l| (l, l)).collect();
    let long = vec![(4000, 4000), (300, 9000), (1, 20000), (16, 16)];
    let deterministic = PlanOptions { deterministic: true, split_keys: 1024, ..PlanOptions::default() };
    vec![
        ("256 decodes", shape(true), paged_batch(&decodes(256, &mut rng), 0, true, &mut rng), PlanOptions::default()),
        ("256 decodes, prefix groups of 8", shape(true), paged_batch(&decodes(256, &mut rng), 8, true, &mut rng), PlanOptions::default()),
        ("1024 decodes", shape(true), paged_batch(&decodes(1024, &mut rng), 0, true, &mut rng), PlanOptions::default()),
        ("1024 decodes, prefix groups of 8", shape(true), paged_batch(&decodes(1024, &mut rng), 8, true, &mut rng), PlanOptions::default()),
        ("256 short prompts", shape(true), paged_batch(&short, 0, true, &mut rng), PlanOptions::default()),
        ("mixed", shape(true), paged_batch(&mixed, 0, true, &mut rng), PlanOptions::default()),
        ("long prompts, deterministic", shape(true), paged_batch(&long, 0, true, &mut rng), deterministic),
        (
            "non-causal, no balancing",
            shape(false),
            paged_batch(&decodes(64, &mut rng), 4, true, &mut rng),
            PlanOptions { balancing: false, ..PlanOptions::default() },
        ),
        (
            "one request per tile",
            shape(true),
            paged_batch(&short[..32], 0, true, &mut rng),
            PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() },
        ),
    ]
}

fn assert_same(a: &Plan, b: &Plan, what: &str) {
    assert_eq!(a.batch, b.batch, "{what}: batch");
    assert_eq!(a.requests, b.requests, "{what}: requests");
    assert_eq!(a.items, b.items, "{what}: items");
    assert_eq!(a.units, b.units, "{what}: units");
    assert_eq!(a.row_segments, b.row_segments, "{what}: row segments");
    assert_eq!(a.kv_chunks, b.kv_chunks, "{what}: KV chunks");
    assert_eq!(a.merges, b.merges, "{what}: merges");
    assert_eq!(a.merge_slots, b.merge_slots, "{what}: merge slots");
    assert_eq!(a.group_costs, b.group_costs, "{what}: group costs");
    let (mut sa, mut sb) = (a.stats(), b.stats());
    (sa.planning_ns, sb.planning_ns) = (0, 0);
    assert_eq!(sa, sb, "{what}: stats");
}

#[test]
fn rebuild_makes_the_plan_build_makes_whatever_the_plan_held_before() {
    let profile = DeviceProfile::hopper(132);
    let cases = cases();
    // Every case re-planned into a plan that held each other case (larger, smaller, other
    // options), against a fresh build.
    for (before, sb, bb, ob) in &cases {
        let mut plan = Plan::build(*sb, bb.clone(), &profile, ob.clone()).unwrap();
        for (name, s, b, o) in &cases {
            plan.rebuild(*s, b, &profile, o.clone()).unwrap();
            let fresh = Plan::build(*s, b.clone(), &profile, o.clone()).unwrap();
            assert_same(&plan, &fresh, &format!("{name} after {before}"));
            plan.check_consistent().unwrap();
        }
    }
}

#[test]
fn statistics_counted_per_piece_are_those_of_the_work_items() {
    let profile = DeviceProfile::hopper(132);
    for (name, s, b, o) in cases() {
        let plan = Plan::build(s, b, &profile, o).unwrap();
        let (mut want, costs) = packinfer::testing::stats_by_items(&plan, &profile);
        let mut got = plan.stats();
        (got.planning_ns, want.planning_ns) = (0, 0);
        assert_eq!(got, want, "{name}");
        assert_eq!(plan.group_costs, costs, "{name}");
    }
}

#[test]
fn rebuild_allocates_nothing_once_the_plan_held_a_step_as_large() {
    let profile = DeviceProfile::hopper(132);
    for (name, s, b, o) in cases() {
        let mut plan = Plan::build(s, b.clone(), &profile, o.clone()).unwrap();
        // The first rebuild sizes the working buffers the build's plan did not keep.
        plan.rebuild(s, &b, &profile, o.clone()).unwrap();
        let n = allocations(|| plan.rebuild(s, &b, &profile, o.clone()).unwrap());
        assert_eq!(n, 0, "{name}: {n} heap allocations in a steady-state rebuild");
    }
    // An engine's steps differ: after the largest, every other step re-plans without allocating.
    let cases = cases();
    let mut plan = Plan::build(shape(true), cases[0].2.clone(), &profile, PlanOptions::default()).unwrap();
    for (_, s, b, o) in cases.iter().chain(cases.iter()) {
        plan.rebuild(*s, b, &profile, o.clone()).unwrap();
    }
    for (name, s, b, o) in &cases {
        let n = allocations(|| plan.rebuild(*s, b, &profile, o.clone()).unwrap());
        assert_eq!(n, 0, "{name}: {n} heap allocations re-planning after every other step");
    }
}

#[test]
fn launch_update_writes_its_image_without_allocating() {
    // The host work of `packinfer_launch_update` (the CUDA launch image, the per-KV-head copies
    // expanded as it is written), into a launch sized for every case.
    let profile = DeviceProfile::hopper(132);
    let cases = cases();
    let plans: Vec<Plan> = cases.iter().map(|(_, s, b, o)| Plan::build(*s, b.clone(), &profile, o.clone()).unwrap()).collect();
    let by_shape = |causal: bool| {
        let fit = plans.iter().filter(|p| p.shape.causal == causal);
        let capacity = fit.fold(LaunchCapacity::default(), |c, p| c.max(&LaunchCapacity::of(p)));
        (capacity, plans.iter().find(|p| p.shape.causal == causal).unwrap())
    };
    for causal in [true, false] {
        let (capacity, first) = by_shape(causal);
        let mut upload = HostUpload::new(first, &capacity, profile.block_m);
        for ((name, ..), plan) in cases.iter().zip(&plans).filter(|(_, p)| p.shape.causal == causal) {
            let n = allocations(|| {
                upload.update_planned(plan).unwrap();
            });
            assert_eq!(n, 0, "{name}: {n} heap allocations in a launch update");
        }
    }
}

#[test]
fn a_failed_rebuild_leaves_an_empty_plan_and_the_next_one_works() {
    let profile = DeviceProfile::hopper(132);
    let cases = cases();
    let (_, s, b, o) = &cases[1];
    let mut plan = Plan::build(*s, b.clone(), &profile, o.clone()).unwrap();
    let mut bad = b.clone();
    bad.kv_page_indices[3] = 200_000;
    let e = plan.rebuild(*s, &bad, &profile, o.clone()).unwrap_err().to_string();
    assert!(e.contains("200000"), "{e}");
    assert_eq!((plan.requests.len(), plan.items.len(), plan.merges.len(), plan.batch.total_q()), (0, 0, 0, 0));
    plan.check_consistent().unwrap();
    // A capacity so small the work list would pass the limit: refused after scheduling began.
    let tiny = PlanOptions { capacity: Some(1e-9), ..o.clone() };
    assert!(plan.rebuild(*s, b, &DeviceProfile { cost_item: 0.0, block_n: 1, ..profile.clone() }, tiny).is_err());
    assert_eq!((plan.requests.len(), plan.items.len(), plan.batch.total_q()), (0, 0, 0));
    plan.check_consistent().unwrap();
    plan.rebuild(*s, b, &profile, o.clone()).unwrap();
    assert_same(&plan, &Plan::build(*s, b.clone(), &profile, o.clone()).unwrap(), "after errors");
}

/// A pool on the CPU backend holding 96 sequences: 12 prompts of 200–2000 tokens, each forked
/// into 8 that share its full pages and grow by a few tokens (a step's requests are decodes).
fn pool_with_forks() -> (packinfer::kv::KvPool, Vec<(u64, u32)>) {
    use packinfer::kv::{KvPool, PoolConfig};
    let config = PoolConfig { num_layers: 1, shape: shape(true), page_size: 16, num_pages: 4096, headroom_pages: 2 };
    let pool = KvPool::new(std::sync::Arc::new(packinfer::backend::cpu::CpuBackend::new(1)), config).unwrap();
    let mut rng = SmallRng::seed_from_u64(5);
    let mut requests = Vec::new();
    for _ in 0..12 {
        let root = pool.create_sequence();
        let len = rng.random_range(200..2000);
        pool.append(root, len, 0).unwrap();
        for _ in 0..8 {
            let child = pool.fork(root, len / 16 * 16, 0).unwrap();
            pool.append(child, rng.random_range(1..40), 0).unwrap();
            requests.push((child, 1));
        }
    }
    (pool, requests)
}

#[test]
fn pool_replan_makes_the_pool_plan_and_allocates_nothing_in_steady_state() {
    let (pool, requests) = pool_with_forks();
    let profile = DeviceProfile::hopper(132);
    let fresh = pool.plan(&requests, Some(&profile), PlanOptions::default()).unwrap();
    assert!(fresh.batch.prefix_groups.len() >= 12, "{} prefix groups", fresh.batch.prefix_groups.len());
    // Into a plan that held another step (not from a pool), and into itself.
    let cases = cases();
    let mut plan = Plan::build(cases[3].1, cases[3].2.clone(), &profile, cases[3].3.clone()).unwrap();
    for what in ["a plan of another step", "the same plan"] {
        pool.replan(&mut plan, requests.iter().copied(), Some(&profile), PlanOptions::default()).unwrap();
        assert_same(&plan, &fresh, &format!("pool replan into {what}"));
        plan.check_fresh().unwrap();
    }
    // Steps of half and all the requests (a smaller step may split more): once each was
    // planned, every step allocates nothing.
    let half = &requests[..requests.len() / 2];
    pool.replan(&mut plan, half.iter().copied(), Some(&profile), PlanOptions::default()).unwrap();
    for reqs in [half, &requests[..], half] {
        let n = allocations(|| pool.replan(&mut plan, reqs.iter().copied(), Some(&profile), PlanOptions::default()).unwrap());
        assert_eq!(n, 0, "{n} heap allocations in a steady-state pool replan of {} requests", reqs.len());
    }
    // The backend's profile (None) too.
    pool.replan(&mut plan, requests.iter().copied(), None, PlanOptions::default()).unwrap();
    let n = allocations(|| pool.replan(&mut plan, requests.iter().copied(), None, PlanOptions::default()).unwrap());
    assert_eq!(n, 0, "{n} heap allocations in a pool replan with the backend's profile");
    // An error leaves the plan empty; the next replan works.
    let repeated = [requests[0], requests[1], requests[0]];
    let e = pool.replan(&mut plan, repeated.iter().copied(), Some(&profile), PlanOptions::default()).unwrap_err().to_string();
    assert!(e.contains("seq_ids[2]") && e.contains("repeats seq_ids[0]"), "{e}");
    assert_eq!((plan.requests.len(), plan.items.len(), plan.batch.total_q()), (0, 0, 0));
    pool.replan(&mut plan, requests.iter().copied(), Some(&profile), PlanOptions::default()).unwrap();
    assert_same(&plan, &fresh, "pool replan after an error");
}
